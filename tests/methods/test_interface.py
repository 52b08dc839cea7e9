"""The method interface: capabilities declared on the class, `components`, one context factory, and
settings that resolve to every field and rebuild the same method."""

from __future__ import annotations

import pytest

from retain.config import config_from_dict
from retain.data.batching import collate
from retain.data.encode import encode_dataset
from retain.data.streams import build_stream
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.registry import available, create_method, resolved_settings
from retain.models.forward import response_forward
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import tiny_config

MODEL_HOOKS = ("eval_model", "eval_routes", "activate_route", "restore")


@pytest.mark.parametrize("name", sorted(available()))
def test_a_method_that_chooses_the_evaluated_model_declares_it(name):
    cls = available()[name]
    overridden = [hook for hook in MODEL_HOOKS if getattr(cls, hook) is not getattr(ContinualMethod, hook)]
    assert cls.decides_eval_model == bool(overridden), (
        f"{name} overrides {overridden or 'none of the evaluation hooks'} but declares "
        f"decides_eval_model = {cls.decides_eval_model}"
    )


def test_components_and_capabilities_of_single_and_combined_methods():
    ewc = create_method("ewc")
    assert ewc.components == [ewc]
    combined = create_method("replay", {"plus": ["ewc"]})
    assert [c.name for c in combined.components] == ["replay", "ewc"]
    assert not combined.decides_eval_model
    routed = create_method("replay", {"plus": ["olora"]})
    assert routed.decides_eval_model and routed.router is routed.components[1]
    assert not routed.supports_full_finetuning  # O-LoRA's adapters need LoRA
    with pytest.raises(RetainError, match="both decide"):
        create_method("olora", {"plus": ["lcia"]})


@pytest.mark.parametrize("name", sorted(n for n in available() if n != "multitask"))
def test_resolved_settings_hold_every_field_and_rebuild_the_same_method(name):
    settings = resolved_settings(create_method(name))
    fields = available()[name].config_cls
    assert set(settings) == ({f for f in fields.__dataclass_fields__} if fields else set())
    assert resolved_settings(create_method(name, settings)) == settings


def test_literal_settings_are_checked_when_the_config_is_read():
    with pytest.raises(RetainError, match="method.template must be one of instruction, masked, first_line"):
        create_method("lcia", {"template": "mask"})
    with pytest.raises(RetainError, match="model.finetuning_type must be one of lora, full"):
        config_from_dict({"stream": {"tasks": ["synthetic:parity"]}, "model": {"finetuning_type": "qlora"}})


def test_the_context_factory_wires_the_training_encoding_batching_and_forward(tmp_path):
    tokenizer = tiny_tokenizer()
    short = config_from_dict(tiny_config(tmp_path, train={"cutoff_len": 24}))
    tasks = build_stream(short)
    with pytest.raises(RetainError, match="cutoff_len=24"):  # the run's cutoff, not a default
        MethodContext.create(tiny_model(tokenizer), tokenizer, short, tasks).encode(tasks[0].train[:3])
    config = config_from_dict(tiny_config(tmp_path))
    ctx = MethodContext.create(tiny_model(tokenizer), tokenizer, config, tasks, bf16=True, task_index=2)
    examples = tasks[0].train[:3]
    features = ctx.encode(examples)
    assert features == encode_dataset(tokenizer, examples, config.train.cutoff_len, source="test")
    batch = ctx.collate(features)
    expected = collate(features, pad_token_id=tokenizer.pad_token_id)
    assert all(batch[key].equal(expected[key]) for key in expected)
    assert ctx.forward is response_forward and ctx.bf16 and ctx.task is tasks[1]
