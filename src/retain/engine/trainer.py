"""A transformers.Trainer whose loss is the method's and whose optimizer step runs the method's hooks.

The method sees the accumulated gradient before clipping (`before_optimizer_step`) and the updated
weights after the step (`after_optimizer_step`); see docs/architecture.md, "The method hooks".
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from retain.methods.base import ContinualMethod, MethodContext
from retain.models.forward import response_forward

logger = logging.getLogger(__name__)


class _MethodHooks(TrainerCallback):
    def __init__(self, method: ContinualMethod, ctx: MethodContext, trainer: Trainer) -> None:
        self.method, self.ctx, self.trainer = method, ctx, trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # With clipping on, the hook already ran before clipping (ContinualTrainer._clip_grad_norm).
        if args.max_grad_norm is None or args.max_grad_norm <= 0:
            self.method.before_optimizer_step(self.ctx, self.trainer.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_optimizer_step(self.ctx, self.trainer.model)


class _QuietProgress(ProgressCallback):
    """The step bar, labelled with the task it trains, without the raw log dict written under it (the logs
    go to train_log.json and the trackers)."""

    def __init__(self, label: str | None = None) -> None:
        super().__init__()
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None and self.label:
            self.training_bar.set_description(self.label)

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class ContinualTrainer(Trainer):
    """transformers.Trainer whose loss is the method's, with the method's step hooks around the update."""

    def __init__(
        self,
        *args: Any,
        method: ContinualMethod,
        ctx: MethodContext,
        progress_label: str | None = None,
        **kwargs: Any,
    ) -> None:
        """`progress_label` (e.g. "task 2/3 parity") names the task on the training progress bar."""
        super().__init__(*args, **kwargs)
        self.method, self.ctx = method, ctx
        # Our loss is a per-micro-batch mean, so the Trainer must divide it by the accumulation steps;
        # penalties added to it then count once per optimizer step, not once per micro-batch.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.add_callback(_MethodHooks(method, ctx, self))
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(_QuietProgress(progress_label))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = response_forward(model, inputs)
        self.ctx.log("loss/task", outputs.loss)
        loss = self.method.loss(self.ctx, model, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        # Methods see the accumulated (and, under DDP, all-reduced) gradient before it is clipped, as
        # GEM's projection and LCIA's reference code expect; then the result is clipped.
        self.method.before_optimizer_step(self.ctx, model)
        return super()._clip_grad_norm(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for name, values in self.ctx.logged.items():
            if values:
                logs[name] = sum(float(v) for v in values) / len(values)
        self.ctx.logged.clear()
        super().log(logs, *args, **kwargs)
