"""model.dtype, model.attn_implementation, train.gradient_checkpointing, DoRA and rsLoRA on tiny models."""

from __future__ import annotations

import pytest
import torch

from retain.config import ModelConfig
from retain.errors import RetainError
from retain.models import loading
from retain.models.adapters import (
    add_adapter,
    apply_finetuning,
    peft_model,
    snapshot_trainable,
    trainable_parameters,
)
from retain.models.tiny import tiny_model, tiny_tokenizer


def saved_tiny(folder) -> str:
    tiny_model(seed=1).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_weights_load_in_model_dtype_and_lora_stays_float32(tmp_path, dtype):
    folder = saved_tiny(tmp_path / "model")
    config = ModelConfig(name_or_path=folder, dtype=dtype)
    model, _, _ = loading.load_model(folder, config)
    want = getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    model = apply_finetuning(model, config)
    add_adapter(model, "second")  # methods add adapters later (O-LoRA, I-LoRA, ...): float32 too
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and {p.dtype for p in lora.values()} == {torch.float32}
    assert {p.dtype for n, p in model.named_parameters() if "lora_" not in n} == {want}
    assert {t.dtype for t in snapshot_trainable(model).values()} == {torch.float32}


def test_tiny_random_follows_the_dtype_too():
    model, _, _ = loading.load_model("tiny-random", ModelConfig(name_or_path="tiny-random", dtype="bfloat16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    default, _, _ = loading.load_model("tiny-random")  # no config: float32, as before
    assert {p.dtype for p in default.parameters()} == {torch.float32}


def test_auto_dtype_is_bfloat16_where_the_hardware_has_it(monkeypatch):
    monkeypatch.setattr(loading, "bf16_supported", lambda: True)
    assert loading.weights_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(loading, "bf16_supported", lambda: False)
    assert loading.weights_dtype("auto") == torch.float32
    assert loading.weights_dtype("float16") == torch.float16


def test_full_fine_tuning_of_float16_weights_is_refused():
    with pytest.raises(RetainError, match="float16.*loss scaling"):
        loading.check_model(ModelConfig(name_or_path="tiny-random", dtype="float16", finetuning_type="full"))


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_the_attention_implementation_reaches_the_model(tmp_path, kernel):
    folder = saved_tiny(tmp_path / "model")
    model, _, _ = loading.load_model(folder, ModelConfig(name_or_path=folder, attn_implementation=kernel))
    assert model.config._attn_implementation == kernel
    tiny, _, _ = loading.load_model("tiny-random", ModelConfig(attn_implementation=kernel))
    assert tiny.config._attn_implementation == kernel


def test_an_unknown_or_unavailable_attention_implementation_is_a_clear_error(monkeypatch):
    with pytest.raises(RetainError, match="'flash' is not one of eager, sdpa, flash_attention_2"):
        loading.load_model("tiny-random", ModelConfig(attn_implementation="flash"))
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RetainError, match="flash_attention_2 needs the package 'flash_attn'.*use sdpa"):
        loading.check_model(ModelConfig(attn_implementation="flash_attention_2"))


def _gradients(config: ModelConfig, checkpointing: bool, batch) -> tuple[dict, int]:
    """Gradients of one training step of a fresh tiny model, and how often decoder layer 0's attention
    started (transformers checkpoints a layer's forward, inside the layer's own hooks; torch's recompute
    stops early once it has what the backward needs, so a pre-hook on the first module sees it)."""
    model = apply_finetuning(tiny_model(seed=2), config, gradient_checkpointing=checkpointing)
    model.train()
    calls = []
    layers = peft_model(model).get_base_model() if config.finetuning_type == "lora" else model
    layers.model.layers[0].self_attn.register_forward_pre_hook(lambda *args: calls.append(1))
    model(**batch, labels=batch["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in trainable_parameters(model).items()}, len(calls)


@pytest.mark.parametrize(
    "config",
    [ModelConfig(), ModelConfig(lora_layers="last:1"), ModelConfig(finetuning_type="full")],
    ids=["lora", "lora-last-layer", "full"],
)
def test_gradient_checkpointing_gives_the_same_gradients(config):
    batch = tiny_tokenizer()(["the quick brown fox", "count the letters"], return_tensors="pt", padding=True)
    plain, plain_calls = _gradients(config, False, batch)
    checked, checked_calls = _gradients(config, True, batch)
    if config.lora_layers == "last:1":
        # the frozen layer below the LoRA runs once: nothing there needs gradients, so no recompute
        assert plain_calls == checked_calls == 1
    else:
        assert (plain_calls, checked_calls) == (1, 2)  # the backward pass ran layer 0 again
    assert plain.keys() == checked.keys() and plain
    for name, grad in plain.items():
        torch.testing.assert_close(checked[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_checkpointing_keeps_the_backward_pass_above_the_lora_layers():
    model = apply_finetuning(tiny_model(), ModelConfig(lora_layers="last:1"), gradient_checkpointing=True)
    model.train()
    seen = []
    base = peft_model(model).get_base_model()
    base.model.layers[0].register_forward_hook(lambda module, args, out: seen.append(out))
    model(input_ids=torch.tensor([[5, 6, 7]]))
    hidden = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
    assert not hidden.requires_grad  # layer 0 has no LoRA: no gradient flows through it


def test_dora_and_rslora_reach_the_lora_config():
    config = ModelConfig(lora_rank=4, lora_alpha=8, use_dora=True, use_rslora=True)
    model = peft_model(apply_finetuning(tiny_model(), config))
    lora = model.peft_config["default"]
    assert lora.use_dora and lora.use_rslora
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "default" in layer.lora_magnitude_vector  # DoRA's magnitude vector
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    plain = peft_model(apply_finetuning(tiny_model(), ModelConfig(lora_rank=4, lora_alpha=8)))
    plain_layer = plain.get_base_model().model.layers[0].self_attn.q_proj
    assert plain_layer.scaling["default"] == pytest.approx(2.0) and not plain_layer.lora_magnitude_vector
