"""A-GEM: the closed-form projection against the reference gradient of the memory, memory state, a run."""

from __future__ import annotations

import io
import json
import random

import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.agem import AGEM, AGEMConfig, agem_project
from retain.methods.common.episodic import flat_grad, memory_gradient

from ..helpers import set_gradient, tiny_config, tiny_context


def test_the_projection_is_the_closed_form_and_removes_the_conflict():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        ref = torch.randn(50, generator=gen)
        g = torch.randn(50, generator=gen) - ref  # conflicts with ref
        assert g @ ref < 0
        new = agem_project(g, ref)
        assert new is not None and new.dtype == g.dtype
        assert torch.allclose(new, g - (g @ ref) / (ref @ ref) * ref, atol=1e-6)
        assert float(new.double() @ ref.double()) >= -1e-6
        # only the component along ref changes, and it moves toward ref
        change = new - g
        assert float(change @ ref) / float(change.norm() * ref.norm()) > 1 - 1e-5
    assert agem_project(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) is None
    assert agem_project(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) is None  # orthogonal: no conflict


def _agem_after_task_1(tmp_path, **params):
    ctx, tasks = tiny_context(tmp_path, "agem")
    method = AGEM(AGEMConfig(**params))
    method.before_task(ctx, tasks[0])
    method.after_task(ctx, tasks[0], tasks[0].train)
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    return ctx, tasks, method


def _reference(ctx, method, params) -> torch.Tensor:
    """The reference gradient the method used at its last step (same draw, same weights)."""
    rng = ctx.rng(f"agem:step:{method.steps}")
    return memory_gradient(
        ctx, ctx.model, params, method.memory.sample_all(ctx, method.config.memory_batch_size, rng)
    )


def test_a_conflicting_real_gradient_is_replaced_by_the_closed_form_projection(tmp_path):
    ctx, tasks, method = _agem_after_task_1(tmp_path, memory_size=12, memory_batch_size=4)
    parity = ctx.collate(ctx.encode(tasks[0].train[12:16]))
    letters = ctx.collate(ctx.encode(tasks[1].train[:4]))
    params = set_gradient(
        ctx, lambda: ctx.forward(ctx.model, letters).loss - ctx.forward(ctx.model, parity).loss
    )
    g = flat_grad(params)
    method.before_optimizer_step(ctx, ctx.model)
    ref = _reference(ctx, method, params)
    assert g.double() @ ref.double() < 0
    assert ctx.logged["agem/violations"][-1] == 1.0 and ctx.logged["agem/projected"][-1] == 1.0
    new = flat_grad(params)
    expected = (
        g.double() - (g.double() @ ref.double()) / (ref.double() @ ref.double()) * ref.double()
    ).float()
    assert torch.allclose(new, expected, atol=1e-7, rtol=1e-6)
    assert float(new.double() @ ref.double()) >= -1e-6 * float(new.norm() * ref.norm())


def test_a_gradient_that_agrees_with_the_memory_is_left_bitwise_unchanged(tmp_path):
    ctx, tasks, method = _agem_after_task_1(tmp_path, memory_size=4, memory_batch_size=4)
    memory = ctx.collate(method.memory.features(ctx, tasks[0].name))
    params = set_gradient(ctx, lambda: ctx.forward(ctx.model, memory).loss)  # g = g_ref
    before = [p.grad.clone() for p in params]
    method.before_optimizer_step(ctx, ctx.model)
    assert ctx.logged["agem/violations"][-1] == 0.0 and ctx.logged["agem/projected"][-1] == 0.0
    assert float(ctx.logged["agem/dot_min"][-1]) > 0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_the_memory_survives_state_dict_and_load_state_dict(tmp_path):
    ctx, tasks, method = _agem_after_task_1(tmp_path, memory_size=7)
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = AGEM(AGEMConfig(memory_size=7))
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    got, want = restored.memory.tasks[tasks[0].name], method.memory.tasks[tasks[0].name]
    assert len(want) == 7 and [e.to_dict() for e in got] == [e.to_dict() for e in want]
    assert restored.memory.sample_all(ctx, 5, random.Random(2)) == method.memory.sample_all(
        ctx, 5, random.Random(2)
    )


def test_a_two_task_stream_projects_in_task_2(tmp_path):
    raw = tiny_config(tmp_path, "agem", {"memory_size": 16, "memory_batch_size": 4})
    run_experiment(config_from_dict(raw))
    run = tmp_path / "run" / "tasks"
    first = json.loads((run / "1-parity" / "train_log.json").read_text())
    second = json.loads((run / "2-capital_letters" / "train_log.json").read_text())
    assert not any("agem/projected" in entry for entry in first)
    assert max(entry.get("agem/projected", 0.0) for entry in second) > 0
    assert second[-1]["after_task"]["agem/projected_fraction"] > 0
