"""Learning without Forgetting for language models (Li & Hoiem, 2016), distilling on response tokens.

Teacher: the model as it was at the end of the previous task. Its trainable weights are snapshotted
lazily, at the first `loss` call of the task: by then every component of a combination has added,
activated or frozen its adapters (so the snapshot is of the adapter actually being trained), and no
update has happened yet (under gradient accumulation too: the first micro-batch comes before the first
optimizer step). The forward substitutes the snapshot with torch.func.functional_call, so nothing is
copied into the model and no full-vocabulary logits are ever cached. When another component switched the
active adapters at the start of the task (ConPET's fresh adapter, ABSCL's new domain adapter), the teacher
forward activates the adapters that were active while the previous task trained (recorded at every
`loss` call and saved in the method state, so a resumed run has them). Task 1 has no previous task and
no term. Loss on each step of task t > 1:
L = L_task + alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)),
averaged over response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeftModel

from retain.data.batching import IGNORE_INDEX
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.registry import register
from retain.models.adapters import snapshot_trainable, unwrap
from retain.models.forward import StepOutputs, forward_with_weights


@dataclass
class LwFConfig:
    lwf_alpha: float = field(default=1.0, metadata={"help": "weight of the distillation term"})
    temperature: float = field(default=2.0, metadata={"help": "softmax temperature T of the KL"})

    def __post_init__(self) -> None:
        if self.lwf_alpha < 0 or self.temperature <= 0:
            raise RetainError("config: lwf needs lwf_alpha >= 0 and temperature > 0")


def response_kl(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) per response token (labels != IGNORE_INDEX), averaged over them."""
    mask = labels != IGNORE_INDEX
    if not mask.any():
        return student.new_zeros(())
    s = F.log_softmax(student[mask].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[mask].float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    return kl * temperature**2


@register("lwf", config=LwFConfig)
class LwF(ContinualMethod):
    """Learning without Forgetting: KL distillation to the model from before the current task."""

    config: LwFConfig
    refused_strategies = {
        "sharded-params": "it snapshots the trainable parameters as the teacher and runs the teacher's "
        "forward with them (functional_call); under FSDP / ZeRO-3 a process holds only a shard of each "
        "parameter",
    }

    def __init__(self, config: LwFConfig | None = None) -> None:
        super().__init__(config or LwFConfig())
        self.teacher: dict[str, torch.Tensor] = {}
        self.active: list[str] = []  # the adapters active while the latest task trained (PEFT only)
        self.teacher_active: list[str] = []  # those of the previous task: the teacher's
        self._pending = False  # the teacher is taken at the task's first loss call

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        return [StateItem("teacher: a copy of the trainable weights", sizes.trainable_params)]

    def before_task(self, ctx: MethodContext, task) -> None:
        self.teacher, self.teacher_active = {}, []
        self._pending = ctx.task_index > 1

    @staticmethod
    def _active(model) -> list[str]:
        inner = unwrap(model)
        return list(inner.active_adapters) if isinstance(inner, PeftModel) else []

    def take_teacher(self, model) -> None:
        """The previous task's model: the trainable weights as they are before the task's first update,
        and the adapters that were active while the previous task trained."""
        self.teacher = snapshot_trainable(model)
        self.teacher_active = list(self.active)
        self._pending = False

    def teacher_logits(self, model, batch: dict, keep: int) -> torch.Tensor:
        inner = unwrap(model)
        params = dict(inner.named_parameters())
        weights = {n: w.to(dtype=params[n].dtype) for n, w in self.teacher.items()}
        current = self._active(inner)
        if not self.teacher_active or self.teacher_active == current:
            return forward_with_weights(inner, weights, batch, keep).logits[:, :-1]
        # PEFT's set_adapter also marks the active adapters trainable: put the flags back afterwards.
        flags = {n: p.requires_grad for n, p in params.items()}
        try:
            inner.base_model.set_adapter(self.teacher_active)
            return forward_with_weights(inner, weights, batch, keep).logits[:, :-1]
        finally:
            inner.base_model.set_adapter(current)
            for n, p in params.items():
                p.requires_grad_(flags[n])

    def loss(self, ctx: MethodContext, model, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        if self._pending:
            self.take_teacher(model)
        self.active = self._active(model)
        if not self.teacher or self.config.lwf_alpha == 0.0:
            return outputs.loss
        teacher = self.teacher_logits(model, batch, outputs.keep)
        kl = response_kl(outputs.logits, teacher, outputs.labels, self.config.temperature)
        ctx.log("lwf/kl", kl)
        return outputs.loss + self.config.lwf_alpha * kl

    def state_dict(self) -> dict[str, Any]:
        return {"active": list(self.active)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = list(state.get("active", []))
