"""CL-MoE: per-task expert statistics, the task-level router blended at test, the momentum merge."""

from __future__ import annotations

import pytest
import torch

from retain.methods.clmoe import CLMoE, CLMoEConfig, momentum_merge, momentum_weights, task_gates

from ..helpers import tiny_context


def _setup(tmp_path, **params):
    ctx, tasks = tiny_context(tmp_path, "clmoe", params)
    method = CLMoE(CLMoEConfig(**params))
    method.setup(ctx)
    return ctx, tasks, method


def _perturb(method, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in method.moe.layers:
            for weights in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weights.add_(torch.randn(weights.shape, generator=generator))


@pytest.mark.parametrize("rule", ["paper", "released"])
def test_momentum_merge_moves_each_expert_by_exactly_alpha(tmp_path, rule):
    ctx, _, method = _setup(tmp_path, alpha=0.8, merge_rule=rule)
    moe = method.moe
    old = moe.expert_weights()
    _perturb(method, 0)
    new = moe.expert_weights()
    layers = len(moe.layers)
    top_old = torch.zeros(layers, 4, dtype=torch.bool)
    top_new = torch.zeros(layers, 4, dtype=torch.bool)
    top_old[:, [0, 1]] = True  # expert 0: old only, 1: shared, 2: new only, 3: neither
    top_new[:, [1, 2]] = True
    lam = momentum_weights(top_old, top_new, 0.8, rule)
    momentum_merge(moe, old, lam)
    favoured = 2 if rule == "paper" else 0  # the expert that takes alpha of the new weights
    for index in range(layers):
        for expert in range(4):
            keep = 0.2 if expert == favoured else 0.8  # weight left on theta_{t-1}
            a, b = moe.expert_slices(index, expert)
            chunk = slice(expert * moe.chunk, (expert + 1) * moe.chunk)
            torch.testing.assert_close(a, keep * old[index][0][chunk] + (1 - keep) * new[index][0][chunk])
            torch.testing.assert_close(
                b, keep * old[index][1][:, chunk] + (1 - keep) * new[index][1][:, chunk]
            )


def test_after_task_gathers_statistics_and_merges_with_the_previous_task(tmp_path):
    ctx, tasks, method = _setup(tmp_path, alpha=0.7)
    batch = {k: v.to(ctx.device) for k, v in ctx.collate(ctx.encode(tasks[0].train[:4])).items()}
    ctx.model.train()
    method.before_task(ctx, tasks[0])
    with torch.no_grad():
        ctx.forward(ctx.model, batch)
    tokens = float(batch["attention_mask"].sum())
    # every non-padding token counts its 2 largest gates, in every layer
    assert method.moe.counts.dtype == torch.int64
    assert torch.equal(method.moe.counts.sum(-1), torch.full((len(method.moe.layers),), int(2 * tokens)))
    method.moe.counts.copy_(torch.tensor([3, 2, 1, 0]).repeat(len(method.moe.layers), 1))  # top-2: 0, 1
    first = method.moe.expert_weights()
    method.after_task(ctx, tasks[0], tasks[0].train)
    assert method.order == ["parity"] and method.top["parity"].sum(-1).eq(2).all()
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, method.moe.expert_weights(), strict=True))

    method.before_task(ctx, tasks[1])
    assert float(method.moe.counts.sum()) == 0  # statistics restart with each task
    _perturb(method, 1)
    trained = method.moe.expert_weights()
    method.moe.counts.copy_(torch.arange(4.0).repeat(len(method.moe.layers), 1))  # top-2: experts 2, 3
    method.after_task(ctx, tasks[1], tasks[1].train)
    # I_1 = {0, 1}, I_2 = {2, 3}: experts 2 and 3 are new, so they keep 1 - alpha = 0.3 of the old weights
    lam = torch.tensor([0.7, 0.7, 0.3, 0.3])
    for index, ((old_a, _), (new_a, _)) in enumerate(zip(first, trained, strict=True)):
        keep = lam.repeat_interleave(method.moe.chunk)[:, None]
        a = method.moe.layers[index].lora_A["default"].weight
        torch.testing.assert_close(a, keep * old_a + (1 - keep) * new_a)


def test_task_level_router_is_blended_in_at_test_for_learned_tasks_only(tmp_path):
    ctx, tasks, method = _setup(tmp_path, beta=0.25, record_routes=True)
    counts = torch.tensor([[5.0, 1.0, 3.0, 0.0]]).repeat(len(method.moe.layers), 1)
    gates = task_gates(counts, 2)
    torch.testing.assert_close(gates[0], torch.tensor([5 / 8, 0.0, 3 / 8, 0.0]))
    method.usage["parity"] = counts
    batch = {k: v.to(ctx.device) for k, v in ctx.collate(ctx.encode(tasks[0].train[:2])).items()}
    routes = method.eval_routes(ctx, tasks[0])
    assert len(routes) == len(tasks[0].test)
    with torch.no_grad():
        ctx.forward(ctx.model, batch)
        instance, _ = method.moe.route(0, torch.zeros(1, method.moe.layers[0].in_features))
    blended = method.moe.gates[0]
    assert torch.allclose(blended.sum(-1), torch.ones(blended.shape[:-1]))
    assert method.moe.task_gates is not None and method.moe.beta == 0.25
    # an input of zeros gives uniform instance gates: 0.25 * 1/4 + 0.75 * task gates
    torch.testing.assert_close(instance[0], 0.25 * torch.full((4,), 0.25) + 0.75 * gates[0])
    method.eval_model(ctx, tasks[1])  # not trained yet: instance-level router only
    assert method.moe.task_gates is None
    method.before_task(ctx, tasks[1])
    assert method.moe.task_gates is None  # training uses the instance-level router


def test_state_survives_a_checkpoint(tmp_path):
    ctx, tasks, method = _setup(tmp_path)
    with torch.no_grad():
        for router in method.moe.routers:
            router.weight.normal_()
    method.before_task(ctx, tasks[0])
    method.moe.counts.copy_(torch.randint(0, 100, method.moe.counts.shape))
    method.after_task(ctx, tasks[0], tasks[0].train)
    ctx2, _ = tiny_context(tmp_path / "again", "clmoe")
    restored = CLMoE()
    restored.setup(ctx2)
    restored.load_state_dict(method.state_dict())
    assert restored.order == method.order
    assert torch.equal(restored.top["parity"], method.top["parity"])
    torch.testing.assert_close(restored.usage["parity"], method.usage["parity"])
    for a, b in zip(restored.moe.routers, method.moe.routers, strict=True):
        assert torch.equal(a.weight, b.weight)
