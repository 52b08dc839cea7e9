"""MIGU: only the output rows with the largest activation magnitudes keep their gradient."""

from __future__ import annotations

import pytest
import torch

from retain.config import config_from_dict
from retain.errors import RetainError
from retain.methods.base import MethodContext
from retain.methods.migu import MIGU, MIGUConfig, kept_rows
from retain.methods.registry import create_method
from retain.models.adapters import apply_finetuning, trainable_parameters
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import tiny_config, tiny_context, train_one_task


def full_context(tmp_path):
    """(ctx, tasks) around a fully fine-tuned tiny model."""
    from retain.data.streams import build_stream

    config = config_from_dict(tiny_config(tmp_path, "migu", model={"finetuning_type": "full"}))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    ctx = MethodContext.create(model, tokenizer, config, build_stream(config), task_index=2)
    return ctx, ctx.tasks


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def batches(ctx, examples, size=3):
    features = ctx.encode(examples)
    return [ctx.collate(features[i : i + size]) for i in range(0, len(features), size)]


def manual_magnitude(outputs: list[torch.Tensor], masks: list[torch.Tensor]) -> torch.Tensor:
    """mean over the real tokens of all micro-batches of |output| per row, L1-normalised over the rows."""
    total = sum(
        (o.abs() * m[:, m.shape[1] - o.shape[1] :, None]).sum(dim=(0, 1))
        for o, m in zip(outputs, masks, strict=True)
    )
    tokens = sum(m[:, m.shape[1] - o.shape[1] :].sum() for o, m in zip(outputs, masks, strict=True))
    magnitude = total / tokens
    return magnitude / magnitude.sum()


def run_micro_batches(ctx, modules, micro_batches):
    """Forward/backward the micro-batches with spies on `modules`; returns their outputs and the masks."""
    seen = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.detach().clone()))
        for name, module in modules.items()
    ]
    ctx.model.train()
    for batch in micro_batches:
        ctx.forward(ctx.model, batch).loss.backward()
    for handle in handles:
        handle.remove()
    return seen, [b["attention_mask"].float() for b in micro_batches]


def expected_keep(outputs, masks, ratio) -> torch.Tensor:
    share = manual_magnitude(outputs, masks)
    keep = torch.zeros(len(share), dtype=torch.bool)
    keep[share.topk(kept_rows(len(share), ratio)).indices] = True
    return keep


def test_kept_rows_is_the_count_at_or_above_the_reference_quantile():
    generator = torch.Generator().manual_seed(0)
    for n in range(1, 40):
        values = torch.rand(n, generator=generator)
        for ratio in (0.1, 0.25, 0.3, 0.5, 1.0):
            expected = int((values >= torch.quantile(values, 1.0 - ratio)).sum())
            assert kept_rows(n, ratio) == expected, (n, ratio)
    with pytest.raises(RetainError, match="ratio"):
        create_method("migu", {"ratio": 0.0})


def test_full_finetuning_zeroes_exactly_the_rows_outside_the_top_ratio(tmp_path):
    ctx, tasks = full_context(tmp_path)
    method = MIGU(MIGUConfig(ratio=0.25))
    inner = ctx.model
    modules = {"down": inner.model.layers[0].mlp.down_proj, "head": inner.lm_head}
    method.before_task(ctx, tasks[1])
    assert {t.module for t in method.targets} >= set(modules.values())
    # Two micro-batches of one optimizer step: the magnitudes are summed over both.
    seen, masks = run_micro_batches(ctx, modules, batches(ctx, tasks[1].train[:6]))
    before = {name: module.weight.grad.clone() for name, module in modules.items()}
    method.before_optimizer_step(ctx, ctx.model)
    for name, module in modules.items():
        keep = expected_keep(seen[name], masks, 0.25)
        grad = module.weight.grad
        assert int(keep.sum()) == kept_rows(grad.shape[0], 0.25)
        assert torch.equal(grad[keep], before[name][keep])
        assert (grad[~keep] == 0).all() and (before[name][~keep] != 0).any()
    assert 0.25 <= ctx.logged["migu/kept_rows"][0] <= 0.35
    # The accumulators start afresh for the next optimizer step.
    assert all(t.acc is None for t in method.targets)
    method.after_task(ctx, tasks[1], [])


def test_lora_masks_the_rows_of_lora_b_by_the_layer_output(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "migu")
    ctx.task_index = 2
    method = MIGU(MIGUConfig(ratio=0.3))
    layer = ctx.model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():  # a non-zero B, so that lora_A gets gradients too
        for param in trainable_parameters(ctx.model).values():
            param.normal_(0.0, 0.1)
    method.before_task(ctx, tasks[1])
    assert all(w.shape[1] == 4 for t in method.targets for w in t.weights)  # lora_B: [d_out, r]
    seen, masks = run_micro_batches(ctx, {"q": layer}, batches(ctx, tasks[1].train[:6]))
    b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    before_b, before_a = b.grad.clone(), a.grad.clone()
    method.before_optimizer_step(ctx, ctx.model)
    keep = expected_keep(seen["q"], masks, 0.3)
    assert torch.equal(b.grad[keep], before_b[keep]) and (b.grad[~keep] == 0).all()
    assert (before_b[~keep] != 0).any()
    assert torch.equal(a.grad, before_a)  # lora_A is not masked
    method.after_task(ctx, tasks[1], [])


def test_hooks_record_nothing_at_eval_and_leave_nothing_behind(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "migu")
    method = MIGU()
    clean = hook_count(ctx.model)
    method.before_task(ctx, tasks[0])  # task 1 is plain fine-tuning
    assert hook_count(ctx.model) == clean and not method.targets
    ctx.task_index = 2
    method.before_task(ctx, tasks[1])
    assert hook_count(ctx.model) > clean
    batch = batches(ctx, tasks[1].train[:3])[0]
    ctx.model.eval()
    with torch.no_grad():
        ctx.forward(ctx.model, batch)
    ctx.model.train()
    with torch.no_grad():  # a teacher's forward during training
        ctx.forward(ctx.model, batch)
    assert all(t.acc is None for t in method.targets)
    method.after_task(ctx, tasks[1], [])
    assert hook_count(ctx.model) == clean and not method.targets


def test_one_optimizer_step_updates_only_the_kept_rows(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "migu")
    ctx.task_index = 2
    method = MIGU(MIGUConfig(ratio=0.25))
    method.before_task(ctx, tasks[1])
    start = {n: p.detach().clone() for n, p in trainable_parameters(ctx.model).items()}
    train_one_task(
        ctx,
        tasks,
        method,
        tmp_path / "t",
        examples=tasks[1].train[:8],
        gradient_accumulation_steps=2,
        max_steps=1,
        learning_rate=1e-2,
    )
    method.after_task(ctx, tasks[1], [])
    for name, param in trainable_parameters(ctx.model).items():
        if "lora_B" in name:
            changed = int((param.detach() != start[name]).any(dim=1).sum())
            assert 0 < changed <= kept_rows(param.shape[0], 0.25), name
