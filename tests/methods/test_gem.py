"""GEM: the dual QP, the projection (no previous task's memory loss may increase), memory state, a run."""

from __future__ import annotations

import io
import itertools
import json
import random

import pytest
import torch

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.common.episodic import flat_grad, memory_gradient
from retain.methods.gem import GEM, GEMConfig, project_to_cone, solve_box_qp

from ..helpers import set_gradient, tiny_config, tiny_context


def _brute_force_box_qp(P: torch.Tensor, q: torch.Tensor, lower: float) -> torch.Tensor:
    """Every active set of the 2-variable problem: the best feasible point satisfying its KKT conditions."""
    best, best_value = None, float("inf")
    for free in itertools.product([False, True], repeat=2):
        v = torch.full((2,), lower, dtype=torch.float64)
        idx = [i for i in range(2) if free[i]]
        if idx:
            fixed = [i for i in range(2) if not free[i]]
            rhs = -q[idx] - P[idx][:, fixed] @ v[fixed]
            v[idx] = torch.linalg.solve(P[idx][:, idx], rhs)
        if (v < lower - 1e-12).any():
            continue
        value = float(0.5 * v @ P @ v + q @ v)
        if value < best_value:
            best, best_value = v, value
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lower", [0.0, 0.5])
def test_the_qp_solver_matches_the_brute_force_solution_of_a_2x2_problem(seed, lower):
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(5, generator=gen, dtype=torch.float64) - 2.0 * G[seed % 2]  # conflicts with one row
    P, q = G @ G.T, G @ g
    v, sweeps, converged = solve_box_qp(P.tolist(), q.tolist(), lower, damping=1e-3)
    assert converged and sweeps < 500
    assert torch.allclose(torch.tensor(v, dtype=torch.float64), _brute_force_box_qp(P, q, lower), atol=1e-9)


def test_the_qp_solver_handles_a_vanishing_and_two_collinear_memory_gradients():
    a = torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    G = torch.stack([a, 2 * a, torch.zeros(3, dtype=torch.float64)])
    g = torch.tensor([-1.0, 0.0, 3.0], dtype=torch.float64)
    new, v, _, converged = project_to_cone(g, G, margin=0.0, eps=1e-3)
    assert converged and all(x >= 0 for x in v)
    # the projection of g onto {x: <x, a> >= 0}, whatever the split of v between the collinear rows
    assert torch.allclose(new, g - (g @ a) / (a @ a) * a, atol=1e-10)


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_a_constructed_conflict_is_projected_so_that_no_dot_product_stays_negative(margin):
    G = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.5], [0.3, -0.2, 1.0, 0.0]])
    g = torch.tensor([-2.0, 0.5, 0.1, 0.2])
    assert (G @ g).min() < 0
    new, v, _, converged = project_to_cone(g, G, margin=margin, eps=1e-3)
    assert converged
    assert (G.double() @ new.double()).min() >= -1e-6
    assert min(v) >= margin
    assert not torch.equal(new, g)
    if margin == 0.0:
        # with margin 0 this is the Euclidean projection of g onto the cone: no shorter correction exists
        rng = torch.Generator().manual_seed(0)
        for _ in range(200):
            other = new + 0.05 * torch.randn(4, generator=rng)
            if (G @ other).min() >= 0:
                assert (other - g).norm() >= (new - g).norm() - 1e-6


def test_with_one_previous_task_and_no_margin_gem_is_the_closed_form_projection():
    a = torch.tensor([0.5, -1.0, 2.0])
    g = torch.tensor([1.0, 1.0, -1.0])
    new, *_ = project_to_cone(g, a[None], margin=0.0, eps=1e-3)
    assert torch.allclose(new, g - (g @ a) / (a @ a) * a, atol=1e-6)


def _gem_on_two_memories(tmp_path, **params):
    """GEM on the tiny model with the memories of two earlier tasks, in task 3."""
    ctx, tasks = tiny_context(tmp_path, "gem")
    method = GEM(GEMConfig(**params))
    for index, task in enumerate(tasks, start=1):
        ctx.task_index = index
        method.before_task(ctx, task)
        method.after_task(ctx, task, task.train)
    ctx.task_index = 3
    method.before_task(ctx, tasks[1])
    return ctx, tasks, method


def _memory_gradients(ctx, method, params) -> torch.Tensor:
    """The memory gradients the method used at its last step (same draws, same weights)."""
    rng = ctx.rng(f"gem:step:{method.steps}")
    batches = [
        method.memory.sample_task(ctx, t, method.config.memory_batch_size, rng) for t in method.memory.tasks
    ]
    return torch.stack([memory_gradient(ctx, ctx.model, params, b) for b in batches])


