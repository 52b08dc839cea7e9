"""The shared part of the mixture-of-LoRA-experts methods (MoE-LoRA, CL-MoE): their settings, the
experts' life cycle across tasks, the balancing loss and routed evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.common.experts import LoRAExperts
from retain.models.forward import StepOutputs

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


class MoEMethod(ContinualMethod):
    """Common base of the mixture-of-LoRA-experts methods: routers in the method state, routes at test.

    Subclasses provide `config` with num_experts, top_k, balance_coef and record_routes.
    """

    supports_full_finetuning = False
    decides_eval_model = True
    stats_top_k = 1
    prefix = "moe"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.moe: LoRAExperts | None = None
        self.pending: dict[str, torch.Tensor] | None = None
        self.usage: dict[str, torch.Tensor] = {}  # task name -> (L, E) top-k counts while training it

    def setup(self, ctx: MethodContext) -> None:
        self.moe = LoRAExperts(
            ctx.model,
            self.config.num_experts,
            top_k=self.config.top_k,
            stats_top_k=self.stats_top_k,
            balance=self.config.balance_coef > 0,
        )
        if self.pending is not None:
            self.moe.load_router_state(self.pending)
            self.pending = None

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        self.moe.set_task_gates(None)
        self.moe.reset_statistics()
        self.moe.ensure_trainable()

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        aux = self.moe.pop_balance_loss()
        if aux is None:
            return outputs.loss
        ctx.log(f"{self.prefix}/balance", aux)
        return outputs.loss + self.config.balance_coef * aux

    def record_usage(self, ctx: MethodContext, task: Task) -> torch.Tensor:
        """Store and log the task's expert usage (share of top-k selections per expert, all layers), with
        the counts summed over all processes."""
        counts = self.moe.reduced_counts()
        self.usage[task.name] = counts
        share = counts.sum(0).double() / counts.sum().clamp(min=1)
        for expert, value in enumerate(share.tolist()):
            ctx.log(f"{self.prefix}/expert{expert}_share", value)
        return counts

    def prepare_eval(self, ctx: MethodContext, task: Task) -> None:
        """Set the model's routing for answering `task` (CL-MoE blends in the task-level router)."""

    def eval_routes(self, ctx: MethodContext, task: Task) -> list[str] | None:
        """With `record_routes`, per test instance of `task` (in order): the expert its prompt tokens
        weighted most, over all layers (one prompt-only forward); otherwise None.

        The routing itself is soft and per token, so every route is answered by the same model; the route
        is only a record of where each instance went. It is off by default because evaluation answers
        each route's instances as a separate group, which splits the generation batches.
        """
        self.prepare_eval(ctx, task)
        if not self.config.record_routes or not task.test:
            return None
        profiles = self.moe.instance_profiles(ctx, task.test, ctx.config.eval.batch_size)
        return [f"expert{int(i)}" for i in profiles.mean(1).argmax(-1)]

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        self.prepare_eval(ctx, task)
        return ctx.model

    def state_dict(self) -> dict[str, Any]:
        routers = self.moe.router_state() if self.moe is not None else dict(self.pending or {})
        return {"routers": routers, "usage": {k: v.clone() for k, v in self.usage.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.usage = dict(state.get("usage", {}))
        routers = state.get("routers")
        if routers:
            if self.moe is None:
                self.pending = dict(routers)
            else:
                self.moe.load_router_state(routers)

    def restore(self, ctx: MethodContext) -> None:
        self.moe.set_task_gates(None)
        self.moe.ensure_trainable()
