"""Encoding and batching examples with images: the processor expands each image, image tokens carry no
label, the cutoff never splits an image, text examples encode exactly as before, and collate batches
the image inputs in example order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from retain.data.batching import DEFERRED_IMAGES, IGNORE_INDEX, FeatureDataset, collate, load_images
from retain.data.encode import encode_dataset, encode_example, encode_prompt, encode_prompt_inputs
from retain.data.formats import Example
from retain.errors import RetainError
from retain.models.tiny import IMAGE_TOKEN, TINY_IMAGE_SIZE, TINY_IMAGE_TOKENS, tiny_vlm_processor


@pytest.fixture(scope="module")
def processor():
    return tiny_vlm_processor()


def _png(folder, name: str, colour: str) -> str:
    path = folder / f"{name}.png"
    image = Image.new("RGB", (TINY_IMAGE_SIZE + 12, TINY_IMAGE_SIZE), "grey")
    image.paste(colour, (10, 4, 30, 24))
    image.save(path)
    return str(path)


def _example(path: str, question: str = "which colour is the square?", answer: str = "red") -> Example:
    messages = [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]
    return Example(messages, images=[path], meta={"source": "colours.json", "index": 0})


def _collapse(ids: list[int], image_id: int) -> list[int]:
    """`ids` with each run of image tokens back to the single token of the text."""
    return [t for k, t in enumerate(ids) if t != image_id or k == 0 or ids[k - 1] != image_id]


def test_an_image_is_expanded_and_its_tokens_never_carry_a_label(tmp_path, processor):
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    red = _png(tmp_path, "red", "red")
    # An image in the answer too: the answer's tokens are learned, its image tokens are not.
    messages = [
        {"role": "user", "content": "<image>which colour?"},
        {"role": "assistant", "content": "red, as in <image>"},
    ]
    example = Example(messages, images=[red, red], meta={"index": 0})
    feature = encode_example(tokenizer, example, 512, processor=processor)
    ids, labels = feature["input_ids"], feature["labels"]
    assert ids.count(image_id) == 2 * TINY_IMAGE_TOKENS
    assert feature["pixel_values"].shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    assert all(label == IGNORE_INDEX for token, label in zip(ids, labels, strict=True) if token == image_id)
    assert any(label != IGNORE_INDEX for label in labels)
    # Without the images the same conversation is the text encoding, the placeholder a single token.
    text = encode_example(tokenizer, replace(example, images=[]), 512)
    assert _collapse(ids, image_id) == text["input_ids"]
    assert [lab for k, lab in enumerate(labels) if ids[k] != image_id] == [
        lab for k, lab in enumerate(text["labels"]) if text["input_ids"][k] != image_id
    ]


def test_the_prompt_is_the_prompt_part_of_the_training_encoding_with_its_image(tmp_path, processor):
    example = _example(_png(tmp_path, "blue", "blue"))
    full = encode_example(processor.tokenizer, example, 512, processor=processor)
    prompt = encode_prompt_inputs(processor.tokenizer, example, processor)
    assert full["input_ids"][: len(prompt["input_ids"])] == prompt["input_ids"]
    assert torch.equal(prompt["pixel_values"], full["pixel_values"])
    assert encode_prompt(processor.tokenizer, example, processor) == prompt["input_ids"]


def test_text_examples_encode_exactly_as_without_a_processor(processor):
    tokenizer = processor.tokenizer
    example = Example(
        [{"role": "user", "content": "2 + 3?"}, {"role": "assistant", "content": "5"}], "Be brief."
    )
    plain = encode_example(tokenizer, example, 64)
    assert encode_example(tokenizer, example, 64, processor=processor) == plain
    assert set(plain) == {"input_ids", "labels", "attention_mask"}
    assert encode_dataset(tokenizer, [example], 30, "t", processor=processor) == encode_dataset(
        tokenizer, [example], 30, "t"
    )
    assert encode_prompt_inputs(tokenizer, example, processor) == {
        "input_ids": encode_prompt(tokenizer, example)
    }


def test_an_example_with_images_needs_the_processor(tmp_path, processor):
    with pytest.raises(RetainError, match="colours.json: example 0 has images, but the model has no image"):
        encode_example(processor.tokenizer, _example(_png(tmp_path, "red", "red")), 512)


def test_a_cutoff_that_would_cut_an_image_is_refused_naming_the_task(tmp_path, processor):
    red = _png(tmp_path, "red", "red")
    # The prompt always fits (the text rule); an image in the answer is what a cut can reach.
    messages = [
        {"role": "user", "content": "which colour is the sky?"},
        {"role": "assistant", "content": "blue, the colour of the sky, like this: <image>"},
    ]
    example = Example(messages, images=[red], meta={"index": 7})
    whole = encode_example(processor.tokenizer, example, 512, processor=processor)
    image_at = whole["input_ids"].index(processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    with pytest.raises(RetainError, match=r"task 'colours': example 7: cutoff_len=\d+ would cut its image"):
        encode_dataset(processor.tokenizer, [example], image_at + 2, "task 'colours'", processor=processor)
    # A cut after the image is the usual tail truncation.
    cut = encode_dataset(
        processor.tokenizer, [example], len(whole["input_ids"]) - 1, "t", processor=processor
    )
    assert cut[0]["input_ids"] == whole["input_ids"][:-1]
    assert torch.equal(load_images(cut[0])["pixel_values"], whole["pixel_values"])


def test_collate_pads_text_as_before_and_concatenates_images_in_example_order(tmp_path, processor):
    tokenizer = processor.tokenizer
    red, blue = _png(tmp_path, "red", "red"), _png(tmp_path, "blue", "blue")
    text = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}])
    features = encode_dataset(
        tokenizer,
        [_example(blue, "colour?"), text, _example(red, "which colour is this square?")],
        512,
        "t",
        processor=processor,
    )
    pad = tokenizer.pad_token_id
    batch = collate(features, pad)
    # The text part is what collating the text features alone gives, row by row.
    plain = collate([{k: f[k] for k in ("input_ids", "labels", "attention_mask")} for f in features], pad)
    assert set(batch) == {*plain, "pixel_values"}
    for key, value in plain.items():
        assert torch.equal(batch[key], value)
    loaded = [load_images(f) for f in features]
    assert torch.equal(
        batch["pixel_values"], torch.cat([loaded[0]["pixel_values"], loaded[2]["pixel_values"]])
    )
    # A text batch is exactly the text keys.
    assert set(collate([features[1]], pad)) == {"input_ids", "labels", "attention_mask", "position_ids"}


def test_collate_left_pads_per_token_image_inputs_with_zero():
    features = [
        {
            "input_ids": [5, 6, 7],
            "labels": [-100, -100, 7],
            "mm_token_type_ids": [1, 1, 0],
            "image_grid_thw": torch.tensor([[1, 2, 2]]),
        },
        {"input_ids": [8, 9], "labels": [-100, 9]},
    ]
    batch = collate(features, pad_token_id=0)
    assert batch["mm_token_type_ids"].tolist() == [[1, 1, 0], [0, 0, 0]]
    assert batch["image_grid_thw"].tolist() == [[1, 2, 2]]


def test_a_training_set_holds_no_pixels_and_its_images_are_read_batch_by_batch(tmp_path, processor):
    tokenizer = processor.tokenizer
    red, blue = _png(tmp_path, "red", "red"), _png(tmp_path, "blue", "blue")
    examples = [_example(red), _example(blue, "and this one?"), _example(red, "once more?")]
    features = encode_dataset(tokenizer, examples, 512, "t", processor=processor)
    assert not any(isinstance(v, torch.Tensor) for f in features for v in f.values())
    eager = [encode_example(tokenizer, e, 512, processor=processor) for e in examples]
    for feature, whole in zip(features, eager, strict=True):
        assert {k: v for k, v in feature.items() if k != DEFERRED_IMAGES} == {
            k: v for k, v in whole.items() if k != "pixel_values"
        }
    # The dataset item and the batch hold what eager encoding gives.
    dataset = FeatureDataset(features)
    for i, whole in enumerate(eager):
        assert torch.equal(dataset[i]["pixel_values"], whole["pixel_values"])
        assert DEFERRED_IMAGES not in dataset[i]
    batch = collate(features, tokenizer.pad_token_id)
    assert torch.equal(batch["pixel_values"], collate(eager, tokenizer.pad_token_id)["pixel_values"])
    # The images are read when the batch is built: a picture changed since encoding shows.
    Image.new("RGB", (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), "green").save(blue)
    assert not torch.equal(dataset[1]["pixel_values"], eager[1]["pixel_values"])
    # Text items are handed out unchanged.
    text = encode_dataset(
        tokenizer,
        [Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])],
        64,
        "t",
    )
    assert FeatureDataset(text)[0] is text[0]


def test_an_image_that_now_gives_another_token_count_is_named(tmp_path, processor):
    """LLaVA-NeXT and Qwen2-VL give a larger image more tokens: an image replaced by one of another size
    after encoding would no longer match its ids (simulated here by the count encoding recorded)."""
    path = _png(tmp_path, "red", "red")
    (feature,) = encode_dataset(processor.tokenizer, [_example(path)], 512, "task 'c'", processor=processor)
    deferred = feature[DEFERRED_IMAGES]
    text, paths, count = deferred.segments[0]
    feature[DEFERRED_IMAGES] = replace(deferred, segments=((text, paths, count + 1),))
    with pytest.raises(
        RetainError, match=r"task 'c': example 0: its images \(.*red.png\) give \d+ tokens now"
    ):
        collate([feature], processor.tokenizer.pad_token_id)
