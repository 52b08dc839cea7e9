"""LiNeS as a method: at each task end the update from theta_0 is scaled by alpha + beta * l/(L-1)."""

from __future__ import annotations

import pytest
import torch

from retain.config import config_from_dict
from retain.data.streams import build_stream
from retain.methods.base import MethodContext
from retain.methods.common.task_vectors import block_index, lora_task_vector
from retain.methods.lines import LiNeS, LiNeSConfig
from retain.methods.registry import create_method
from retain.models.adapters import apply_finetuning
from retain.models.tiny import tiny_model, tiny_tokenizer

from ..helpers import tiny_config, tiny_context


def randomise_b(model, seed: int = 0) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)


def test_after_task_scales_the_first_block_by_alpha_and_the_last_by_alpha_plus_beta(tmp_path):
    ctx, tasks = tiny_context(tmp_path, "lines")  # 2 blocks: l/(L-1) is 0 and 1
    randomise_b(ctx.model)
    before = lora_task_vector(ctx.model, "default")
    method = LiNeS(LiNeSConfig(alpha=0.3, beta=0.5))
    method.setup(ctx)
    method.after_task(ctx, tasks[0], [])
    after = lora_task_vector(ctx.model, "default")
    for name, value in after.items():
        factor = {0: 0.3, 1: 0.8}[block_index(name)]
        assert torch.allclose(value, factor * before[name], atol=1e-7), name
    assert float(ctx.logged["lines/min_factor"][-1]) == pytest.approx(0.3)
    assert float(ctx.logged["lines/max_factor"][-1]) == pytest.approx(0.8)


def test_beta_defaults_to_one_minus_alpha_so_the_last_block_keeps_its_update():
    method = create_method("lines", {"alpha": 0.2})
    assert method.config.beta is None and method.config.resolved_beta == pytest.approx(0.8)
    with pytest.raises(Exception, match="alpha >= 0"):
        create_method("lines", {"alpha": -0.1})


def test_the_edit_compounds_over_a_three_task_stream(tmp_path):
    # The update after task 3 holds task 1's shallow update scaled three times (alpha^3).
    ctx, tasks = tiny_context(tmp_path, "lines")
    randomise_b(ctx.model)
    first = lora_task_vector(ctx.model, "default")
    method = LiNeS(LiNeSConfig(alpha=0.5, beta=0.25))
    method.setup(ctx)
    for index in (1, 2, 3):
        ctx.task_index = index
        method.after_task(ctx, tasks[0], [])
    now = lora_task_vector(ctx.model, "default")
    for name, value in now.items():
        factor = {0: 0.5, 1: 0.75}[block_index(name)] ** 3
        assert torch.allclose(value, factor * first[name], atol=1e-7)


def test_full_finetuning_pulls_the_weights_back_toward_the_pretrained_ones(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, "lines", model={"finetuning_type": "full"}))
    tokenizer = tiny_tokenizer()
    model = apply_finetuning(tiny_model(tokenizer), config.model)
    ctx = MethodContext.create(model, tokenizer, config, build_stream(config), task_index=1)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = LiNeS(LiNeSConfig(alpha=0.2, beta=0.6))
    method.setup(ctx)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    method.after_task(ctx, None, [])
    params = dict(model.named_parameters())
    for name, factor in (
        ("model.layers.0.mlp.down_proj.weight", 0.2),
        ("model.layers.1.mlp.down_proj.weight", 0.8),
        ("model.embed_tokens.weight", 0.2),
    ):
        assert torch.allclose(
            params[name] - theta0[name], torch.full_like(theta0[name], 0.5 * factor), atol=1e-6
        )
