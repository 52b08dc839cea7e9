"""Mechanism tests: each method's effect is visible, not only that it runs."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.errors import RetainError
from retain.methods.base import ContinualMethod
from retain.methods.common.memory import reservoir_sample
from retain.methods.ewc import EWC, EWCConfig
from retain.methods.lwf import LwF, LwFConfig
from retain.methods.registry import available, create_method, register
from retain.methods.replay import Replay, ReplayConfig
from retain.models.adapters import snapshot_trainable, trainable_parameters

from ..helpers import tiny_config, tiny_context, train_one_task


def _adapter(run_dir, index, name):
    return load_file(
        os.path.join(run_dir, "tasks", f"{index}-{name}", "adapter", "adapter_model.safetensors")
    )


def _distance(a: dict, b: dict) -> float:
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_registry_lists_the_methods_and_suggests_close_names():
    assert {"sequential", "multitask", "replay", "ewc", "lwf"} <= set(available())
    with pytest.raises(RetainError, match="did you mean: replay"):
        create_method("replya")
    with pytest.raises(RetainError, match="unknown key 'method.ewc_lamda'.*did you mean: ewc_lambda"):
        create_method("ewc", {"ewc_lamda": 1.0})


def test_sequential_trains_one_adapter_on_through_the_stream(tmp_path):
    results = run_experiment(config_from_dict(tiny_config(tmp_path)))
    run = str(tmp_path / "run")
    init, first, second = (
        _adapter(run, 0, "init"),
        _adapter(run, 1, "parity"),
        _adapter(run, 2, "capital_letters"),
    )
    assert _distance(init, first) > 0 and _distance(first, second) > 0
    assert len(results["matrix"]) == 3 and all(len(row) == 2 for row in results["matrix"])


def test_multitask_trains_once_on_all_tasks_and_evaluates_one_row(tmp_path):
    results = run_experiment(config_from_dict(tiny_config(tmp_path, "multitask")))
    assert len(results["matrix"]) == 2
    assert results["metrics"]["bwt"] is None and results["metrics"]["last"] is not None
    assert os.path.isdir(tmp_path / "run" / "tasks" / "1-multitask")


def test_reservoir_sample_is_uniform_and_sized():
    import random

    counts = [0] * 10
    for seed in range(2000):
        for item in reservoir_sample(list(range(10)), 3, random.Random(seed)):
            counts[item] += 1
    assert all(abs(c / 2000 - 0.3) < 0.05 for c in counts)


def test_replay_mixes_task1_samples_into_task2_batches_in_the_configured_proportion(tmp_path):
    seen: list[str] = []

    @register("_spy_replay", config=ReplayConfig)
    class SpyReplay(Replay):
        def loss(self, ctx, model, batch, outputs):
            if ctx.task_index == 2:
                for ids in batch["input_ids"]:
                    seen.append(ctx.tokenizer.decode(ids, skip_special_tokens=True))
            return super().loss(ctx, model, batch, outputs)

    params = {"memory_size": 8, "replay_ratio": 0.25}
    # 32 task-2 examples + round(0.25/0.75 * 32) = 11 replayed = 43; 11 steps of 4 cover one epoch.
    config = config_from_dict(tiny_config(tmp_path, "_spy_replay", params, train={"max_steps": 11}))
    run_experiment(config, evaluate=False)
    task1 = [s for s in seen if "even or odd" in s.lower()]
    # One epoch of the 43 mixed examples: 11 batches, the last one of 3.
    assert len(seen) == 43
    assert len(task1) == 11
    assert abs(len(task1) / len(seen) - 0.25) < 0.01


def test_replay_memory_survives_a_checkpoint(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "replay", {"memory_size": 5})
    method = Replay(ReplayConfig(memory_size=5))
    method.after_task(ctx, tasks[0], tasks[0].train)
    restored = Replay(ReplayConfig(memory_size=5))
    restored.load_state_dict(method.state_dict())
    assert [e.reference for _, e in restored.memory["parity"]] == [
        e.reference for _, e in method.memory["parity"]
    ]
    assert len(restored.memory["parity"]) == 5


def test_ewc_penalty_has_a_gradient_that_points_back_to_the_anchor(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "ewc")
    method = EWC(EWCConfig(ewc_lambda=10.0, fisher_samples=8))
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert method.fisher and all(torch.isfinite(f).all() for f in method.fisher.values())
    assert sum(float(f.sum()) for f in method.fisher.values()) > 0
    params = trainable_parameters(ctx.model)
    with torch.no_grad():
        for p in params.values():
            p.add_(0.05 * torch.randn_like(p))
    before = _distance(snapshot_trainable(ctx.model), method.anchor)
    penalty = method.penalty(ctx.model)
    assert penalty.item() > 0
    penalty.backward()
    grads = {n: p.grad for n, p in params.items() if p.grad is not None}
    assert grads and sum(float(g.abs().sum()) for g in grads.values()) > 0
    # -grad has a positive dot product with (theta* - theta): the penalty pulls weights back.
    pull = sum(float((-g * (method.anchor[n] - params[n].detach())).sum()) for n, g in grads.items())
    assert pull > 0
    with torch.no_grad():
        for n, g in grads.items():
            params[n].sub_(1e-3 * g)
    assert _distance(snapshot_trainable(ctx.model), method.anchor) < before


def test_ewc_accumulates_the_fisher_online(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "ewc")
    method = EWC(EWCConfig(fisher_samples=4, gamma=0.5))
    method.after_task(ctx, tasks[0], tasks[0].train)
    first = {n: f.clone() for n, f in method.fisher.items()}
    ctx.task_index = 2
    method.after_task(ctx, tasks[1], tasks[1].train)
    # F = 0.5 * F_1 + F_2: every entry at least the decayed old one, and the new task adds to the total.
    assert all(torch.all(method.fisher[n] >= 0.5 * first[n] - 1e-12) for n in first)
    old_total = sum(float(f.sum()) for f in first.values())
    assert sum(float(f.sum()) for f in method.fisher.values()) > 0.5 * old_total * 1.01


def test_ewc_with_a_huge_lambda_keeps_task1_weights_in_place(tmp_path):
    """The Fisher-weighted movement of the weights during task 2 (what EWC bounds) nearly vanishes.

    Under Adam, parameters with a near-zero Fisher still move freely, as they should; the ones that
    matter for task 1 are held.
    """
    moved = {}
    for name, lam in (("free", 0.0), ("held", 1e9)):
        out = tmp_path / name
        config = config_from_dict(
            tiny_config(out, "ewc", {"ewc_lambda": lam, "fisher_samples": 16}, train={"max_steps": 12})
        )
        run_experiment(config, evaluate=False)
        run = str(out / "run")
        fisher = torch.load(os.path.join(run, "tasks", "1-parity", "method_state.pt"))["fisher"]
        first, second = _adapter(run, 1, "parity"), _adapter(run, 2, "capital_letters")
        # PEFT's saved keys drop the adapter name that the live parameter names carry.
        moved[name] = sum(
            float((f * (first[n.replace(".default", "")] - second[n.replace(".default", "")]) ** 2).sum())
            for n, f in fisher.items()
        )
    assert moved["free"] > 0
    assert moved["held"] < 0.05 * moved["free"]


def test_lwf_kl_is_zero_at_the_first_step_and_positive_after_updates(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "lwf")
    method = LwF(LwFConfig(temperature=2.0))
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    batch = ctx.collate(ctx.encode(tasks[1].train[:4]))
    outputs = ctx.forward(ctx.model, batch)
    method.loss(ctx, ctx.model, batch, outputs)
    assert ctx.logged["lwf/kl"][-1] == pytest.approx(0.0, abs=1e-6)
    optimizer = torch.optim.SGD(list(trainable_parameters(ctx.model).values()), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        ctx.forward(ctx.model, batch).loss.backward()
        optimizer.step()
    outputs = ctx.forward(ctx.model, batch)
    total = method.loss(ctx, ctx.model, batch, outputs)
    assert ctx.logged["lwf/kl"][-1] > 1e-4
    assert total.item() > outputs.loss.item()
    # The teacher is computed on the fly; nothing of vocabulary size is stored.
    assert all(
        t.shape == p.shape
        for t, p in zip(method.teacher.values(), trainable_parameters(ctx.model).values(), strict=True)
    )


class _PenaltyOnly(ContinualMethod):
    """A method whose loss is only a fixed quadratic penalty, to see how often it is counted."""

    def __init__(self):
        super().__init__()
        self.grads = []

    def loss(self, ctx, model, batch, outputs):
        params = trainable_parameters(model)
        return 0.0 * outputs.loss + sum((p.float() ** 2).sum() for p in params.values())

    def before_optimizer_step(self, ctx, model):
        self.grads.append(
            {n: p.grad.clone() for n, p in trainable_parameters(model).items() if p.grad is not None}
        )


@pytest.mark.parametrize("accumulation", [1, 4])
def test_gradient_accumulation_counts_a_penalty_once_per_optimizer_step(tmp_path, accumulation):
    ctx, tasks = tiny_context(tmp_path)
    method = _PenaltyOnly()
    with torch.no_grad():
        for p in trainable_parameters(ctx.model).values():
            p.fill_(0.1)
    train_one_task(
        ctx,
        tasks,
        method,
        tmp_path / "t",
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.0,
        max_grad_norm=0.0,
    )
    (grads,) = method.grads
    # d/dp sum p^2 = 2p = 0.2, whatever the number of micro-batches.
    assert all(torch.allclose(g, torch.full_like(g, 0.2)) for g in grads.values())


class _GradientSpy(ContinualMethod):
    """Records the gradient norm the hook sees, to check it runs once per step and before clipping."""

    def __init__(self):
        super().__init__()
        self.norms = []

    def before_optimizer_step(self, ctx, model):
        grads = [p.grad for p in trainable_parameters(model).values() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_before_optimizer_step_runs_once_per_step_on_the_unclipped_gradient(tmp_path, max_grad_norm):
    ctx, tasks = tiny_context(tmp_path)
    method = _GradientSpy()
    train_one_task(
        ctx,
        tasks,
        method,
        tmp_path / "t",
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=0.0,
        max_grad_norm=max_grad_norm,
    )
    assert len(method.norms) == 3
    # A tiny clipping threshold would show as norms of 1e-3 if the hook ran after clipping.
    assert all(n > 10 * 1e-3 for n in method.norms)
