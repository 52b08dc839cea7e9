"""O-LoRA: a new adapter per task, kept orthogonal to the frozen earlier ones, all active at test time."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.methods.olora import OLoRA, OLoRAConfig
from retain.methods.registry import register
from retain.models.adapters import adapter_state, peft_model, trainable_parameters
from retain.training.loop import run_experiment

from .helpers import tiny_config, tiny_context


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
        orth.append(ctx.logged["olora/orth"][-1])
        loss.backward()
        optimizer.step()
    assert orth[0] > 0 and orth[-1] < 0.5 * orth[0]
    assert all(b < a for a, b in zip(orth, orth[1:], strict=False))
    assert ctx.logged["olora/l2"] and ctx.logged["olora/l2"][-1] > 0
    assert all(torch.equal(p, old[n]) for n, p in adapter_state(ctx.model, "default").items())


def test_l2_term_enters_the_loss_when_lamda_2_is_set(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "olora")
    ctx.task_index = 2
    method = OLoRA(OLoRAConfig(lamda_1=0.0, lamda_2=0.5))
    method.before_task(ctx, tasks[1])
    batch = ctx.collate(ctx.encode(tasks[1].train[:2]))
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    assert total.item() > outputs.loss.item() + 0.5 * ctx.logged["olora/l2"][-1] - 1e-4


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
