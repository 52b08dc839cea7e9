"""A-GEM: Averaged Gradient Episodic Memory (Chaudhry, Ranzato, Rohrbach & Elhoseiny, ICLR 2019).

One reference gradient g_ref on a random batch from the memories of all previous tasks; if
gᵀg_ref < 0 the gradient is replaced by g̃ = g - (gᵀg_ref / g_refᵀg_ref) g_ref (so g̃ᵀg_ref = 0),
otherwise it is left unchanged. As in the official code (facebookresearch/agem), the reference batch
is drawn anew at every step; here it has `memory_batch_size` examples, drawn uniformly from the union
of the per-task memories (uniform samples of each task's data), and the accumulated gradient is
projected once per optimizer step, before clipping. Logged per step: agem/violations (1 if gᵀg_ref < 0),
agem/projected (its mean over a logging window is the fraction of steps projected), agem/dot_min (gᵀg_ref).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from retain.methods.base import MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common.episodic import CHUNK, EpisodicConfig, EpisodicProjection, dots64, memory_gradient
from retain.methods.common.sharding import DEEPSPEED_GRADIENTS, EXTRA_BACKWARD_SHARDED
from retain.methods.registry import register


@dataclass
class AGEMConfig(EpisodicConfig):
    pass


def agem_project(g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor | None:
    """g - (gᵀref / refᵀref) ref when gᵀref < 0 (in float64, a chunk at a time), else None (g unchanged)."""
    dot, ref_sq = dots64(g[None], ref)[0], dots64(ref[None], ref)[0]
    if not dot < 0:
        return None
    coef = dot / ref_sq
    pairs = zip(g.split(CHUNK), ref.split(CHUNK), strict=True)
    return torch.cat([(gc.double() - coef * rc.double()).to(g.dtype) for gc, rc in pairs])


@register("agem", config=AGEMConfig)
class AGEM(EpisodicProjection):
    """A-GEM: project the gradient when it conflicts with the average gradient on the episodic memory."""

    config: AGEMConfig
    refused_strategies = {
        "sharded-grads": "the projection reads and rewrites every trainable parameter's whole accumulated "
        "gradient as one vector; under FSDP / ZeRO-2/3 a process holds a shard of each",
        "sharded-params": f"the memory gradients are taken on the model as it is: {EXTRA_BACKWARD_SHARDED}",
        "deepspeed": DEEPSPEED_GRADIENTS,
    }

    def __init__(self, config: AGEMConfig | None = None) -> None:
        super().__init__(config or AGEMConfig())

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        kept = sum(min(self.config.memory_size, n) for n in sizes.train_examples)
        return [
            example_memory(sizes, kept, "episodic memory"),
            StateItem("reference gradient on the memory (during each step)", sizes.trainable_params),
            StateItem("the step's gradient as one vector (during each step)", sizes.trainable_params),
        ]

    def project(
        self, ctx: MethodContext, model: nn.Module, params: list[nn.Parameter], g: torch.Tensor
    ) -> torch.Tensor | None:
        batch = self.memory.sample_all(ctx, self.config.memory_batch_size, self.step_rng(ctx))
        ref = memory_gradient(ctx, model, params, batch)
        dot = dots64(g[None], ref)[0]
        ctx.log(f"{self.name}/violations", float(dot < 0))
        ctx.log(f"{self.name}/dot_min", dot)
        return agem_project(g, ref)
