"""Qwen2-VL and Qwen2.5-VL: the data's `<image>` becomes `<|vision_start|><|image_pad|><|vision_end|>`
(the pad token expanded per image), and the model's 3-D (M-RoPE) positions come out right in left-padded
batches: the training loss, the rank scores and greedy answers of a batch equal those of one example at
a time."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from retain.data.batching import IGNORE_INDEX, collate
from retain.data.encode import encode_dataset, encode_example, encode_prompt_inputs, image_text
from retain.data.formats import Example
from retain.errors import RetainError
from retain.evaluation.generate import generate
from retain.evaluation.rank import label_log_likelihoods
from retain.models.forward import response_forward
from retain.models.tiny import tiny_tokenizer
from retain.models.vision import load_image_text_model

START, PAD, END, VIDEO = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
PATCH, MERGE = 14, 2


def _image_only(processor_class: type) -> type:
    """The processor class without its video processor (which needs torchvision, not installed here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    return type(
        processor_class.__name__,
        (processor_class,),
        {"check_argument_for_proper_class": check_argument_for_proper_class},
    )


# family -> (processor, config, model, the vision tower's config)
FAMILIES = {
    "qwen2_vl": (
        Qwen2VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2},
    ),
    "qwen2_5_vl": (
        Qwen2_5_VLProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        {
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 32,
            "out_hidden_size": 32,
            "num_heads": 2,
            "window_size": 2 * PATCH * MERGE,
            "fullatt_block_indexes": [1],
        },
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def processor(family):
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [START, PAD, END, VIDEO]})
    side = PATCH * MERGE
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=side * side, max_pixels=6 * side * side, patch_size=PATCH, merge_size=MERGE
    )
    return _image_only(FAMILIES[family][0])(image_processor=image_processor, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def model(family, processor):
    _, config_class, model_class, vision = FAMILIES[family]
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (START, PAD, END, VIDEO)}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        # head_dim 8: 4 rotary frequencies split over (time, height, width); a small theta makes positions
        # matter more to the scores
        "rope_parameters": {"rope_type": "default", "rope_theta": 100.0, "mrope_section": [2, 1, 1]},
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
        # larger weights than the default 0.02: attention then depends on positions enough for a wrong
        # position rule to show in the scores
        "initializer_range": 0.3,
    }
    config = config_class(
        text_config=text,
        vision_config={**vision, "patch_size": PATCH, "spatial_merge_size": MERGE},
        image_token_id=ids[PAD],
        video_token_id=ids[VIDEO],
        vision_start_token_id=ids[START],
        vision_end_token_id=ids[END],
        tie_word_embeddings=True,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    return model_class(config).eval()


def _picture(folder, name: str, width: int, height: int, colour: str) -> str:
    path = folder / f"{name}.png"
    image = Image.new("RGB", (width, height), "grey")
    image.paste(colour, (3, 3, width // 2, height // 2))
    image.save(path)
    return str(path)


@pytest.fixture
def examples(tmp_path) -> list[Example]:
    """Images of three sizes (1x2, 2x2 and 2x3 image tokens), so the prompts have different lengths, and
    M-RoPE positions run behind the token count by 0, 2 and 3 after the image; and a text example."""
    wide = _picture(tmp_path, "wide", 4 * PATCH, 2 * PATCH, "red")
    small = _picture(tmp_path, "small", 4 * PATCH, 4 * PATCH, "blue")
    large = _picture(tmp_path, "large", 6 * PATCH, 4 * PATCH, "green")

    def one(image: str | None, question: str, answer: str) -> Example:
        content = f"<image>{question}" if image else question
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
        return Example(messages, images=[image] if image else [], meta={"index": 0})

    return [
        one(wide, "Which colour is the square?", "red"),
        one(small, "Colour?", "blue"),
        one(large, "What colour is the square in this picture?", "green"),
        one(None, "Say a colour", "red"),
    ]


def test_the_image_placeholder_becomes_the_vision_tokens_around_the_expanded_pad(processor, examples):
    tokenizer = processor.tokenizer
    assert image_text(processor) == START + PAD + END
    start, pad, end = (tokenizer.convert_tokens_to_ids(t) for t in (START, PAD, END))
    feature = encode_example(tokenizer, examples[0], 512, processor=processor)
    ids, labels = feature["input_ids"], feature["labels"]
    first = ids.index(pad)
    count = ids.count(pad)
    grid = feature["image_grid_thw"][0].tolist()
    assert count == grid[0] * grid[1] * grid[2] // MERGE**2 == 2
    assert (
        ids[first - 1] == start and ids[first : first + count] == [pad] * count and ids[first + count] == end
    )
    assert "<image>" not in tokenizer.decode(ids)
    # mm_token_type_ids: 1 exactly on the image tokens; no label on them
    assert [k for k, t in enumerate(feature["mm_token_type_ids"]) if t] == list(range(first, first + count))
    assert all(labels[k] == IGNORE_INDEX for k in range(first - 1, first + count + 1))
    prompt = encode_prompt_inputs(tokenizer, examples[0], processor)
    assert ids[: len(prompt["input_ids"])] == prompt["input_ids"]
    assert torch.equal(prompt["pixel_values"], feature["pixel_values"])


def _answer_nll(model, features: list[dict], pad_id: int) -> list[float]:
    outputs = response_forward(model, collate(features, pad_id))
    per_token = F.cross_entropy(
        outputs.logits.float().transpose(1, 2), outputs.labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_token.sum(dim=1).tolist()


def test_a_left_padded_training_batch_gives_each_example_its_loss_alone(processor, model, examples):
    pad = processor.tokenizer.pad_token_id
    features = encode_dataset(processor.tokenizer, examples, 512, "qwen", processor=processor)
    assert len({len(f["input_ids"]) for f in features}) == len(features)
    grids = collate(features, pad)["image_grid_thw"] // torch.tensor([1, MERGE, MERGE])
    assert grids.tolist() == [[1, 1, 2], [1, 2, 2], [1, 2, 3]]
    with torch.no_grad():
        batched = _answer_nll(model, features, pad)
        alone = [_answer_nll(model, [feature], pad)[0] for feature in features]
        # The model's own forward on the processor's outputs, positions left to the model: the reference
        # for the 3-D positions, which a wrong rule would get wrong alone and batched alike.
        plain = []
        for example in examples[:3]:
            whole = encode_example(processor.tokenizer, example, 512, processor=processor)
            inputs = {k: torch.as_tensor(v) for k, v in whole.items() if k != "labels"}
            inputs = {
                k: v[None] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v
                for k, v in inputs.items()
            }
            logits = model(**inputs).logits[0, :-1]
            plain.append(float(F.cross_entropy(logits, torch.tensor(whole["labels"][1:]), reduction="sum")))
    assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-4)
    assert torch.allclose(torch.tensor(alone[:3]), torch.tensor(plain), atol=1e-4)


def test_rank_scores_of_a_batch_match_one_example_at_a_time(processor, model, examples):
    labels = ["red", "blue", "green yellow"]  # answers of 1 and 2+ tokens: the cached follow-up runs
    options = {"progress": False, "processor": processor}
    tokenizer = processor.tokenizer
    reference = [
        label_log_likelihoods(model, tokenizer, [e], labels, batch_size=1, share_prompt=False, **options)[0]
        for e in examples
    ]
    shared = label_log_likelihoods(model, tokenizer, examples, labels, batch_size=4, **options)
    pairs = label_log_likelihoods(
        model, tokenizer, examples, labels, batch_size=5, share_prompt=False, **options
    )
    assert torch.allclose(torch.tensor(shared), torch.tensor(reference), atol=1e-4)
    assert torch.allclose(torch.tensor(pairs), torch.tensor(reference), atol=1e-4)
    # The reference itself is the plain forward of each (prompt, label) pair.
    answered = Example(
        [examples[0].messages[0], {"role": "assistant", "content": labels[2]}], images=examples[0].images
    )
    feature = encode_example(tokenizer, answered, 512, processor=processor)
    assert reference[0][2] == pytest.approx(
        -_answer_nll(model, [feature], tokenizer.pad_token_id)[0], abs=1e-3
    )


def test_batched_generation_matches_one_prompt_at_a_time(processor, model, examples):
    tokenizer = processor.tokenizer
    inputs = [encode_prompt_inputs(tokenizer, e, processor, defer_images=True) for e in examples]
    prompts = [i["input_ids"] for i in inputs]
    images = [{k: v for k, v in i.items() if k != "input_ids"} for i in inputs]
    batched = generate(
        model, tokenizer, prompts, max_new_tokens=4, batch_size=4, progress=False, images=images
    )
    singles = [
        generate(model, tokenizer, [p], max_new_tokens=4, progress=False, images=[i])[0]
        for p, i in zip(prompts, images, strict=True)
    ]
    assert batched == singles


def test_a_saved_folder_loads_or_names_the_missing_torchvision(tmp_path, family, processor, model):
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    if importlib.util.find_spec("torchvision") is None:
        with pytest.raises(RetainError, match=rf"{tmp_path}: its processor needs .*pip install torchvision"):
            load_image_text_model(str(tmp_path))
        return
    _, loaded = load_image_text_model(str(tmp_path))
    assert image_text(loaded) == START + PAD + END
