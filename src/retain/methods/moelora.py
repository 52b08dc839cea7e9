"""MoE-LoRA, the mixture-of-LoRA-experts baseline of CoIN (Chen et al., "CoIN: A Benchmark of Continual
Instruction tuNing for Multimodel Large Language Model", NeurIPS 2024 Datasets and Benchmarks).

The LoRA rank r is split into E experts of rank r/E, mixed per token by a softmax router in every
LoRA layer: y = W0 x + (alpha/r) sum_i g_i(x) B_i A_i dropout(x), g(x) = softmax(W_g x). One MoE-LoRA
keeps training through the whole stream (no per-task state besides the weights).

As in CoIN's `CoINMOELoraLinear.forward` the router is dense and there is no balancing loss by default;
`top_k` (keep the k largest gates, renormalised) and a Switch-style balancing loss are options. The
experts live in one rank-r PEFT adapter (see `_moe.py`): the same forward, one GEMM per factor, and
PEFT's default LoRA initialisation (CoIN draws A from N(0, 0.01)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods._moe import MoEMethod
from retain.methods.base import MethodContext
from retain.methods.registry import register

if TYPE_CHECKING:
    from retain.data.streams import Task


@dataclass
class MoELoRAConfig:
    num_experts: int = field(
        default=4,
        metadata={
            "help": "experts E; model.lora_rank is split into E experts of rank lora_rank/E "
            "(CoIN: 8 with r=128, EasyCL: 4)"
        },
    )
    top_k: int = field(
        default=0,
        metadata={"help": "0: dense softmax router (CoIN); k > 0: keep each token's k largest gates"},
    )
    balance_coef: float = field(
        default=0.0,
        metadata={
            "help": "weight of the Switch-style load-balancing loss E * sum_i f_i P_i (0: off, as in CoIN)"
        },
    )
    record_routes: bool = field(
        default=False,
        metadata={
            "help": "before evaluating a task, record each test prompt's most-used expert (one extra "
            "forward; evaluation then generates each expert's instances as a separate batch)"
        },
    )

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise RetainError(f"config: method.num_experts must be >= 2, got {self.num_experts}")
        if not 0 <= self.top_k <= self.num_experts:
            raise RetainError(f"config: method.top_k must be in [0, num_experts], got {self.top_k}")
        if self.balance_coef < 0:
            raise RetainError(f"config: method.balance_coef must be >= 0, got {self.balance_coef}")


@register("moelora", config=MoELoRAConfig)
class MoELoRA(MoEMethod):
    """MoE-LoRA (CoIN): the LoRA rank split into token-routed experts, one mixture trained on all tasks."""

    config: MoELoRAConfig
    prefix = "moelora"

    def __init__(self, config: MoELoRAConfig | None = None) -> None:
        super().__init__(config or MoELoRAConfig())

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        self.record_usage(ctx, task)
