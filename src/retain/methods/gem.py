"""GEM: Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017).

One memory gradient g_k per previous task k (rows of G) constrains the update: if some <g, g_k> < 0,
the gradient is replaced by g̃ = g + Gᵀv*, v* = argmin_v ½ vᵀGGᵀv + (Gg)ᵀv s.t. v >= margin (the dual
QP of the official project2cone2), so that <g̃, g_k> >= 0 for every previous task.

As in the official code: one constraint per previous task, margin (memory_strength) 0.5, projection
only when a constraint is violated, the accumulated gradient projected once per optimizer step
(before clipping). Differences, for an LLM's cost: each memory gradient uses `memory_batch_size`
examples of the task's memory drawn at random each step (the official code uses all of it, 256 MNIST
images), and the memory is a uniform sample of the task's data (the official ring buffer keeps the
last 256 examples seen, which for a shuffled task is also a uniform sample).

The QP has one variable per previous task; it is solved in float64 by cyclic coordinate descent,
each coordinate step damped by eps x the largest diagonal entry of GGᵀ (a proximal term). The damping
keeps every step defined when a memory gradient vanishes or two of them are collinear, the role of
the official eps·I ridge (quadprog needs a positive-definite matrix), without loosening the
constraints: the ridge would let each <g̃, g_k> end up eps·v_k below zero, the damped iteration
converges to the exact solution. It stops when the largest KKT residual is below qp_tol x the
problem's scale, or after qp_max_iter sweeps.

Cost per step: (t-1) extra forward/backward passes and (t-1) flattened fp32 gradients of the trainable
parameters (small for LoRA; for full fine-tuning, (t-1) x the model size). Logged per step:
gem/violations (constraints violated), gem/projected (its mean over a logging window is the fraction
of steps projected), gem/dot_min (the smallest <g, g_k>), and on projected steps gem/dot_min_after
and gem/qp_sweeps; after each task gem/projected_fraction over the whole task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from retain.errors import RetainError
from retain.methods.base import MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common.episodic import CHUNK, EpisodicConfig, EpisodicProjection, dots64, memory_gradient
from retain.methods.common.sharding import DEEPSPEED_GRADIENTS, EXTRA_BACKWARD_SHARDED
from retain.methods.registry import register

logger = logging.getLogger(__name__)


@dataclass
class GEMConfig(EpisodicConfig):
    memory_strength: float = field(
        default=0.5, metadata={"help": "margin: lower bound of the QP's dual variables (official 0.5)"}
    )
    eps: float = field(
        default=1e-3, metadata={"help": "QP regularisation (official 1e-3): proximal damping of the solver"}
    )
    qp_max_iter: int = field(default=500, metadata={"help": "most coordinate-descent sweeps of the QP"})
    qp_tol: float = field(
        default=1e-12, metadata={"help": "QP stops when its KKT residual is below qp_tol x its scale"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.memory_strength < 0 or self.eps < 0 or self.qp_max_iter <= 0 or self.qp_tol <= 0:
            raise RetainError(
                "config: gem needs memory_strength >= 0, eps >= 0, qp_max_iter > 0 and qp_tol > 0"
            )


def solve_box_qp(
    P: list[list[float]],
    q: list[float],
    lower: float,
    *,
    damping: float = 0.0,
    max_iter: int = 500,
    tol: float = 1e-12,
) -> tuple[list[float], int, bool]:
    """argmin_v ½ vᵀPv + qᵀv s.t. v >= lower, P symmetric positive semi-definite.

    Cyclic coordinate descent from v = lower: each step minimises exactly along one coordinate plus
    (d/2)(v_k - v_k,old)², d = damping x max diag(P). Returns (v, sweeps, converged), converged when
    every component of the projected gradient is at most tol x max(|q|, diag(P)·|v|).
    """
    n = len(q)
    v = [float(lower)] * n
    d = damping * max((P[k][k] for k in range(n)), default=0.0)
    sweeps, converged = 0, False
    while sweeps < max_iter:
        sweeps += 1
        for k in range(n):
            denom = P[k][k] + d
            if denom > 0:
                grad = sum(P[k][j] * v[j] for j in range(n)) + q[k]
                v[k] = max(lower, v[k] - grad / denom)
        grads = [sum(P[k][j] * v[j] for j in range(n)) + q[k] for k in range(n)]
        residual = max(abs(g) if v[k] > lower else max(-g, 0.0) for k, g in enumerate(grads))
        scale = max(max(abs(x) for x in q), max(P[k][k] * abs(v[k]) for k in range(n)), 1e-300)
        if residual <= tol * scale:
            converged = True
            break
    return v, sweeps, converged


def gram64(G: torch.Tensor) -> torch.Tensor:
    """G Gᵀ accumulated in float64, a chunk of columns at a time."""
    out = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for chunk in G.split(CHUNK, dim=1):
        c64 = chunk.double()
        out += c64 @ c64.T
    return 0.5 * (out + out.T)


def project_to_cone(
    g: torch.Tensor, G: torch.Tensor, margin: float, eps: float, max_iter: int = 500, tol: float = 1e-12
) -> tuple[torch.Tensor, list[float], int, bool]:
    """g̃ = g + Gᵀv*, v* the solution of GEM's dual QP (float64); returns (g̃, v*, sweeps, converged)."""
    v, sweeps, converged = solve_box_qp(
        gram64(G).tolist(), dots64(G, g).tolist(), margin, damping=eps, max_iter=max_iter, tol=tol
    )
    weights = torch.tensor(v, dtype=torch.float64, device=G.device)
    new = torch.cat(
        [
            (gc.double() + weights @ Gc.double()).to(g.dtype)
            for Gc, gc in zip(G.split(CHUNK, dim=1), g.split(CHUNK), strict=True)
        ]
    )
    return new, v, sweeps, converged


