"""The training step: batching, the response-only forward, and a Trainer that calls the method's hooks.

The forward applies the LM head only to the final window of positions that holds responses (batches
are left-padded, so responses line up at the end), via transformers' `logits_to_keep`; it goes through
the model's own forward, so DDP, PEFT and any Hugging Face causal LM work unchanged.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import Trainer, TrainerCallback

from retain.methods.base import ContinualMethod, MethodContext, StepOutputs
from retain.models.adapters import unwrap

logger = logging.getLogger(__name__)
IGNORE = -100


def collate(features: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad input_ids/labels/attention_mask and derive position_ids that skip the padding."""
    length = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(features), length), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, length - n :] = torch.tensor(f["input_ids"])
        labels[i, length - n :] = torch.tensor(f["labels"])
        attention[i, length - n :] = 1
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention,
        "position_ids": position_ids,
    }


def response_window(labels: torch.Tensor) -> int:
    """How many final positions need logits: from the token before the first label to the end."""
    learned = (labels != IGNORE).any(dim=0)
    if not learned.any():
        return 1
    first = int(learned.nonzero()[0])
    return labels.shape[1] - max(first - 1, 0)


def _response_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], keep: int | None, output_hidden_states: bool
) -> tuple[StepOutputs, Any]:
    labels = batch["labels"]
    keep = keep or response_window(labels)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=output_hidden_states,
    )
    logits = out.logits[:, :-1]
    targets = labels[:, labels.shape[1] - keep + 1 :]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
    return StepOutputs(loss=loss, logits=logits, labels=targets, keep=keep), out


def response_forward(
    model: nn.Module, batch: dict[str, torch.Tensor], keep: int | None = None
) -> StepOutputs:
    """Forward with the LM head on the response window only; token-mean cross-entropy on responses."""
    return _response_forward(model, batch, keep, output_hidden_states=False)[0]


def response_forward_with_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor], keep: int | None = None
) -> tuple[StepOutputs, tuple[torch.Tensor, ...]]:
    """`response_forward` that also returns the hidden states of every layer (embeddings first)."""
    outputs, out = _response_forward(model, batch, keep, output_hidden_states=True)
    return outputs, out.hidden_states


def hidden_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Every layer's hidden states for a collated batch (embeddings first), with only one logit computed."""
    return model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
    ).hidden_states


class FeatureDataset(torch.utils.data.Dataset):
    """A list of encoded examples."""

    def __init__(self, features: list[dict[str, list[int]]]) -> None:
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.features[index]


class _MethodHooks(TrainerCallback):
    def __init__(self, method: ContinualMethod, ctx: MethodContext, trainer: Trainer) -> None:
        self.method, self.ctx, self.trainer = method, ctx, trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # With clipping on, the hook already ran before clipping (ContinualTrainer._clip_grad_norm).
        if args.max_grad_norm is None or args.max_grad_norm <= 0:
            self.method.before_optimizer_step(self.ctx, self.trainer.model)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.method.after_optimizer_step(self.ctx, self.trainer.model)


class ContinualTrainer(Trainer):
    """transformers.Trainer whose loss is the method's, with the method's step hooks around the update."""

    def __init__(self, *args: Any, method: ContinualMethod, ctx: MethodContext, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.method, self.ctx = method, ctx
        # Our loss is a per-micro-batch mean, so the Trainer must divide it by the accumulation steps;
        # penalties added to it then count once per optimizer step, not once per micro-batch.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False
        self.add_callback(_MethodHooks(method, ctx, self))

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


@torch.no_grad()
def forward_with_weights(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    keep: int = 1,
    *,
    output_hidden_states: bool = False,
) -> Any:
    """The model's output (no gradient) with the named parameters replaced by `weights` for this forward
    only (torch.func.functional_call on the unwrapped model: nothing is copied into the model)."""
    return functional_call(
        unwrap(model),
        weights,
        args=(),
        kwargs={
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "position_ids": batch["position_ids"],
            "logits_to_keep": keep,
            "use_cache": False,
            "output_hidden_states": output_hidden_states,
        },
        strict=False,
    )
