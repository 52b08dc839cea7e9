"""Combining methods: `method: {name: replay, plus: [ewc]}` runs replay and EWC together.

Each hook runs every component in order; training data passes through each component's
`training_data`; the loss is the task loss plus every component's extra term (each component's
`loss` minus the task loss), so penalties add up rather than replace each other.

Refused when the config is read, with the reason:
- `multitask` combines with nothing: it trains once on all tasks, there is no stream to protect.
- a method cannot be combined with itself.
- at most one component may decide which model answers at evaluation (`decides_eval_model`: the
  adapter, EMA and routing methods); two of them would fight over the active adapters.
- at most one component may bring its own optimizer (`create_optimizer`: coso).
- a component whose needs another component breaks (`CONFLICTS`, from the capability flags in
  methods/base.py): the generation-based rehearsal methods (lamol, ssr) generate from the model a task
  starts from, which the adapter-switching methods (conpet, abscl, lcia) replace at the start of a task.

What a combination can do safely is handled by the methods themselves rather than refused: EWC follows
whatever is trainable (adapters added or frozen by another component), and LwF takes its teacher at the
task's first loss call, with the adapters that were active while the previous task trained.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.models.forward import StepOutputs

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from retain.data.streams import Task


# (need, effect, why): a component with the need cannot be combined with a component with the effect.
CONFLICTS: list[tuple[str, str, str]] = [
    (
        "needs_previous_model_at_start",
        "switches_adapters",
        "{needs} generates its pseudo samples from the model a task starts from, but {breaks} switches the "
        "active adapters at the start of each task, so that model is not the one the previous task ended "
        "with",
    ),
]
FLAGS = ("adds_adapters", "freezes_adapters", "switches_adapters", "needs_previous_model_at_start")


def overrides(method: ContinualMethod, hook: str) -> bool:
    """Whether `method`'s class replaces the base class's `hook`."""
    return getattr(type(method), hook) is not getattr(ContinualMethod, hook)


def check_needs(components: list[ContinualMethod]) -> None:
    """Refuse a combination in which a component breaks what another one needs, naming both and why."""
    for need, effect, why in CONFLICTS:
        for needs in components:
            for breaks in components:
                if needs is not breaks and getattr(needs, need) and getattr(breaks, effect):
                    raise RetainError(
                        f"config: {needs.name} cannot be combined with {breaks.name}: "
                        + why.format(needs=needs.name, breaks=breaks.name)
                    )


class Combined(ContinualMethod):
    """Several methods applied together; the first one is the main method."""

    def __init__(self, components: list[ContinualMethod]) -> None:
        super().__init__(None)
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise RetainError(f"config: method '{names[0]}' is listed twice in method.plus")
        joint = [c.name for c in components if c.joint_training]
        if joint:
            raise RetainError(
                f"config: '{joint[0]}' trains once on all tasks and cannot be combined with other methods"
            )
        shaping = [c.name for c in components if c.decides_eval_model]
        if len(shaping) > 1:
            raise RetainError(
                f"config: {' and '.join(shaping)} both decide which adapters answer at evaluation; "
                "combine at most one of them with regularization or rehearsal methods"
            )
        optimizers = [c.name for c in components if overrides(c, "create_optimizer")]
        if len(optimizers) > 1:
            raise RetainError(
                f"config: {' and '.join(optimizers)} both bring their own optimizer; combine at most one of "
                "them with other methods"
            )
        check_needs(components)
        self._components = components
        self.name = "+".join(names)
        self.supports_full_finetuning = all(c.supports_full_finetuning for c in components)
        self.supports_images = all(c.supports_images for c in components)
        self.needs_task_id_at_test = any(c.needs_task_id_at_test for c in components)
        self.decides_eval_model = any(c.decides_eval_model for c in components)
        for flag in FLAGS:
            setattr(self, flag, any(getattr(c, flag) for c in components))
        self.router = next((c for c in components if c.decides_eval_model), components[0])

    @property
    def components(self) -> list[ContinualMethod]:
        return self._components

    def setup(self, ctx: MethodContext) -> None:
        for c in self.components:
            c.setup(ctx)

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        for c in self.components:
            c.before_task(ctx, task)

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        for c in self.components:
            data = c.training_data(ctx, task, data)
        return data

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        total = outputs.loss
        for c in self.components:
            total = total + (c.loss(ctx, model, batch, outputs) - outputs.loss)
        return total

    def create_optimizer(self, ctx: MethodContext, args: TrainingArguments) -> torch.optim.Optimizer | None:
        return next((o for c in self.components if (o := c.create_optimizer(ctx, args)) is not None), None)

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        for c in self.components:
            c.before_optimizer_step(ctx, model)

    def after_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        for c in self.components:
            c.after_optimizer_step(ctx, model)

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        for c in self.components:
            c.after_task(ctx, task, data)

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        return self.router.eval_model(ctx, task)

    def eval_routes(self, ctx: MethodContext, task: Task) -> list[str] | None:
        return self.router.eval_routes(ctx, task)

    def activate_route(self, ctx: MethodContext, route: str) -> nn.Module:
        return self.router.activate_route(ctx, route)

    def restore(self, ctx: MethodContext) -> None:
        self.router.restore(ctx)

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        # each part named by its component, as the dry run lists them
        return [
            replace(item, what=f"{c.name}: {item.what}")
            for c in self.components
            for item in c.state_estimate(sizes)
        ]

    def trained_params_estimate(self, sizes: RunSizes) -> int | None:
        counts = [n for c in self.components if (n := c.trained_params_estimate(sizes)) is not None]
        return min(counts) if counts else None

    def optimizer_state_estimate(self, sizes: RunSizes) -> StateItem | None:
        estimates = (c.optimizer_state_estimate(sizes) for c in self.components)
        return next((e for e in estimates if e is not None), None)

    def state_dict(self) -> dict[str, Any]:
        return {c.name: c.state_dict() for c in self.components}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for c in self.components:
            c.load_state_dict(state.get(c.name, {}))
