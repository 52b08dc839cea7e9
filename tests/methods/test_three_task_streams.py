"""Streams of three tasks, where the mechanism depends on the number of earlier tasks: GEM has one
constraint per earlier task, replay draws from every earlier task's memory, EWC accumulates one
Fisher per task. A two-task stream cannot tell these apart from a method that only looks at one task."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.methods import gem as gem_module
from retain.methods.base import MethodContext
from retain.methods.common.episodic import flat_grad, memory_gradient, write_flat_grad
from retain.methods.ewc import EWC, EWCConfig
from retain.methods.gem import GEM, GEMConfig
from retain.methods.replay import Replay, ReplayConfig
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import set_gradient, tiny_config

TASKS = ["synthetic:parity", "synthetic:capital_letters", "synthetic:reverse"]


def _three_task_context(tmp_path, method: str, params: dict | None = None):
    """(ctx, tasks) as helpers.tiny_context builds them, on a stream of three tasks."""
    config = config_from_dict(tiny_config(tmp_path, method, params, stream={"tasks": TASKS}))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    tasks = build_stream(config)
    assert len(tasks) == 3
    return MethodContext.create(model, tokenizer, config, tasks, task_index=1), tasks


def _perturb(ctx, seed: int) -> None:
    """Move every trainable weight, as training would (LoRA's B starts at zero, so A's gradient would
    vanish without it)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(ctx.model).values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# --- GEM: one constraint per earlier task ---------------------------------------------------------


