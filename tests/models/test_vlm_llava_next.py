"""LLaVA-NeXT: images of different aspect ratios become different numbers of patches; collate zero-pads
them to one pixel_values tensor (images, patches, 3, H, W) that the model unpads with image_sizes, so a
batch gives every example the loss it has alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from retain.data.batching import IGNORE_INDEX, collate, load_images
from retain.data.encode import encode_dataset, encode_example
from retain.data.formats import Example
from retain.models.forward import response_forward
from retain.models.tiny import IMAGE_TOKEN, TINY_IMAGE_SIZE, TINY_PATCH, _tiny_text_config, tiny_vlm_tokenizer

SIZE = TINY_IMAGE_SIZE
# A square picture fits 28x28 (1 tile + the overview: 2 patches), a wide one 28x56 (3 patches).
PINPOINTS = [[SIZE, SIZE], [SIZE, 2 * SIZE], [2 * SIZE, SIZE]]


@pytest.fixture(scope="module")
def processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": SIZE},
        crop_size={"height": SIZE, "width": SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tiny_vlm_tokenizer(),
        patch_size=TINY_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN,
    )


@pytest.fixture(scope="module")
def model(processor) -> LlavaNextForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=TINY_PATCH,
        projection_dim=16,
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=_tiny_text_config(tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


def _picture(folder, name: str, width: int, height: int, colour: str) -> str:
    path = folder / f"{name}.png"
    image = Image.new("RGB", (width, height), "grey")
    image.paste(colour, (2, 2, width // 2, height // 2))
    image.save(path)
    return str(path)


def _example(images: list[str], turns: list[tuple[str, str]]) -> Example:
    messages = []
    for question, answer in turns:
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return Example(messages, images=images, meta={"index": 0})


def _answer_nll(model, features: list[dict], pad_id: int) -> list[float]:
    """Per example, the summed -log p of its learned tokens, from one batched forward."""
    outputs = response_forward(model, collate(features, pad_id))
    per_token = F.cross_entropy(
        outputs.logits.float().transpose(1, 2), outputs.labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.sum(dim=1).tolist()


def test_images_of_different_aspect_ratios_batch_with_the_loss_each_has_alone(tmp_path, processor, model):
    wide = _picture(tmp_path, "wide", 2 * SIZE + 4, SIZE, "red")
    square = _picture(tmp_path, "square", SIZE, SIZE, "blue")
    tall = _picture(tmp_path, "tall", SIZE, 2 * SIZE + 4, "green")
    examples = [
        _example([wide], [("<image>Which colour?", "red")]),
        _example([square], [("<image>And this square, which colour is it?", "blue")]),
        # two images of different sizes in two turns: one example's own patches differ too
        _example([tall, square], [("<image>Colour?", "green"), ("<image>Now?", "blue")]),
        _example([], [("No picture: say hi", "hi")]),
    ]
    pad = processor.tokenizer.pad_token_id
    features = encode_dataset(processor.tokenizer, examples, 512, "next", processor=processor)
    patches = [load_images(f)["pixel_values"].shape[1] for f in features[:3]]
    assert patches[0] == patches[2] == 3 and patches[1] == 2
    # Encoded eagerly, the two-turn example pads its own images the same way.
    eager = encode_example(processor.tokenizer, examples[2], 512, processor=processor)
    assert torch.equal(eager["pixel_values"], load_images(features[2])["pixel_values"])
    batch = collate(features, pad)
    assert batch["pixel_values"].shape == (4, 3, 3, SIZE, SIZE)
    assert batch["image_sizes"].tolist() == [
        [SIZE, 2 * SIZE + 4],
        [SIZE, SIZE],
        [2 * SIZE + 4, SIZE],
        [SIZE, SIZE],
    ]
    assert not batch["pixel_values"][1, 2].any()  # the square's missing patch is zero padding
    with torch.no_grad():
        batched = _answer_nll(model, features, pad)
        alone = [_answer_nll(model, [feature], pad)[0] for feature in features]
    assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-4)
    # The images matter: the same words about another picture score differently.
    other = encode_dataset(
        processor.tokenizer,
        [_example([square], [("<image>Which colour?", "red")])],
        512,
        "n",
        processor=processor,
    )
    with torch.no_grad():
        assert abs(_answer_nll(model, other, pad)[0] - alone[0]) > 1e-4
