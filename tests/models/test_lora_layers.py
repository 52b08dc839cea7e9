"""`model.lora_layers`: LoRA on a chosen set of decoder layers, so the backward pass can stop early."""

from __future__ import annotations

import pytest
import torch

from retain.config import ModelConfig
from retain.errors import RetainError
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer


def _layers_with_lora(model) -> set[int]:
    return {int(name.split(".layers.")[1].split(".")[0]) for name in trainable_parameters(model)}


@pytest.mark.parametrize(("spec", "layers"), [("all", {0, 1}), ("last:1", {1}), ("0", {0}), ("0,1", {0, 1})])
def test_lora_goes_on_the_named_layers_only(spec, layers):
    model = apply_finetuning(
        tiny_model(tiny_tokenizer()), ModelConfig(lora_target="all-linear", lora_layers=spec)
    )
    assert _layers_with_lora(model) == layers
    # all-linear on a subset of layers covers the same module kinds as on every layer
    kinds = {name.split(".")[-4] for name in trainable_parameters(model)}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= kinds


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_the_backward_pass_stops_below_the_lowest_adapted_layer():
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), ModelConfig(lora_layers="last:1"))
    reached: list[int] = []
    layers = model.base_model.model.model.layers
    for index, layer in enumerate(layers):
        layer.register_full_backward_hook(lambda module, g_in, g_out, i=index: reached.append(i))
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert reached == [1]


def test_layers_the_model_lacks_are_refused():
    with pytest.raises(RetainError, match="it has 2"):
        apply_finetuning(tiny_model(tiny_tokenizer()), ModelConfig(lora_layers="last:3"))
    with pytest.raises(RetainError, match="it has 2"):
        apply_finetuning(tiny_model(tiny_tokenizer()), ModelConfig(lora_layers="0,5"))
