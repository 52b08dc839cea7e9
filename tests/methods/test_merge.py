"""The merge method: an adapter per task, trained alone; the evaluated model is the merge of all of them."""

from __future__ import annotations

import os

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.common.task_vectors import lora_task_vector, merge_task_vectors
from retain.methods.merge import MERGED, Merge, MergeConfig
from retain.models.adapters import adapter_names, peft_model, trainable_parameters
from retain.models.tiny import tiny_model

from ..helpers import tiny_config, tiny_context

THREE_TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:max_number"]


def randomise(model, adapter: str, seed: int) -> None:
    """Stand-in for training: give `adapter` a non-zero update."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.normal_(std=0.2)


def three_tasks_of_hooks(tmp_path, config: MergeConfig):
    """Run the method's hooks through 3 tasks without training; returns (ctx, tasks, method, vectors)."""
    ctx, tasks = tiny_context(tmp_path, "merge")
    method = Merge(config)
    vectors = []
    for index in (1, 2, 3):
        ctx.task_index = index
        method.before_task(ctx, tasks[0])
        name = "default" if index == 1 else f"task{index}"
        randomise(ctx.model, name, index)
        vectors.append(lora_task_vector(ctx.model, name))
        method.after_task(ctx, tasks[0], [])
        method.eval_model(ctx, tasks[0])  # evaluation between tasks, as the loop does
    return ctx, tasks, method, vectors


def test_each_task_trains_a_fresh_adapter_alone(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "merge")
    method = Merge(MergeConfig(start="base"))
    method.before_task(ctx, tasks[0])
    randomise(ctx.model, "default", 0)
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    inner = peft_model(ctx.model)
    assert inner.active_adapters == ["task2"]
    assert all(".task2." in n for n in trainable_parameters(ctx.model))
    assert all(float(v.abs().max()) == 0 for v in lora_task_vector(ctx.model, "task2").values())  # from base


def test_sequential_start_copies_the_previous_adapter(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "merge")
    method = Merge(MergeConfig(start="sequential"))
    method.before_task(ctx, tasks[0])
    randomise(ctx.model, "default", 0)
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    first, second = lora_task_vector(ctx.model, "default"), lora_task_vector(ctx.model, "task2")
    assert all(torch.equal(second[n], first[n]) for n in first)


def test_the_merge_after_task_3_uses_all_three_task_vectors(tmp_path):
    ctx, tasks, method, vectors = three_tasks_of_hooks(tmp_path, MergeConfig(how="task_arithmetic"))
    merged = lora_task_vector(ctx.model, MERGED)
    for name, value in merged.items():
        want = (vectors[0][name] + vectors[1][name] + vectors[2][name]) / 3  # lam defaults to 1/T
        assert torch.allclose(value, want, atol=1e-6)
    assert peft_model(ctx.model).active_adapters == [MERGED]
    # The next task trains without the merged adapter, which is never checkpointed.
    ctx.task_index = 4
    method.before_task(ctx, tasks[0])
    assert MERGED not in adapter_names(ctx.model)


def test_the_evaluated_model_is_the_base_plus_the_merged_weights(tmp_path):
    ctx, tasks, method, vectors = three_tasks_of_hooks(tmp_path, MergeConfig(how="ties", density=0.3))
    model = method.eval_model(ctx, tasks[0])
    merged = merge_task_vectors(vectors, "ties", density=0.3)
    # A plain model with W0 + merged Delta W written into its linear layers answers identically.
    reference = tiny_model(ctx.tokenizer)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, delta in merged.items():
            modules[name.removeprefix("base_model.model.")].weight.add_(delta)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # and it is not the last task's model
        peft_model(ctx.model).base_model.set_adapter(["task3"])
        assert not torch.allclose(ctx.model(input_ids=ids).logits, want, atol=1e-3)


def test_a_three_task_run_keeps_each_task_s_adapter_and_merges_them_all(tmp_path, monkeypatch):
    merged_rows = []
    real = Merge.build_merged

    def spy(self, ctx):
        adapters = real(self, ctx)
        merged_rows.append(adapters)
        return adapters

    monkeypatch.setattr(Merge, "build_merged", spy)
    raw = tiny_config(tmp_path, "merge", {"how": "task_arithmetic"}, stream={"tasks": THREE_TASKS})
    results = run_experiment(config_from_dict(raw))
    assert merged_rows == [["default"], ["default", "task2"], ["default", "task2", "task3"]]
    last = os.path.join(raw["output_dir"], "tasks", "3-max_number", "adapter")
    assert sorted(e for e in os.listdir(last) if os.path.isdir(os.path.join(last, e))) == ["task2", "task3"]
    assert os.path.isfile(os.path.join(last, "adapter_model.safetensors"))  # 'default'
    assert len(results["matrix"]) == 4 and all(row is not None for row in results["matrix"][1:])


def test_bad_settings_name_the_field():
    with pytest.raises(Exception, match="density in"):
        MergeConfig(density=0.0)
    with pytest.raises(Exception, match="how"):
        MergeConfig(how="average")  # type: ignore[arg-type]
