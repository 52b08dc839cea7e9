"""O-LoRA: orthogonal subspace learning with one LoRA adapter per task (Wang et al., EMNLP Findings 2023,
"Orthogonal Subspace Learning for Language Model Continual Learning"; github cmnfriend/O-LoRA).

Task 1 trains the 'default' adapter; task t > 1 adds a fresh adapter, freezes the earlier ones and keeps
them all active (h = W0 x + sum_i (alpha/r) B_i A_i x, no task id at test). While training task t:
L = L_task + lambda_1 * sum_{modules m} sum_{i<t} sum |A_i^m (A_t^m)^T| + lambda_2 * sum_{P in A_t,B_t} |P|_2
with the L1 norm of the overlap between the new and old input subspaces and the (non-squared) Frobenius norm
of the new adapter, as in the reference `UIETrainer.training_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, earlier_adapters
from retain.methods.common.penalties import a_overlap_l1, lora_a_overlap_pairs, norm_of
from retain.methods.common.sharding import DEEPSPEED_UNVERIFIED
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, adapter_names, adapter_state, add_adapter, peft_model
from retain.models.forward import StepOutputs

if TYPE_CHECKING:
    from retain.data.streams import Task


@dataclass
class OLoRAConfig:
    lamda_1: float = field(
        default=0.5, metadata={"help": "weight of the orthogonality loss sum |A_old A_new^T| (O-LoRA: 0.5)"}
    )
    lamda_2: float = field(
        default=0.0, metadata={"help": "weight of the L2 norm of the new adapter's A and B (O-LoRA: 0)"}
    )

    def __post_init__(self) -> None:
        if self.lamda_1 < 0 or self.lamda_2 < 0:
            raise RetainError(
                f"config: olora needs lamda_1 >= 0 and lamda_2 >= 0, got {self.lamda_1} and {self.lamda_2}"
            )


@register("olora", config=OLoRAConfig)
class OLoRA(ContinualMethod):
    """O-LoRA: a new LoRA per task, kept orthogonal (in A) to the frozen, still active earlier ones."""

    config: OLoRAConfig
    supports_full_finetuning = False
    decides_eval_model = True
    adds_adapters = freezes_adapters = True
    refused_strategies = {
        "sharded-params": "its penalty multiplies the new adapter's A with the earlier adapters' A outside "
        "the forward; under FSDP / ZeRO-3 a process holds a shard of each, which the penalty does not gather",
        "deepspeed": DEEPSPEED_UNVERIFIED,
    }

    def __init__(self, config: OLoRAConfig | None = None) -> None:
        super().__init__(config or OLoRAConfig())
        self.pairs: list[tuple[list[torch.Tensor], nn.Parameter]] = []  # per layer: (old A's, new A)
        self.new_params: list[nn.Parameter] = []  # the new adapter's A and B

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        return [earlier_adapters(sizes)]

    @staticmethod
    def adapter_for(index: int) -> str:
        return "default" if index <= 1 else f"task{index}"

    def activate(self, model: nn.Module, index: int) -> None:
        """All adapters active; only the adapter of task `index` trainable."""
        activate_adapters(model, active=adapter_names(model), trainable=[self.adapter_for(index)])

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        new = self.adapter_for(ctx.task_index)
        if new not in peft_model(ctx.model).peft_config:
            add_adapter(ctx.model, new)
        self.activate(ctx.model, ctx.task_index)
        # Built once per task: the earlier adapters are frozen, the new one's parameters fixed objects.
        older = [n for n in adapter_names(ctx.model) if n != new]
        self.pairs = lora_a_overlap_pairs(ctx.model, older, new)
        self.new_params = list(adapter_state(ctx.model, new).values())

    def orthogonality(self) -> torch.Tensor | None:
        """sum over modules of sum |A_old A_new^T| (None on task 1)."""
        return a_overlap_l1(self.pairs) if self.pairs else None

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        total = outputs.loss
        orth = self.orthogonality()
        if orth is not None:
            ctx.log("olora/orth", orth)
            if self.config.lamda_1 > 0:
                total = total + self.config.lamda_1 * orth
        if self.config.lamda_2 > 0:  # with lamda_2 = 0 the norm is neither computed nor logged
            l2 = norm_of(self.new_params)
            ctx.log("olora/l2", l2)
            total = total + self.config.lamda_2 * l2
        return total

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        self.activate(ctx.model, ctx.task_index)
        return ctx.model

    def restore(self, ctx: MethodContext) -> None:
        self.activate(ctx.model, ctx.task_index)
        self.pairs, self.new_params = [], []