@pytest.mark.parametrize("conflicting", [0, 1], ids=["conflicts-with-task-1", "conflicts-with-task-2"])
def test_gem_in_task_3_keeps_the_gradient_in_the_cone_of_both_earlier_tasks(
    tmp_path, monkeypatch, conflicting
):
    ctx, tasks = _three_task_context(tmp_path, "gem")
    # memory_batch_size >= memory_size: every memory gradient is over the task's whole memory
    method = GEM(GEMConfig(memory_size=4, memory_batch_size=4))
    _perturb(ctx, seed=0)
    for index, task in enumerate(tasks[:2], start=1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    assert list(method.memory.tasks) == ["parity", "capital_letters"]
    ctx.task_index = 3
    method.before_task(ctx, tasks[2])

    params = list(trainable_parameters(ctx.model).values())
    G = torch.stack(
        [memory_gradient(ctx, ctx.model, params, method.memory.features(ctx, t)) for t in method.memory.tasks]
    ).double()
    # a raw gradient that conflicts with one earlier task's memory gradient and agrees with the other's
    c, o = G[conflicting], G[1 - conflicting]
    u = c - (c @ o) / (o @ o) * o  # the part of c orthogonal to o
    beta = 0.1 * (u @ u) / (o.norm() * c.norm())
    raw = -u + beta * o
    dots = G @ raw
    assert dots[conflicting] < 0 < dots[1 - conflicting]
    assert float(u.norm()) > 1e-3 * float(c.norm())  # the two memory gradients are not collinear
    write_flat_grad(params, raw.float())

    seen = []
    real = gem_module.project_to_cone

    def spy(g, G, *args, **kwargs):
        seen.append(G.detach().clone())
        return real(g, G, *args, **kwargs)

    monkeypatch.setattr(gem_module, "project_to_cone", spy)
    method.before_optimizer_step(ctx, ctx.model)
    after = flat_grad(params).double()

    # the projected gradient agrees with EACH earlier task's memory gradient (up to rounding)
    cosines = (G @ after) / (G.norm(dim=1) * after.norm())
    assert cosines.min() >= -1e-6, f"projected gradient still conflicts: cosines {cosines.tolist()}"
    assert ctx.logged["gem/projected"] == [1.0]
    assert ctx.logged["gem/violations"] == [1]
    # the QP was built from two memory gradients, one per earlier task, in the order learned
    assert len(seen) == 1 and seen[0].shape == G.shape, f"constraint matrix {tuple(seen[0].shape)}"
    assert torch.allclose(seen[0].double(), G, rtol=1e-5, atol=1e-8)


# --- replay: an even draw over every earlier task's memory -----------------------------------------


def test_replay_in_task_3_draws_from_the_memories_of_task_1_and_task_2_evenly(tmp_path):
    ctx, tasks = _three_task_context(tmp_path, "replay", {"memory_size": 8, "replay_ratio": 0.25})
    method = Replay(ReplayConfig(memory_size=8, replay_ratio=0.25))
    for index, task in enumerate(tasks, start=1):
        ctx.task_index = index
        data = method.training_data(ctx, task, task.train)
        if index == 3:
            break
        method.after_task(ctx, task, data)
    assert len(task.train) == 32
    # 32 task-3 examples + round(0.25 / 0.75 * 32) = 11 replayed: 6 from task 1 (the remainder goes
    # to the first memory), 5 from task 2
    assert len(data) == 43 and data[:32] == task.train
    replayed = data[32:]
    assert Counter(e.meta["replayed_from"] for e in replayed) == {"parity": 6, "capital_letters": 5}
    for name in ("parity", "capital_letters"):
        memory = [e.messages for _, e in method.memory[name]]
        assert len(memory) == 8
        # task 2's memory holds only task 2's own examples, not the ones replayed from task 1
        tasks_in_memory = Counter(e.meta["task"] for _, e in method.memory[name])
        assert tasks_in_memory == {name: 8}, f"memory of {name} holds {dict(tasks_in_memory)}"
        drawn = [e.messages for e in replayed if e.meta["replayed_from"] == name]
        assert all(m in memory for m in drawn) and len({str(m) for m in drawn}) == len(drawn)
    # the replayed share of task 3's training set is the configured ratio, to rounding
    assert len(replayed) / len(data) == pytest.approx(0.25, abs=0.5 / len(data))


# --- EWC: the Fisher is the mean squared per-example gradient, accumulated online ------------------


def _hand_fisher(ctx, examples) -> dict[str, torch.Tensor]:
    """Mean over the examples of the squared gradient of each example's answer log-likelihood (the sum
    over its answer tokens: the token-mean loss times the number of answer tokens)."""
    names = list(trainable_parameters(ctx.model))
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in trainable_parameters(ctx.model).items()}
    for example in examples:
        batch = ctx.collate(ctx.encode([example]))
        tokens = int((batch["labels"] != -100).sum())
        params = set_gradient(ctx, lambda batch=batch, n=tokens: ctx.forward(ctx.model, batch).loss * n)
        for n, p in zip(names, params, strict=True):
            total[n] += p.grad.double() ** 2
            p.grad = None
    return {n: t / len(examples) for n, t in total.items()}


def test_ewc_fisher_is_the_mean_squared_per_example_gradient_accumulated_with_gamma(tmp_path):
    ctx, tasks = _three_task_context(tmp_path, "ewc")
    gamma = 0.5
    # fisher_samples >= the data: every example enters the estimate (the mean ignores their order)
    method = EWC(EWCConfig(ewc_lambda=1.0, gamma=gamma, fisher_samples=64))
    expected: dict[str, torch.Tensor] = {}
    for index, task in enumerate(tasks, start=1):
        ctx.task_index = index
        _perturb(ctx, seed=index)  # the weights each task ends with
        data = task.train[:5]
        own = _hand_fisher(ctx, data)
        assert all(float(f.max()) > 0 for f in own.values())  # every parameter has a gradient
        method.after_task(ctx, task, data)
        # online EWC: F <- gamma * F + F_t
        expected = {n: own[n] if n not in expected else gamma * expected[n] + own[n] for n in own}
        assert set(method.fisher) == set(expected)
        for name, want in expected.items():
            got = method.fisher[name].double()
            scale = float(want.abs().max())
            error = float((got - want).abs().max())
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * scale), (
                f"task {index}, {name}: Fisher off by {error:.3g} (scale {scale:.3g})"
            )
        # the anchor is the weights the task ended with
        for name, p in trainable_parameters(ctx.model).items():
            assert torch.equal(method.anchor[name], p.detach().float())
