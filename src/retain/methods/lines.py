"""LiNeS: layer-increasing network scaling of the task vector (Wang et al., ICLR 2025, "LiNeS: Post-training
Layer Scaling Prevents Forgetting and Enhances Model Merging"; reference wang-kee/LiNeS `LiNeS_scaling`).

At the end of every task the model's update from the pre-trained weights, tau = theta_t - theta_0, is
scaled by a factor that grows linearly with depth:
    theta_t <- theta_0 + lambda(l) tau,   lambda(l) = alpha + beta * l / (L - 1)
for a parameter of block l of the model's L blocks, and lambda = alpha for parameters outside the blocks
(embeddings, final norm, head). Shallow layers move back toward the pre-trained, general features; the
deepest keeps alpha + beta of its update (beta = 1 - alpha by default: the paper's single-task edit, where
the last block keeps its full update). The next task trains on from the edited model.
With LoRA, tau of a layer is s B A, and scaling B by lambda(l) scales it exactly; every adapter of the
model is scaled (together they are tau). With full fine-tuning theta_0 is a copy of the pre-trained
trainable weights taken at setup.

Deviation: the paper edits one fine-tuned model once. In a stream the edit is applied after each task to
the whole update so far (the edit the paper describes, with theta_ft the model after task t), so the
shallow-layer update of task t is shrunk again at every later task end: by lambda(l)^(T - t + 1) after
T tasks. `retain lines RUN_DIR` applies the edit once to each checkpoint of a finished run instead, an
evaluation-only variant that leaves training untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.common.task_vectors import lines_scale_full, lines_scale_lora
from retain.methods.registry import register
from retain.models.adapters import adapter_names, trainable_parameters

if TYPE_CHECKING:
    from retain.data.streams import Task


@dataclass
class LiNeSConfig:
    alpha: float = field(
        default=0.5, metadata={"help": "scale of the shallowest block's update (and of non-block weights)"}
    )
    beta: float | None = field(
        default=None,
        metadata={
            "help": "extra scale of the deepest block: lambda(l) = alpha + beta l/(L-1); null: 1 - alpha"
        },
    )

    def __post_init__(self) -> None:
        beta = 1.0 - self.alpha if self.beta is None else self.beta
        if self.alpha < 0 or self.alpha + beta < 0:
            raise RetainError(
                f"config: lines needs alpha >= 0 and alpha + beta >= 0, got alpha {self.alpha}, beta {beta}"
            )

    @property
    def resolved_beta(self) -> float:
        return 1.0 - self.alpha if self.beta is None else self.beta


@register("lines", config=LiNeSConfig)
class LiNeS(ContinualMethod):
    """LiNeS: after each task, scale the update from the pre-trained weights by alpha + beta * depth."""

    config: LiNeSConfig
    refused_strategies = {
        "sharded-params": "it rescales every adapter's B matrix in place after each task; under FSDP / "
        "ZeRO-3 a process holds only a shard of each parameter",
    }

    def __init__(self, config: LiNeSConfig | None = None) -> None:
        super().__init__(config or LiNeSConfig())
        self.base: dict[str, torch.Tensor] = {}  # full fine-tuning: theta_0 of the trainable weights

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        if sizes.trainable_params == sizes.total_params:  # full fine-tuning keeps theta_0
            return [StateItem("pre-trained weights theta_0 (fp32)", sizes.trainable_params, on_device=False)]
        return []

    def setup(self, ctx: MethodContext) -> None:
        # The model as loaded is theta_0, also when resuming (checkpoints are loaded after setup).
        if not adapter_names(ctx.model):
            self.base = {
                n: p.detach().float().cpu().clone() for n, p in trainable_parameters(ctx.model).items()
            }

    def after_task(self, ctx: MethodContext, task: Task, data: list) -> None:
        alpha, beta = self.config.alpha, self.config.resolved_beta
        adapters = adapter_names(ctx.model)
        if adapters:
            factors = lines_scale_lora(ctx.model, adapters, alpha, beta)
        else:
            factors = lines_scale_full(ctx.model, self.base, alpha, beta)
        if factors:
            values = list(factors.values())
            ctx.log("lines/min_factor", min(values))
            ctx.log("lines/max_factor", max(values))
