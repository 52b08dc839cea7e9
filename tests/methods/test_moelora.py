"""MoE-LoRA: routers gate each rank-r/E expert per token, top-k sparsifies, routers train and are saved."""

from __future__ import annotations

import pytest
import torch

from retain.errors import RetainError
from retain.methods.common.experts import balance_loss
from retain.methods.common.moe import MoELoRAConfig
from retain.methods.moelora import MoELoRA
from retain.models.adapters import trainable_parameters

from ..helpers import tiny_context


def _setup(tmp_path, **params):
    ctx, tasks = tiny_context(tmp_path, "moelora", params)
    method = MoELoRA(MoELoRAConfig(**params))
    method.setup(ctx)
    return ctx, tasks, method


def _batch(ctx, examples):
    return {k: v.to(ctx.device) for k, v in ctx.collate(ctx.encode(examples)).items()}


def _manual_output(layer, router, x, keep: int | None = None):
    """W0 x + scaling * sum_i g_i(x) B_i A_i x, expert by expert."""
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    experts = router.weight.shape[0]
    chunk = a.shape[0] // experts
    gates = torch.softmax(router(x), dim=-1)
    if keep is not None:
        values, ids = gates.topk(keep, dim=-1)
        gates = torch.zeros_like(gates).scatter(-1, ids, values / values.sum(-1, keepdim=True))
    out = layer.base_layer(x)
    for i in range(experts):
        rows = slice(i * chunk, (i + 1) * chunk)
        out = out + layer.scaling["default"] * gates[..., i : i + 1] * (x @ a[rows].T @ b[:, rows].T)
    return out, gates


@pytest.mark.parametrize("top_k", [0, 1])
def test_each_expert_output_is_scaled_by_its_gate(tmp_path, top_k):
    ctx, _, method = _setup(tmp_path, top_k=top_k)
    layer, router = method.moe.layers[0], method.moe.routers[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        got = layer(x)
        want, gates = _manual_output(layer, router, x, keep=top_k or None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(method.moe.gates[0], gates)
    assert torch.allclose(gates.sum(-1), torch.ones(2, 5))
    nonzero = (gates > 0).sum(-1)
    assert (nonzero == (top_k or 4)).all()  # top-1 zeroes the other experts; dense keeps all 4


def test_router_gates_sum_to_one_and_change_with_training(tmp_path):
    ctx, tasks, method = _setup(tmp_path)
    params = trainable_parameters(ctx.model)
    routers = [n for n in params if "moe_router" in n]
    assert len(routers) == len(method.moe.layers) > 0  # the optimizer sees the routers
    batch = _batch(ctx, tasks[0].train[:4])
    ctx.model.eval()
    with torch.no_grad():
        ctx.forward(ctx.model, batch)
    before = [g.clone() for g in method.moe.gates]
    assert float(method.moe.counts.sum()) == 0  # statistics come from training forwards only
    mask = batch["attention_mask"].bool()
    assert torch.allclose(before[0][mask].sum(-1), torch.ones(int(mask.sum())))
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    ctx.model.train()
    for _ in range(3):  # B starts at zero, so the routers get gradient from the second step on
        optimizer.zero_grad()
        ctx.forward(ctx.model, batch).loss.backward()
        optimizer.step()
    ctx.model.eval()
    with torch.no_grad():
        ctx.forward(ctx.model, batch)
    after = method.moe.gates
    assert all(torch.allclose(g[mask].sum(-1), torch.ones(int(mask.sum()))) for g in after)
    assert max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True)) > 1e-4
    # usage statistics were gathered in memory on the training forwards, padding excluded
    assert float(method.moe.counts[0].sum()) == pytest.approx(3 * float(mask.sum()))


def test_balance_loss_is_off_by_default_and_added_when_asked(tmp_path):
    ctx, tasks, method = _setup(tmp_path)
    batch = _batch(ctx, tasks[0].train[:4])
    ctx.model.train()
    outputs = ctx.forward(ctx.model, batch)
    assert method.loss(ctx, ctx.model, batch, outputs) is outputs.loss
    ctx2, _, balanced = _setup(tmp_path / "b", balance_coef=0.5)
    with torch.no_grad():
        for router in balanced.moe.routers:
            router.weight.zero_()  # uniform routing: P_i = 1/E, every token's argmax is expert 0
    ctx2.model.train()
    outputs = ctx2.forward(ctx2.model, batch)
    total = balanced.loss(ctx2, ctx2.model, batch, outputs)
    # E * sum_i f_i P_i = 4 * (1 * 1/4) = 1 in every layer, so the term is exactly 1
    assert float(ctx2.logged["moelora/balance"][-1]) == pytest.approx(1.0, abs=1e-6)
    assert float(total.detach()) == pytest.approx(float(outputs.loss.detach()) + 0.5, abs=1e-6)


def test_balance_loss_value_for_uniform_and_for_collapsed_routing():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    uniform = torch.full((1, 3, 4), 0.25)
    assert float(balance_loss(uniform, mask)) == pytest.approx(1.0)
    collapsed = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1.0]]])  # padding row ignored
    assert float(balance_loss(collapsed, mask)) == pytest.approx(4.0)  # 4 * (1 * 1)


def test_routers_and_statistics_survive_a_checkpoint_and_routes_are_recorded(tmp_path):
    ctx, tasks, method = _setup(tmp_path, record_routes=True)
    with torch.no_grad():
        for router in method.moe.routers:
            router.weight.normal_()
    ctx.model.train()
    with torch.no_grad():
        ctx.forward(ctx.model, _batch(ctx, tasks[0].train[:4]))
    method.after_task(ctx, tasks[0], tasks[0].train)
    state = method.state_dict()
    for order in ("load_then_setup", "setup_then_load"):
        ctx2, _ = tiny_context(tmp_path / order, "moelora")
        restored = MoELoRA()
        if order == "load_then_setup":
            restored.load_state_dict(state)
            restored.setup(ctx2)
        else:
            restored.setup(ctx2)
            restored.load_state_dict(state)
        for a, b in zip(restored.moe.routers, method.moe.routers, strict=True):
            assert torch.equal(a.weight, b.weight)
        torch.testing.assert_close(restored.usage["parity"], method.usage["parity"])
    routes = method.eval_routes(ctx, tasks[0])
    assert len(routes) == len(tasks[0].test) and all(r.startswith("expert") for r in routes)
    assert method.eval_model(ctx, tasks[0]) is ctx.model
    assert MoELoRA().eval_routes(ctx, tasks[0]) is None  # off by default: generation stays in one batch


def test_rank_must_split_evenly_into_experts(tmp_path):
    ctx, _ = tiny_context(tmp_path, "moelora")
    with pytest.raises(RetainError, match="not divisible"):
        MoELoRA(MoELoRAConfig(num_experts=3)).setup(ctx)
    with pytest.raises(RetainError, match="top_k"):
        MoELoRAConfig(top_k=5)
