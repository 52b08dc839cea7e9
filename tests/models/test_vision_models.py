"""Image-text models: loading with the processor, LoRA on the language model only, frozen or trainable
vision tower and projector, and a forward that really feeds the image to the model."""

from __future__ import annotations

import os

import pytest
import torch

from retain.config import ModelConfig
from retain.data.batching import IGNORE_INDEX, collate
from retain.errors import RetainError
from retain.models.adapters import (
    BASE_WEIGHTS,
    apply_finetuning,
    load_trainable,
    save_trainable,
    trainable_parameters,
    unwrap,
)
from retain.models.forward import forward_with_weights, hidden_states, response_forward, response_window
from retain.models.loading import load_model, model_layer_count
from retain.models.tiny import (
    IMAGE_TOKEN,
    TINY_IMAGE_SIZE,
    TINY_IMAGE_TOKENS,
    TINY_LAYERS,
    tiny_model,
    tiny_tokenizer,
    tiny_vlm,
    tiny_vlm_processor,
)
from retain.models.vision import is_image_text_model, vlm_parts

LINEAR_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _parts_of(model):
    return vlm_parts(unwrap(model).get_base_model() if hasattr(unwrap(model), "get_base_model") else model)


def _base_name(name: str) -> str:
    """A PeftModel parameter name as the base model names it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _batch(image_seed: int = 0, pixels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A collated 2-example batch (left-padded) with one image per example, pixel values already
    normalised as the processor would produce them."""
    tokenizer = tiny_vlm_processor().tokenizer
    image_ids = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    features = []
    for prompt, answer in (("what is this", "a fox"), ("count the letters", "three")):
        ids = [image_ids] * TINY_IMAGE_TOKENS + tokenizer.encode(prompt, add_special_tokens=False)
        target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        features.append({"input_ids": ids + target, "labels": [IGNORE_INDEX] * len(ids) + target})
    batch = collate(features, tokenizer.pad_token_id)
    if pixels is None:
        generator = torch.Generator().manual_seed(image_seed)
        pixels = torch.randn(2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)
    batch["pixel_values"] = pixels
    return batch


def test_the_tiny_vlm_is_an_image_text_model_and_the_text_model_is_not(tmp_path):
    assert is_image_text_model(tiny_vlm())
    assert not is_image_text_model(tiny_model())
    tiny_vlm().save_pretrained(tmp_path / "vlm")
    tiny_model().save_pretrained(tmp_path / "text")
    assert is_image_text_model(str(tmp_path / "vlm"))
    assert not is_image_text_model(str(tmp_path / "text"))
    # CLIP has a vision_config but generates no text
    assert not is_image_text_model({"model_type": "clip", "vision_config": {}, "text_config": {}})
    assert is_image_text_model({"model_type": "my_custom_vlm", "vision_config": {"hidden_size": 8}})


def test_load_model_loads_a_saved_image_text_model_with_its_processor(tmp_path):
    folder = tmp_path / "tiny-vlm"
    model = tiny_vlm()
    model.save_pretrained(folder)
    tiny_vlm_processor().save_pretrained(folder)
    loaded, tokenizer, info = load_model(str(folder))
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert info.processor is not None and tokenizer is info.processor.tokenizer
    assert tokenizer.pad_token_id is not None
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == loaded.config.image_token_id
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    for name, param in model.state_dict().items():
        assert torch.equal(param, loaded.state_dict()[name]), name
    # the language model's layers, not the vision tower's (1)
    assert model_layer_count(str(folder)) == TINY_LAYERS
    # text models load as before, without a processor
    tiny_model().save_pretrained(tmp_path / "text")
    tiny_tokenizer().save_pretrained(tmp_path / "text")
    text, _, text_info = load_model(str(tmp_path / "text"))
    assert type(text).__name__ == "LlamaForCausalLM" and text_info.processor is None


def test_an_image_text_folder_without_its_processor_is_a_user_error(tmp_path):
    tiny_vlm().save_pretrained(tmp_path)
    with pytest.raises(RetainError, match=f"{tmp_path}.*processor files"):
        load_model(str(tmp_path))
    tiny_vlm_processor().tokenizer.save_pretrained(tmp_path)  # a tokenizer, but no image processor
    with pytest.raises(RetainError, match=f"{tmp_path}.*image processor.*processor files"):
        load_model(str(tmp_path))


