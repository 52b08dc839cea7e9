"""A transformers.Trainer whose loss is the method's and whose optimizer step runs the method's hooks.

The method sees the accumulated gradient before clipping (`before_optimizer_step`) and the updated
weights after the step (`after_optimizer_step`); see docs/architecture.md, "The method hooks".

Under DeepSpeed the optimizer step happens inside the backward pass (accelerate's DeepSpeedEngineWrapper
calls `engine.step()` right after `engine.backward()` at an accumulation boundary; the Trainer's own
`optimizer.step()` is then a no-op), so `before_optimizer_step` runs from the engine's `step` instead,
before DeepSpeed clips and steps. On a CPU-only host the strategy fixes of retain.engine.strategies apply.

The task loss of an optimizer step is the mean over the response tokens of all its micro-batches on all
processes (as transformers' own losses with `num_items_in_batch`), so one process with accumulation and
several processes with the same global batch take the same step even when micro-batches hold different
numbers of response tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from retain.data.batching import IGNORE_INDEX
from retain.engine.strategies import promote_cpu_fsdp
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.forward import response_forward

logger = logging.getLogger(__name__)


class _MethodHooks(TrainerCallback):
    def __init__(self, method: ContinualMethod, ctx: MethodContext, trainer: Trainer) -> None:
        self.method, self.ctx, self.trainer = method, ctx, trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer.is_deepspeed_enabled:
            self._before_deepspeed_steps(self.trainer.model_wrapped)

    def _before_deepspeed_steps(self, engine) -> None:
        """Run the method's before_optimizer_step in `engine.step` (this engine instance only) at each
        accumulation boundary, before DeepSpeed clips and updates."""
        real_step = engine.step

        def step(*args, **kwargs):
            if engine.is_gradient_accumulation_boundary():
                self.method.before_optimizer_step(self.ctx, self.trainer.model)
            return real_step(*args, **kwargs)

        engine.step = step

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # With clipping on, the hook already ran before clipping (ContinualTrainer._clip_grad_norm); under
        # DeepSpeed it ran in the engine's step.
        clipping = args.max_grad_norm is not None and args.max_grad_norm > 0
        if not clipping and not self.trainer.is_deepspeed_enabled:
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

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        promote_cpu_fsdp(self)  # accelerate keeps DDP on CPU process groups even when FSDP is asked for

    def create_optimizer(self, model=None):
        # A method may bring its own optimizer (CoSO's projected Adam); the schedule is still the Trainer's.
        if self.optimizer is None:
            self.optimizer = self.method.create_optimizer(self.ctx, self.args)
        return self.optimizer if self.optimizer is not None else super().create_optimizer(model)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """The response tokens of one optimizer step: over its micro-batches and, summed, every process.

        transformers counts them only for models that take `num_items_in_batch`; our loss is computed
        here (response_forward), so they are counted here, as the base class does (labels shifted by one).
        """
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        tokens = sum(batch["labels"][..., 1:].ne(IGNORE_INDEX).sum() for batch in batch_samples)
        tokens = torch.as_tensor(tokens, device=device)
        if self.accelerator.num_processes > 1:
            tokens = self.accelerator.gather(tokens).sum()
        return tokens

    def _token_weight(self, outputs, num_items_in_batch) -> torch.Tensor | float:
        """The factor that turns this micro-batch's token-mean loss into its share of the step's token
        mean, given that the Trainer divides by the accumulation steps and DDP averages over processes:
        tokens here x accumulation steps x processes / tokens of the step (1 when every micro-batch
        holds as many response tokens)."""
        if num_items_in_batch is None:
            return 1.0
        tokens = (outputs.labels != IGNORE_INDEX).sum()
        # the micro-batches of this step (fewer than gradient_accumulation_steps at an epoch's short end)
        accumulation = getattr(
            self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps
        )
        steps = accumulation * self.accelerator.num_processes
        return tokens * steps / torch.as_tensor(num_items_in_batch, device=tokens.device).clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = response_forward(model, inputs)
        self.ctx.log("loss/task", outputs.loss)
        # Penalties the method adds count once per optimizer step; only the task loss is token-weighted.
        weighted = dataclasses.replace(
            outputs, loss=outputs.loss * self._token_weight(outputs, num_items_in_batch)
        )
        loss = self.method.loss(self.ctx, model, inputs, weighted)
        return (loss, outputs) if return_outputs else loss

    def _clip_grad_norm(self, model):
        # Methods see the accumulated (and, under DDP, all-reduced) gradient before it is clipped, as
        # GEM's projection and LCIA's reference code expect; then the result is clipped. (Under DeepSpeed
        # the step is already done here: the hook ran in the engine's step.)
        if not self.is_deepspeed_enabled:
            self.method.before_optimizer_step(self.ctx, model)
        return super()._clip_grad_norm(model)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        for name, values in self.ctx.logged.items():
            if values:
                logs[name] = sum(float(v) for v in values) / len(values)
        self.ctx.logged.clear()
        super().log(logs, *args, **kwargs)