@register("gem", config=GEMConfig)
class GEM(EpisodicProjection):
    """GEM: project the gradient so that no previous task's memory loss increases (one QP per step)."""

    config: GEMConfig
    refused_strategies = {
        "sharded-grads": "the projection reads and rewrites every trainable parameter's whole accumulated "
        "gradient as one vector; under FSDP / ZeRO-2/3 a process holds a shard of each",
        "sharded-params": f"the memory gradients are taken on the model as it is: {EXTRA_BACKWARD_SHARDED}",
        "deepspeed": DEEPSPEED_GRADIENTS,
    }

    def __init__(self, config: GEMConfig | None = None) -> None:
        super().__init__(config or GEMConfig())
        self.warned = False  # the QP's non-convergence is reported once per task

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        kept = sum(min(self.config.memory_size, n) for n in sizes.train_examples)
        return [
            example_memory(sizes, kept, "episodic memory"),
            StateItem(
                "memory gradients of the earlier tasks, one per task (during each step)",
                max(sizes.tasks - 1, 1) * sizes.trainable_params,
            ),
            StateItem("the step's gradient as one vector (during each step)", sizes.trainable_params),
        ]

    def before_task(self, ctx: MethodContext, task) -> None:
        super().before_task(ctx, task)
        self.warned = False

    def project(
        self, ctx: MethodContext, model: nn.Module, params: list[nn.Parameter], g: torch.Tensor
    ) -> torch.Tensor | None:
        cfg = self.config
        rng = self.step_rng(ctx)
        G = torch.stack(
            [
                memory_gradient(
                    ctx, model, params, self.memory.sample_task(ctx, t, cfg.memory_batch_size, rng)
                )
                for t in self.memory.tasks
            ]
        )
        dots = dots64(G, g)
        violations = int((dots < 0).sum())
        ctx.log(f"{self.name}/violations", violations)
        ctx.log(f"{self.name}/dot_min", dots.min())
        if violations == 0:
            return None
        new, _, sweeps, converged = project_to_cone(
            g, G, cfg.memory_strength, cfg.eps, cfg.qp_max_iter, cfg.qp_tol
        )
        if not converged and not self.warned:
            self.warned = True
            logger.warning(
                "gem: the QP did not reach qp_tol in %d sweeps (task %d); raise qp_max_iter",
                sweeps,
                ctx.task_index,
            )
        ctx.log(f"{self.name}/qp_sweeps", sweeps)
        ctx.log(f"{self.name}/dot_min_after", dots64(G, new).min())
        return new