def test_the_processor_expands_the_image_token_and_makes_pixel_values():
    image = pytest.importorskip("PIL.Image", reason="pillow (a matplotlib dependency) makes the images")
    processor = tiny_vlm_processor()
    pictures = [image.new("RGB", (40, 30), (200, 10, 10)), image.new("RGB", (20, 50), (10, 10, 200))]
    batch = processor(
        text=[f"{IMAGE_TOKEN}what colour", f"{IMAGE_TOKEN}and this"],
        images=pictures,
        padding=True,
        return_tensors="pt",
    )
    assert batch["pixel_values"].shape == (2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    image_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert (torch.as_tensor(batch["input_ids"]) == image_id).sum(dim=1).tolist() == [TINY_IMAGE_TOKENS] * 2
    out = tiny_vlm()(**{k: torch.as_tensor(v) for k, v in batch.items()})
    assert torch.isfinite(out.logits).all()


def test_lora_lands_on_the_language_model_linears_only():
    model = apply_finetuning(tiny_vlm(), ModelConfig())
    parts = _parts_of(model)
    lora = [_base_name(n) for n in trainable_parameters(model)]
    assert lora and all("lora_" in n for n in lora)
    assert all(parts.owns(n, "language_model") for n in lora)
    assert not [n for n, _ in unwrap(model).named_parameters() if "lora_" in n and "vision_tower" in n]
    assert not [n for n, _ in unwrap(model).named_parameters() if "lora_" in n and "projector" in n]
    assert {n.split(".")[-4] for n in lora} == LINEAR_KINDS
    # a target list names language-model modules only, even where the vision tower has the same names
    model = apply_finetuning(tiny_vlm(), ModelConfig(lora_target="q_proj,v_proj"))
    assert {_base_name(n).split(".")[-4] for n in trainable_parameters(model)} == {"q_proj", "v_proj"}
    assert all(_parts_of(model).owns(_base_name(n), "language_model") for n in trainable_parameters(model))
    with pytest.raises(RetainError, match="names no linear layer"):
        apply_finetuning(tiny_vlm(), ModelConfig(lora_target="fc1"))  # CLIP's MLP: vision tower only


@pytest.mark.parametrize(("spec", "layers"), [("all", {0, 1}), ("last:1", {1}), ("0", {0})])
def test_lora_layers_count_the_language_model_layers(spec, layers):
    model = apply_finetuning(tiny_vlm(), ModelConfig(lora_layers=spec))
    found = {int(n.split(".layers.")[1].split(".")[0]) for n in trainable_parameters(model)}
    assert found == layers
    assert all(".language_model.layers." in n for n in trainable_parameters(model))


def test_lora_layers_beyond_the_language_model_are_refused():
    with pytest.raises(RetainError, match="it has 2"):
        apply_finetuning(tiny_vlm(), ModelConfig(lora_layers="last:3"))


@pytest.mark.parametrize("finetuning_type", ["lora", "full"])
@pytest.mark.parametrize(
    ("freeze_vision_tower", "train_projector"), [(True, False), (True, True), (False, False)]
)
def test_vision_tower_and_projector_train_only_when_asked(
    finetuning_type, freeze_vision_tower, train_projector
):
    config = ModelConfig(
        finetuning_type=finetuning_type,
        freeze_vision_tower=freeze_vision_tower,
        train_projector=train_projector,
    )
    model = apply_finetuning(tiny_vlm(), config)
    parts = _parts_of(model)
    flags: dict[str, set[bool]] = {"vision_tower": set(), "projector": set(), "language_model": set()}
    for name, param in unwrap(model).named_parameters():
        name = _base_name(name)
        for part in flags:
            if parts.owns(name, part) and "lora_" not in name:
                flags[part].add(param.requires_grad)
    assert flags["vision_tower"] == {not freeze_vision_tower}
    assert flags["projector"] == {train_projector}
    assert flags["language_model"] == {finetuning_type == "full"}


def test_the_image_reaches_the_model_and_gradients_reach_lora_and_the_projector():
    model = apply_finetuning(tiny_vlm(), ModelConfig(train_projector=True, lora_layers="last:1"))
    model.train()
    parts = _parts_of(model)
    batch = _batch(image_seed=0)
    out = response_forward(model, batch)
    out.loss.backward()
    grads = {_base_name(n): p.grad for n, p in unwrap(model).named_parameters() if p.requires_grad}
    lora = {n: g for n, g in grads.items() if "lora_B" in n}
    projector = {n: g for n, g in grads.items() if parts.owns(n, "projector")}
    assert lora and all(g is not None and g.abs().sum() > 0 for g in lora.values())
    assert projector and all(g is not None and g.abs().sum() > 0 for g in projector.values())
    assert all(p.grad is None for n, p in unwrap(model).named_parameters() if "vision_tower" in n)
    with torch.no_grad():
        other = response_forward(model, _batch(image_seed=1)).loss
        same = response_forward(model, _batch(image_seed=0)).loss
    assert same == pytest.approx(out.loss.item(), abs=1e-6)
    assert abs(other.item() - out.loss.item()) > 1e-4


def test_hidden_states_and_substituted_weights_see_the_image():
    model = apply_finetuning(tiny_vlm(), ModelConfig())
    first, second = _batch(image_seed=0), _batch(image_seed=1)
    assert not torch.allclose(hidden_states(model, first)[-1], hidden_states(model, second)[-1])
    a = forward_with_weights(model, {}, first).logits
    b = forward_with_weights(model, {}, second).logits
    assert not torch.allclose(a, b)


def test_a_trained_projector_is_saved_and_loaded_beside_the_adapters(tmp_path):
    config = ModelConfig(train_projector=True)
    model = apply_finetuning(tiny_vlm(), config)
    with torch.no_grad():
        for param in trainable_parameters(model).values():
            param.add_(0.5)
    save_trainable(model, str(tmp_path / "ckpt"))
    assert os.path.isfile(tmp_path / "ckpt" / BASE_WEIGHTS)
    fresh = apply_finetuning(tiny_vlm(), config)
    load_trainable(fresh, str(tmp_path / "ckpt"))
    want = trainable_parameters(model)
    got = trainable_parameters(fresh)
    assert set(got) == set(want) and any("projector" in n for n in got)
    for name, param in got.items():
        assert torch.equal(param, want[name]), name
    # text models' LoRA checkpoints are unchanged: adapters only
    text = apply_finetuning(tiny_model(), ModelConfig())
    save_trainable(text, str(tmp_path / "text"))
    assert not os.path.exists(tmp_path / "text" / BASE_WEIGHTS)


def test_qwen2_vl_parts_and_forward_with_image_grid():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14)
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=63,
        vision_start_token_id=62,
        vision_end_token_id=61,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    parts = vlm_parts(model)
    assert (parts.vision_tower, parts.projector) == ("model.visual", "model.visual.merger")
    model = apply_finetuning(model, ModelConfig(train_projector=True, lora_layers="last:1"))
    trainable = [_base_name(n) for n in trainable_parameters(model)]
    assert {n for n in trainable if "lora_" not in n} and all(
        parts.owns(n, "projector") for n in trainable if "lora_" not in n
    )
    # one 56x56 image: a 4x4 grid of 14 px patches, merged 2x2 into 4 image tokens
    image = [62, 63, 63, 63, 63, 61]
    features = [
        {"input_ids": [*image, 5, 6, 7, 8], "labels": [IGNORE_INDEX] * 8 + [7, 8]},
        {"input_ids": [*image, 9, 7, 8], "labels": [IGNORE_INDEX] * 7 + [7, 8]},
    ]
    batch = collate(features, pad_token_id=0)
    batch["image_grid_thw"] = torch.tensor([[1, 4, 4], [1, 4, 4]])
    batch["mm_token_type_ids"] = (batch["input_ids"] == 63).long()
    losses = []
    for seed in (0, 1):
        batch["pixel_values"] = torch.randn(
            32, 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed)
        )
        losses.append(response_forward(model, batch).loss)
    # the model's own 3-D rotary positions (left padding included), not the batch's 1-D ones
    own = model(**{k: v for k, v in batch.items() if k not in ("labels", "position_ids")}).logits
    keep = response_window(batch["labels"])
    out = response_forward(model, batch)
    assert torch.allclose(out.logits, own[:, -keep:-1], atol=1e-5)
    losses[0].backward()
    assert abs(losses[0].item() - losses[1].item()) > 1e-5
    assert all(p.grad is not None for p in trainable_parameters(model).values())


def test_text_batches_and_models_are_unchanged():
    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer)
    batch = _batch()
    text_batch = {k: v for k, v in batch.items() if k != "pixel_values"}
    text_batch["input_ids"] = text_batch["input_ids"].clamp(max=len(tokenizer) - 1)
    out = response_forward(model, text_batch)
    labels = text_batch["labels"]
    direct = model(
        input_ids=text_batch["input_ids"],
        attention_mask=text_batch["attention_mask"],
        position_ids=text_batch["position_ids"],
    ).logits[:, -out.keep : -1]
    assert torch.allclose(out.logits, direct, atol=1e-6)
    assert out.labels.shape == labels[:, labels.shape[1] - out.keep + 1 :].shape
