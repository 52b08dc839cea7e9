"""MoE-LoRA, the mixture-of-LoRA-experts baseline of CoIN (Chen et al., "CoIN: A Benchmark of Continual
Instruction tuNing for Multimodel Large Language Model", NeurIPS 2024 Datasets and Benchmarks).

The LoRA rank r is split into E experts of rank r/E, mixed per token by a softmax router in every
LoRA layer: y = W0 x + (alpha/r) sum_i g_i(x) B_i A_i dropout(x), g(x) = softmax(W_g x). One MoE-LoRA
keeps training through the whole stream (no per-task state besides the weights).

As in CoIN's `CoINMOELoraLinear.forward` the router is dense and there is no balancing loss by default;
`top_k` (keep the k largest gates, renormalised) and a Switch-style balancing loss are options. The
experts live in one rank-r PEFT adapter (see `common/experts.py`): the same forward, one GEMM per factor, and
PEFT's default LoRA initialisation (CoIN draws A from N(0, 0.01)).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retain.data.formats import Example
from retain.methods.base import MethodContext
from retain.methods.common.moe import MoELoRAConfig, MoEMethod
from retain.methods.registry import register

if TYPE_CHECKING:
    from retain.data.streams import Task


@register("moelora", config=MoELoRAConfig)
class MoELoRA(MoEMethod):
    """MoE-LoRA (CoIN): the LoRA rank split into token-routed experts, one mixture trained on all tasks."""

    config: MoELoRAConfig
    prefix = "moelora"
    export_refusal = "mixes its LoRA experts per token through routers kept in method_state.pt"

    def __init__(self, config: MoELoRAConfig | None = None) -> None:
        super().__init__(config or MoELoRAConfig())

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        self.record_usage(ctx, task)
