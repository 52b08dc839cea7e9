"""Learning without Forgetting for language models (Li & Hoiem, 2016), distilling on response tokens.

Teacher: the model as it was before the current task (its trainable weights are snapshotted in
before_task; the forward substitutes them with torch.func.functional_call, so nothing is copied into the
model and no full-vocabulary logits are ever cached). The snapshot is retaken in before_task, so a
resumed run needs no saved teacher. Loss on each step:
L = L_task + alpha * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T)),
averaged over response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from retain.data.batching import IGNORE_INDEX
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
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

    def __init__(self, config: LwFConfig | None = None) -> None:
        super().__init__(config or LwFConfig())
        self.teacher: dict[str, torch.Tensor] = {}

    def before_task(self, ctx: MethodContext, task) -> None:
        self.teacher = snapshot_trainable(ctx.model)

    def teacher_logits(self, model, batch: dict, keep: int) -> torch.Tensor:
        inner = unwrap(model)
        weights = {
            n: w.to(dtype=p.dtype)
            for (n, w), p in zip(self.teacher.items(), self._params(inner), strict=True)
        }
        return forward_with_weights(inner, weights, batch, keep).logits[:, :-1]

    def _params(self, inner):
        params = dict(inner.named_parameters())
        return [params[n] for n in self.teacher]

    def loss(self, ctx: MethodContext, model, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        if not self.teacher or self.config.lwf_alpha == 0.0:
            return outputs.loss
        teacher = self.teacher_logits(model, batch, outputs.keep)
        kl = response_kl(outputs.logits, teacher, outputs.labels, self.config.temperature)
        ctx.log("lwf/kl", kl)
        return outputs.loss + self.config.lwf_alpha * kl