def test_real_conflicting_gradients_are_projected_and_no_memory_loss_increases_to_first_order(tmp_path):
    ctx, tasks, method = _gem_on_two_memories(tmp_path, memory_size=12, memory_batch_size=4)
    parity = ctx.collate(ctx.encode(tasks[0].train[12:16]))
    letters = ctx.collate(ctx.encode(tasks[1].train[12:16]))
    # descend on capital_letters while ascending on parity: a conflict with parity's memory
    params = set_gradient(
        ctx, lambda: ctx.forward(ctx.model, letters).loss - ctx.forward(ctx.model, parity).loss
    )
    before = flat_grad(params)
    method.before_optimizer_step(ctx, ctx.model)
    after = flat_grad(params)
    G = _memory_gradients(ctx, method, params).double()
    assert (G @ before.double()).min() < 0
    assert ctx.logged["gem/violations"][-1] >= 1 and ctx.logged["gem/projected"][-1] == 1.0
    assert not torch.equal(after, before)
    cosines = (G @ after.double()) / (G.norm(dim=1) * after.double().norm())
    assert cosines.min() >= -1e-6
    assert float(ctx.logged["gem/dot_min_after"][-1]) >= -1e-6 * float(G.norm(dim=1).max() * after.norm())


def test_a_gradient_that_agrees_with_every_memory_is_left_bitwise_unchanged(tmp_path):
    ctx, tasks, method = _gem_on_two_memories(tmp_path, memory_size=4, memory_batch_size=4)
    memories = [ctx.collate(method.memory.features(ctx, t)) for t in method.memory.tasks]
    # the sum of the memory losses: its gradient is G's row sum, which agrees with each row here
    params = set_gradient(ctx, lambda: sum(ctx.forward(ctx.model, b).loss for b in memories))
    G = _memory_gradients(ctx, method, params)
    before = [p.grad.clone() for p in params]
    method.before_optimizer_step(ctx, ctx.model)
    assert (G.double() @ flat_grad(params).double()).min() > 0
    assert ctx.logged["gem/violations"][-1] == 0 and ctx.logged["gem/projected"][-1] == 0.0
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))


def test_nothing_happens_on_the_first_task(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "gem")
    method = GEM()
    method.before_task(ctx, tasks[0])
    params = set_gradient(
        ctx, lambda: ctx.forward(ctx.model, ctx.collate(ctx.encode(tasks[0].train[:4]))).loss
    )
    before = [p.grad.clone() for p in params]
    method.before_optimizer_step(ctx, ctx.model)
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    assert "gem/projected" not in ctx.logged


def test_the_memory_survives_state_dict_and_load_state_dict(tmp_path):
    ctx, tasks, method = _gem_on_two_memories(tmp_path, memory_size=5)
    assert [len(m) for m in method.memory.tasks.values()] == [5, 5]
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    buffer.seek(0)
    restored = GEM(GEMConfig(memory_size=5))
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert list(restored.memory.tasks) == list(method.memory.tasks)
    for t in method.memory.tasks:
        assert [e.to_dict() for e in restored.memory.tasks[t]] == [
            e.to_dict() for e in method.memory.tasks[t]
        ]
        assert restored.memory.sample_task(ctx, t, 3, random.Random(1)) == method.memory.sample_task(
            ctx, t, 3, random.Random(1)
        )


def test_a_two_task_stream_projects_in_task_2_once_per_accumulated_optimizer_step(tmp_path, monkeypatch):
    calls = []
    real = GEM.before_optimizer_step

    def counting(self, ctx, model):
        calls.append(ctx.task_index)
        return real(self, ctx, model)

    monkeypatch.setattr(GEM, "before_optimizer_step", counting)
    raw = tiny_config(
        tmp_path, "gem", {"memory_size": 16, "memory_batch_size": 4}, train={"gradient_accumulation_steps": 2}
    )
    run_experiment(config_from_dict(raw))
    assert calls == [1] * 6 + [2] * 6  # max_steps optimizer steps per task, not one per micro-batch
    run = tmp_path / "run" / "tasks"
    first = json.loads((run / "1-parity" / "train_log.json").read_text())
    second = json.loads((run / "2-capital_letters" / "train_log.json").read_text())
    assert not any("gem/projected" in entry for entry in first)
    projected = [entry["gem/projected"] for entry in second if "gem/projected" in entry]
    assert projected and max(projected) > 0
    assert second[-1]["after_task"]["gem/projected_fraction"] > 0


def test_the_float64_products_taken_a_chunk_at_a_time_match_whole_ones(monkeypatch):
    from retain.methods import gem
    from retain.methods.common import episodic

    gen = torch.Generator().manual_seed(4)
    G, g = torch.randn(3, 10, generator=gen), torch.randn(10, generator=gen)
    whole = project_to_cone(g, G, margin=0.5, eps=1e-3)
    monkeypatch.setattr(episodic, "CHUNK", 3)
    monkeypatch.setattr(gem, "CHUNK", 3)
    chunked = project_to_cone(g, G, margin=0.5, eps=1e-3)
    assert torch.allclose(chunked[0], whole[0], atol=1e-6) and chunked[1] == pytest.approx(whole[1])
    assert torch.allclose(episodic.dots64(G, g), G.double() @ g.double())
