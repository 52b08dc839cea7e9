"""O-LoRA: a new adapter per task, kept orthogonal to the frozen earlier ones, all active at test time."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.common.penalties import adapter_norm
from retain.methods.olora import OLoRA, OLoRAConfig
from retain.methods.registry import register
from retain.models.adapters import adapter_state, peft_model, trainable_parameters

from ..helpers import tiny_config, tiny_context


def test_orthogonality_term_shrinks_while_training_task2_and_only_the_new_adapter_learns(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "olora")
    method = OLoRA(OLoRAConfig(lamda_1=10.0, lamda_2=0.0))
    method.before_task(ctx, tasks[0])
    assert method.orthogonality() is None  # task 1: nothing to be orthogonal to
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    assert peft_model(ctx.model).active_adapters == ["default", "task2"]
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "task2"))
    old = {n: p.detach().clone() for n, p in adapter_state(ctx.model, "default").items()}
    batch = ctx.collate(ctx.encode(tasks[1].train[:4]))
    optimizer = torch.optim.Adam(list(trainable_parameters(ctx.model).values()), lr=1e-2)
    orth = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = method.loss(ctx, ctx.model, batch, ctx.forward(ctx.model, batch))
        orth.append(float(ctx.logged["olora/orth"][-1]))
        loss.backward()
        optimizer.step()
    assert orth[0] > 0 and orth[-1] < 0.5 * orth[0]
    assert all(b < a for a, b in zip(orth, orth[1:], strict=False))
    assert "olora/l2" not in ctx.logged  # lamda_2 = 0: the norm is not even computed
    assert all(torch.equal(p, old[n]) for n, p in adapter_state(ctx.model, "default").items())


def test_l2_term_enters_the_loss_when_lamda_2_is_set(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "olora")
    ctx.task_index = 2
    method = OLoRA(OLoRAConfig(lamda_1=0.0, lamda_2=0.5))
    method.before_task(ctx, tasks[1])
    batch = ctx.collate(ctx.encode(tasks[1].train[:2]))
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    l2 = float(ctx.logged["olora/l2"][-1])
    assert l2 == pytest.approx(float(adapter_norm(ctx.model, "task2").detach()), rel=1e-6) and l2 > 0
    assert float(total.detach()) == pytest.approx(float(outputs.loss.detach()) + 0.5 * l2, rel=1e-6)


def test_the_trainable_adapter_is_the_task_s_own_whatever_the_adapter_order(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "olora")
    method = OLoRA()
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    # a checkpoint may list the adapters in another order; the task index decides which one trains
    peft_model(ctx.model).base_model.set_adapter(["task2", "default"])
    ctx.task_index = 1
    method.restore(ctx)
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "default"))
    ctx.task_index = 2
    method.restore(ctx)
    assert set(trainable_parameters(ctx.model)) == set(adapter_state(ctx.model, "task2"))
    assert set(peft_model(ctx.model).active_adapters) == {"default", "task2"}


ACTIVE_AT_EVAL: list[list[str]] = []


@register("_spy_olora", config=OLoRAConfig)
class SpyOLoRA(OLoRA):
    def eval_model(self, ctx, task):
        model = super().eval_model(ctx, task)
        ACTIVE_AT_EVAL.append(list(peft_model(model).active_adapters))
        return model


def test_earlier_adapters_stay_bitwise_frozen_and_all_are_active_at_evaluation(tmp_path):
    ACTIVE_AT_EVAL.clear()
    results = run_experiment(config_from_dict(tiny_config(tmp_path, "_spy_olora", {"lamda_1": 1.0})))
    tasks = os.path.join(tmp_path, "run", "tasks")
    first = load_file(os.path.join(tasks, "1-parity", "adapter", "adapter_model.safetensors"))
    second_dir = os.path.join(tasks, "2-capital_letters", "adapter")
    second = load_file(os.path.join(second_dir, "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)  # 'default' untouched by task 2
    new = load_file(os.path.join(second_dir, "task2", "adapter_model.safetensors"))
    assert any(float(v.abs().sum()) > 0 for k, v in new.items() if "lora_B" in k)  # task 2's adapter learned
    assert not os.path.exists(os.path.join(tasks, "1-parity", "adapter", "task2"))
    # rows 0 and 1 evaluate 'default' alone, row 2 both adapters, for each of the 2 tasks
    assert ACTIVE_AT_EVAL == [["default"]] * 4 + [["default", "task2"]] * 2
    assert len(results["matrix"]) == 3
