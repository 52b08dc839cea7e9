"""The training forward and its relatives: the response-window forward, hidden states, and a forward
with substituted weights.

The forward applies the LM head only to the final window of positions that holds responses (batches
are left-padded, so responses line up at the end), via transformers' `logits_to_keep`; it goes through
the model's own forward, so DDP, PEFT and any Hugging Face causal LM work unchanged. A batch of an
image-text model also holds the processor's image inputs (pixel_values, image_sizes, image_grid_thw,
pixel_attention_mask: retain.models.vision.IMAGE_INPUT_KEYS); every forward here passes them on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from retain.data.batching import IGNORE_INDEX
from retain.models.adapters import unwrap
from retain.models.vision import image_inputs


@dataclass
class StepOutputs:
    """What one training forward produced: the response-token loss and the logits it came from.

    `logits[:, i]` predicts `labels[:, i]`; positions whose label is IGNORE_INDEX are not learned. Only the
    window of positions that hold responses is kept (the LM head is not applied to the prompt).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keep: int  # number of final positions the logits cover (pass as logits_to_keep to reproduce them)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The model's inputs from a collated batch: the token ids, mask and positions, plus any image inputs.

    Qwen2-VL's rotary positions are 3-D (time, height, width) over the image tokens: with
    image_grid_thw in the batch the model derives them itself from the ids and the attention mask.
    """
    images = image_inputs(batch)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": None if "image_grid_thw" in images else batch["position_ids"],
        **images,
    }


def response_window(labels: torch.Tensor) -> int:
    """How many final positions need logits: from the token before the first label to the end."""
    learned = (labels != IGNORE_INDEX).any(dim=0)
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
        **model_inputs(batch),
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=output_hidden_states,
    )
    logits = out.logits[:, :-1]
    targets = labels[:, labels.shape[1] - keep + 1 :]
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
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
        **model_inputs(batch), output_hidden_states=True, logits_to_keep=1, use_cache=False
    ).hidden_states


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
            **model_inputs(batch),
            "logits_to_keep": keep,
            "use_cache": False,
            "output_hidden_states": output_hidden_states,
        },
        strict=False,
    )
