"""The method interface: a continual-learning method overrides only the hooks it needs.

The loop (training/loop.py) calls, for each task: before_task -> training_data -> (every step: loss,
before_optimizer_step, after_optimizer_step) -> after_task -> checkpoint (state_dict) -> evaluation
(eval_model). See ARCHITECTURE.md, "The method interface".
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from retain.data.formats import Example

if TYPE_CHECKING:
    from retain.config import RunConfig
    from retain.data.streams import Task


@dataclass
class StepOutputs:
    """What one training forward produced: the response-token loss and the logits it came from.

    `logits[:, i]` predicts `labels[:, i]`; positions whose label is -100 are not learned. Only the
    window of positions that hold responses is kept (the LM head is not applied to the prompt).
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    keep: int  # number of final positions the logits cover (pass as logits_to_keep to reproduce them)


@dataclass
class MethodContext:
    """What hooks may use: the model, the tokenizer, the stream and where the run lives."""

    model: nn.Module
    tokenizer: Any
    config: RunConfig
    tasks: list[Task]
    task_index: int = 0  # 1-based index of the current task (0 before the first)
    run_dir: str | None = None
    rank: int = 0
    world_size: int = 1
    encode: Any = None  # callable(list[Example]) -> list of features, the training encoding
    collate: Any = None  # callable(list of features) -> batch of tensors
    forward: Any = None  # callable(model, batch, keep=None) -> StepOutputs, the training forward
    logged: dict[str, list[float | torch.Tensor]] = field(default_factory=lambda: defaultdict(list))

    @property
    def task(self) -> Task:
        return self.tasks[self.task_index - 1]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def log(self, name: str, value: float | torch.Tensor) -> None:
        """Record a scalar (a loss term, a statistic); the trainer logs its mean at each logging step.

        Tensors are kept detached and read only when logged, so logging never waits on the device.
        """
        self.logged[name].append(value.detach() if isinstance(value, torch.Tensor) else float(value))

    def rng(self, salt: str) -> random.Random:
        """A random generator seeded by (run seed, task index, salt): the same on every rank and on resume."""
        return random.Random(f"{self.config.seed}:{self.task_index}:{salt}")


class ContinualMethod:
    """Base class: plain fine-tuning through the stream. Subclasses override the hooks they need."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_cls: ClassVar[type | None] = None
    supports_full_finetuning: ClassVar[bool] = True
    supports_multiprocess: ClassVar[bool] = True
    needs_task_id_at_test: ClassVar[bool] = False
    joint_training: ClassVar[bool] = False  # train once on all tasks (multitask upper bound)

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def setup(self, ctx: MethodContext) -> None:
        """Once, after the model is loaded and wrapped."""

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        """Before training `task` (add an adapter, snapshot a teacher)."""

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        """The examples the task is trained on (replay methods mix memory in)."""
        return data

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        """The total loss of one micro-batch; the trainer divides it by the accumulation steps."""
        return outputs.loss

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        """Once per optimizer step, on the accumulated gradient, before clipping and the update."""

    def after_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        """After each optimizer update."""

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        """After training `task` (Fisher, memory, EMA write-back)."""

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        """The model that answers `task`'s test prompts."""
        return ctx.model

    def eval_routes(self, ctx: MethodContext, task: Task) -> list[str] | None:
        """Per-instance routing: the route (adapter, group, expert) of each test example, or None.

        When a method returns routes, evaluation answers the instances of each route together after
        `activate_route`, and records the route of every instance in the predictions file.
        """
        return None

    def activate_route(self, ctx: MethodContext, route: str) -> nn.Module:
        """Prepare the model to answer the instances routed to `route`; returns the model to use."""
        return ctx.model

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after a task (saved in tasks/<k>-<name>/method_state.pt)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    def restore(self, ctx: MethodContext) -> None:
        """After a checkpoint's weights and this method's state are loaded: re-apply model-side state
        (which adapters are active or trainable, routing) for the task the checkpoint ended."""
