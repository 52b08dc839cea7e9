"""Shared machinery of the routing methods (ConPET, ABSCL, LCIA): prompt features, per-instance routes.

Features are read from the frozen base model (every adapter disabled) on exactly the prompt the model
answers at test time (`encode_prompt`), so the features of a training example stored after task k and
the features of a test instance computed at evaluation come from the same model and the same text,
whatever adapters were trained in between. Registers no method.

Routing protocol: a routing method decides one route (a string naming the adapters to activate) per
test instance with `route(ctx, task)`. Evaluation asks `eval_routes` for them, answers the instances of
each route together after `activate_route`, and records each instance's route in the predictions file;
`eval_model` (a caller without per-instance routing) answers the whole task through its most common route.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from retain.data.batching import IGNORE_INDEX
from retain.data.encode import encode_prompt_inputs
from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.models.adapters import activate_adapters, peft_model, unwrap
from retain.models.forward import hidden_states

if TYPE_CHECKING:
    from retain.data.streams import Task

logger = logging.getLogger(__name__)

FeaturePool = Literal["mean", "last"]  # prompt feature: mean over tokens or the last token
ROUTE_SEPARATOR = "+"


def check_feature_settings(method: str, batch_size: int) -> None:
    """Validate the feature settings shared by the routing methods' configs (the pool is a Literal)."""
    if batch_size < 1:
        raise RetainError(f"config: {method} feature_batch_size must be >= 1, got {batch_size}")


def _lora_flags(model: nn.Module) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in unwrap(model).named_parameters() if "lora_" in n}


def prompt_batches(
    ctx: MethodContext, examples: Sequence[Example], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The examples' test prompts (`encode_prompt_inputs`, with their images for an image-text model),
    batched by `ctx.collate` (left padding, position ids) and moved to the model's device, `batch_size`
    at a time."""
    for start in range(0, len(examples), batch_size):
        features = []
        for example in examples[start : start + batch_size]:
            inputs = encode_prompt_inputs(ctx.tokenizer, example, ctx.processor)
            features.append({**inputs, "labels": [IGNORE_INDEX] * len(inputs["input_ids"])})
        yield {k: v.to(ctx.device) for k, v in ctx.collate(features).items()}


@torch.no_grad()
def prompt_features(
    ctx: MethodContext, examples: Sequence[Example], layer: int = -1, pool: str = "mean", batch_size: int = 16
) -> torch.Tensor:
    """[N, hidden] fp32 features of the examples' test prompts from the base model with adapters disabled.

    `layer` indexes the model's hidden_states (-1: the last layer's output after the final norm);
    `pool` is "mean" (mean over the prompt tokens) or "last" (the last prompt token, which in a causal
    LM has read the whole prompt; token 0 has read nothing but itself).
    """
    if not examples:
        return torch.zeros(0, 0)
    inner = peft_model(ctx.model)
    flags, active = _lora_flags(inner), list(inner.active_adapters)
    was_training = inner.training
    inner.eval()
    out: list[torch.Tensor] = []
    try:
        with inner.disable_adapter():
            for batch in prompt_batches(ctx, examples, batch_size):
                hidden = hidden_states(inner, batch)[layer]
                hidden = hidden.float().cpu()
                if pool == "last":
                    out.append(hidden[:, -1])  # left padding: every prompt ends at the last column
                else:
                    weights = batch["attention_mask"].cpu().unsqueeze(-1).float()
                    out.append((hidden * weights).sum(dim=1) / weights.sum(dim=1))
    finally:
        # Re-enabling the adapter layers re-marks the active adapters trainable; put things back as they were.
        inner.base_model.set_adapter(active)
        params = dict(inner.named_parameters())
        for name, flag in flags.items():
            params[name].requires_grad_(flag)
        inner.train(was_training)
    return torch.cat(out)


def sample_indices(n: int, k: int, rng: random.Random) -> list[int]:
    """A random subset of k of range(n) drawn with `rng` (all of them when k <= 0 or k >= n), in order."""
    if k <= 0 or k >= n:
        return list(range(n))
    return sorted(rng.sample(range(n), k))


def most_common(routes: Sequence[str], default: str) -> str:
    """The most frequent route (the first seen among ties), or `default` for no routes."""
    return Counter(routes).most_common(1)[0][0] if routes else default


class RoutedMethod(ContinualMethod):
    """A method that answers each test instance with the adapters its route names.

    Subclasses implement `route` (one route per test instance) and, where a route is not a '+'-joined
    list of adapter names, `route_adapters`; evaluation uses `activate_route` per group of instances
    sharing a route.
    """

    supports_full_finetuning = False
    decides_eval_model = True
    adds_adapters = freezes_adapters = switches_adapters = True

    def route(self, ctx: MethodContext, task: Task) -> list[str]:
        """The route (adapter names joined by '+') of every test instance of `task`, in order."""
        raise NotImplementedError

    def route_adapters(self, name: str) -> list[str]:
        """The adapters a route activates."""
        return name.split(ROUTE_SEPARATOR)

    def activate_route(self, ctx: MethodContext, name: str) -> nn.Module:
        """Activate the adapters of route `name` (all frozen); returns the model to generate with."""
        activate_adapters(ctx.model, self.route_adapters(name), trainable=[])
        return ctx.model

    def eval_routes(self, ctx: MethodContext, task: Task) -> list[str]:
        """Evaluation's per-instance hook: the routes of `task`'s test instances (logged as counts)."""
        routes = self.route(ctx, task)
        logger.info("%s: %s routed %s", self.name, task.name, dict(Counter(routes)))
        return routes

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        """Without per-instance routing: the whole task answered through its most common route."""
        return self.activate_route(ctx, most_common(self.route(ctx, task), "default"))
