"""Dynamic ConPET: one LoRA module per task and a trained module selector (Song et al., "ConPET:
Continual Parameter-Efficient Tuning for Large Language Models", arXiv 2309.14763, 2023).

Task t trains a fresh adapter alone (earlier adapters frozen, so they never change): task 1 the adapter
'default' that the model is created with (so no untrained adapter is saved), task t > 1 `task<t>`. After
the task, a selector g: features -> task scores is trained with its own optimizer,
min_g CE(g(f(x)), task(x)) over a small per-task memory of prompt features f(x) (the frozen base
model's pooled hidden states of the prompt); at test time each instance x uses the adapter(s)
top-k(g(f(x))). Unlike the selector of the closest existing toolkit (outside the optimizer, token-0
features of a causal LM, misaligned labels), this one is really optimized, reads a pooled or last-token
feature, and is saved with each task's checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import MethodContext, RunSizes, StateItem, earlier_adapters
from retain.methods.common.routing import (
    ROUTE_SEPARATOR,
    FeaturePool,
    RoutedMethod,
    check_feature_settings,
    prompt_features,
    sample_indices,
)
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, add_adapter, peft_model

if TYPE_CHECKING:
    from retain.data.streams import Task


@dataclass
class ConPETConfig:
    top_k: int = field(
        default=1, metadata={"help": "adapters activated per test instance (top-k of the selector)"}
    )
    memory_per_task: int = field(
        default=64, metadata={"help": "training prompts per task whose features train the selector (0: all)"}
    )
    selector_hidden: int = field(
        default=0, metadata={"help": "hidden width of the selector MLP (0: a linear classifier)"}
    )
    selector_steps: int = field(
        default=200, metadata={"help": "optimizer steps of the selector after each task"}
    )
    selector_lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate of the selector"})
    selector_batch_size: int = field(default=64, metadata={"help": "features per selector step"})
    selector_weight_decay: float = field(
        default=1e-4, metadata={"help": "AdamW weight decay of the selector"}
    )
    feature_layer: int = field(
        default=-1, metadata={"help": "hidden_states index the features come from (-1: last layer)"}
    )
    feature_pool: FeaturePool = field(
        default="mean", metadata={"help": "pooling over prompt tokens: mean, or last (the last prompt token)"}
    )
    feature_batch_size: int = field(default=16, metadata={"help": "prompts per feature-extraction forward"})

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.memory_per_task < 0 or self.selector_hidden < 0:
            raise RetainError(
                "config: conpet needs top_k >= 1, memory_per_task >= 0 and selector_hidden >= 0"
            )
        if self.selector_steps < 1 or self.selector_lr <= 0 or self.selector_batch_size < 1:
            raise RetainError(
                "config: conpet needs selector_steps >= 1, selector_lr > 0, selector_batch_size >= 1"
            )
        if self.selector_weight_decay < 0:
            raise RetainError("config: conpet needs selector_weight_decay >= 0")
        check_feature_settings("conpet", self.feature_batch_size)


class TaskSelector(nn.Module):
    """Standardized features -> one score per task of the stream (a linear layer or a 1-hidden-layer MLP)."""

    def __init__(self, dim: int, n_tasks: int, hidden: int = 0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tasks))
        else:
            self.net = nn.Linear(dim, n_tasks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std)


def train_selector(
    selector: TaskSelector,
    features: torch.Tensor,
    labels: torch.Tensor,
    n_seen: int,
    config: ConPETConfig,
    seed: int,
) -> float:
    """Fit the selector to (features, task labels) over the first n_seen tasks; returns the final loss."""
    selector.mean.copy_(features.mean(dim=0))
    selector.std.copy_(features.std(dim=0, unbiased=False).clamp(min=1e-5))
    optimizer = torch.optim.AdamW(
        selector.parameters(), lr=config.selector_lr, weight_decay=config.selector_weight_decay
    )
    generator = torch.Generator().manual_seed(seed)
    selector.train()
    loss = torch.zeros(())
    for _ in range(config.selector_steps):
        index = torch.randint(
            len(labels), (min(config.selector_batch_size, len(labels)),), generator=generator
        )
        loss = F.cross_entropy(selector(features[index])[:, :n_seen], labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    selector.eval()
    return float(loss.detach())


@register("conpet", config=ConPETConfig)
class ConPET(RoutedMethod):
    """Dynamic ConPET: one LoRA adapter per task, chosen per test instance by a trained task selector."""

    config: ConPETConfig
    refused_strategies = {
        "sharded-params": "it computes prompt features with its own forward passes on the unwrapped model "
        "after each task (for its task selector); under FSDP / ZeRO-3 a process holds only a shard of each "
        "parameter",
    }
    export_refusal = "picks an adapter per prompt (by its task selector)"

    def __init__(self, config: ConPETConfig | None = None) -> None:
        super().__init__(config or ConPETConfig())
        self.adapters: list[str] = []  # adapter of each finished task, in stream order
        self.memory: dict[str, torch.Tensor] = {}  # adapter -> [n, hidden] prompt features
        self.selector: TaskSelector | None = None

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        cap = self.config.memory_per_task  # 0: every example (as sample_indices reads it)
        kept = sum(min(n, cap) if cap > 0 else n for n in sizes.train_examples)
        features = StateItem(f"prompt features of the selector's memory ({kept:,})", kept * sizes.hidden_size)
        return [earlier_adapters(sizes), features]

    @staticmethod
    def adapter_for(index: int) -> str:
        return "default" if index <= 1 else f"task{index}"

    def _features(self, ctx: MethodContext, examples: Sequence[Example]) -> torch.Tensor:
        c = self.config
        return prompt_features(ctx, examples, c.feature_layer, c.feature_pool, c.feature_batch_size)

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        name = self.adapter_for(ctx.task_index)
        if name not in peft_model(ctx.model).peft_config:
            add_adapter(ctx.model, name)
        activate_adapters(ctx.model, [name], trainable=[name])

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        name = self.adapter_for(ctx.task_index)
        rng = ctx.rng("conpet")
        own = [e for e in data if "replayed_from" not in e.meta]
        kept = sample_indices(len(own), self.config.memory_per_task, rng)
        self.memory[name] = self._features(ctx, [own[i] for i in kept])
        self.adapters = [*[a for a in self.adapters if a != name], name]
        activate_adapters(ctx.model, [name], trainable=[])
        features = torch.cat([self.memory[a] for a in self.adapters])
        labels = torch.cat(
            [torch.full((len(self.memory[a]),), i, dtype=torch.long) for i, a in enumerate(self.adapters)]
        )
        seed = rng.randrange(2**31)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.selector = TaskSelector(features.shape[1], len(ctx.tasks), self.config.selector_hidden)
        if len(self.adapters) > 1:
            loss = train_selector(self.selector, features, labels, len(self.adapters), self.config, seed)
            ctx.log("conpet/selector_loss", loss)
        with torch.no_grad():
            predicted = self.selector(features)[:, : len(self.adapters)].argmax(dim=-1)
        ctx.log("conpet/selector_train_accuracy", (predicted == labels).float().mean())

    def route(self, ctx: MethodContext, task: Task) -> list[str]:
        if not self.adapters:
            return ["default"] * len(task.test)
        if len(self.adapters) == 1 or self.selector is None:
            return [self.adapters[0]] * len(task.test)
        with torch.no_grad():
            scores = self.selector(self._features(ctx, task.test))[:, : len(self.adapters)]
        k = min(self.config.top_k, len(self.adapters))
        top = scores.topk(k, dim=-1).indices.sort(dim=-1).values
        return [ROUTE_SEPARATOR.join(self.adapters[i] for i in row) for row in top.tolist()]

    def restore(self, ctx: MethodContext) -> None:
        activate_adapters(ctx.model, self.adapters[-1:] or ["default"], trainable=[])

    def state_dict(self) -> dict[str, Any]:
        selector = None
        if self.selector is not None:
            selector = {k: v.clone() for k, v in self.selector.state_dict().items()}
        return {"adapters": list(self.adapters), "memory": dict(self.memory), "selector": selector}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters = list(state.get("adapters", []))
        self.memory = dict(state.get("memory", {}))
        weights = state.get("selector")
        self.selector = None
        if weights is not None:
            hidden = weights["net.0.weight"].shape[0] if "net.0.weight" in weights else 0
            n_tasks = (weights["net.2.weight"] if hidden else weights["net.weight"]).shape[0]
            self.selector = TaskSelector(weights["mean"].shape[0], n_tasks, hidden)
            self.selector.load_state_dict(weights)
            self.selector.eval()
