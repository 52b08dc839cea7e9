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

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, StepOutputs
from retain.methods.registry import register
from retain.models.adapters import (
    activate_adapters,
    adapter_names,
    adapter_state,
    add_adapter,
    peft_model,
    unwrap,
)


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


def lora_a_pairs(model: nn.Module, new: str) -> list[tuple[torch.Tensor, nn.Parameter]]:
    """Per LoRA module: (the earlier adapters' A matrices stacked, detached; the new adapter's A)."""
    pairs = []
    for module in unwrap(model).modules():
        if isinstance(module, LoraLayer) and new in module.lora_A:
            old = [a.weight.detach().flatten(1) for name, a in module.lora_A.items() if name != new]
            if old:
                pairs.append((torch.cat(old).float(), module.lora_A[new].weight))
    return pairs


@register("olora", config=OLoRAConfig)
class OLoRA(ContinualMethod):
    """O-LoRA: a new LoRA per task, kept orthogonal (in A) to the frozen, still active earlier ones."""

    config: OLoRAConfig
    supports_full_finetuning = False

    def __init__(self, config: OLoRAConfig | None = None) -> None:
        super().__init__(config or OLoRAConfig())
        self.pairs: list[tuple[torch.Tensor, nn.Parameter]] = []

    @staticmethod
    def adapter_for(index: int) -> str:
        return "default" if index <= 1 else f"task{index}"

    def activate(self, model: nn.Module) -> None:
        """All adapters active; only the newest one trainable."""
        names = adapter_names(model)
        activate_adapters(model, active=names, trainable=names[-1:])

    def before_task(self, ctx: MethodContext, task) -> None:
        new = self.adapter_for(ctx.task_index)
        if new not in peft_model(ctx.model).peft_config:
            add_adapter(ctx.model, new)
        self.activate(ctx.model)
        # The earlier adapters are frozen for the whole task, so their stacked A matrices are built once.
        self.pairs = lora_a_pairs(ctx.model, new)

    def orthogonality(self) -> torch.Tensor | None:
        """sum over modules of sum |A_old A_new^T| (None on task 1)."""
        if not self.pairs:
            return None
        # fp32 even under bf16 autocast: the term is tiny to compute and its scale is what users tune.
        with torch.autocast(self.pairs[0][1].device.type, enabled=False):
            return sum(torch.mm(old, new.float().flatten(1).T).abs().sum() for old, new in self.pairs)

    def l2(self, model: nn.Module, new: str) -> torch.Tensor:
        """sum of the Frobenius norms of the new adapter's A and B matrices."""
        return sum(p.float().norm() for p in adapter_state(model, new).values())

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        total = outputs.loss
        orth = self.orthogonality()
        if orth is not None:
            ctx.log("olora/orth", orth)
            if self.config.lamda_1 > 0:
                total = total + self.config.lamda_1 * orth
        new = self.adapter_for(ctx.task_index)
        if self.config.lamda_2 > 0:
            l2 = self.l2(model, new)
            total = total + self.config.lamda_2 * l2
        else:
            with torch.no_grad():
                l2 = self.l2(model, new)
        ctx.log("olora/l2", l2)
        return total

    def eval_model(self, ctx: MethodContext, task) -> nn.Module:
        self.activate(ctx.model)
        return ctx.model

    def restore(self, ctx: MethodContext) -> None:
        self.activate(ctx.model)
        self.pairs = []
