"""The method interface: a continual-learning method overrides only the hooks it needs.

The engine (retain/engine/loop.py) calls, for each task: before_task -> training_data -> (every step:
loss, before_optimizer_step, after_optimizer_step) -> after_task -> checkpoint (state_dict) -> evaluation
(eval_model or eval_routes + activate_route). docs/architecture.md has the table of hooks.
"""

from __future__ import annotations

import functools
import random
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from retain.data.batching import collate
from retain.data.encode import encode_dataset
from retain.data.formats import Example
from retain.errors import RetainError
from retain.models.adapters import adapter_names, unwrap
from retain.models.forward import StepOutputs, response_forward
from retain.runtime import STRATEGIES, STRATEGY_FAMILIES, Strategy

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from retain.config import RunConfig
    from retain.data.streams import Task


@dataclass(frozen=True)
class RunSizes:
    """What a method's state size depends on, known before any weight is loaded: the model's parameter
    counts (engine/memory_estimate.py counts them on the meta device) and the stream's sizes."""

    total_params: int  # parameters of the model as loaded (base weights, adapter included)
    trainable_params: int  # parameters the optimizer updates: the LoRA adapter, or the whole model
    hidden_size: int
    layers: int  # transformer blocks
    train_examples: list[int]  # training examples of each task, in stream order
    cutoff_len: int  # the most tokens of one training example
    # (rows, columns) of the trainable matrices inside the transformer blocks: LoRA's A and B under LoRA,
    # the linear weights under full fine-tuning
    block_matrices: list[tuple[int, int]] = field(default_factory=list)
    block_matrix_names: list[str] = field(default_factory=list)  # their parameter names, when known

    @property
    def tasks(self) -> int:
        return len(self.train_examples)


@dataclass(frozen=True)
class StateItem:
    """One part of a method's state at its largest point in the stream (after the last task unless said)."""

    what: str  # for people: "EMA copy of the adapter", "Fisher diagonal"
    numel: int  # elements
    bytes_per_element: int = 4  # fp32 unless the method keeps it otherwise (token ids: 8, int64)
    on_device: bool = True  # on the accelerator with the model (False: CPU RAM)

    @property
    def bytes(self) -> int:
        return self.numel * self.bytes_per_element


def earlier_adapters(sizes: RunSizes, what: str = "adapters of the earlier tasks (frozen)") -> StateItem:
    """One adapter per finished task kept beside the one in training (fp32, on the device)."""
    return StateItem(what, max(sizes.tasks - 1, 0) * sizes.trainable_params)


def example_memory(sizes: RunSizes, examples: int, what: str = "memory") -> StateItem:
    """`examples` stored examples, counted as their token ids (int64, at most cutoff_len each) in CPU RAM."""
    return StateItem(f"{what} ({examples:,} examples)", examples * sizes.cutoff_len, 8, on_device=False)


@dataclass
class MethodContext:
    """What hooks may use: the model, the tokenizer (and an image-text model's processor), the stream and
    where the run lives.

    Build it with `MethodContext.create`, which wires the training encoding, batching and forward.
    """

    model: nn.Module
    tokenizer: Any
    config: RunConfig
    tasks: list[Task]
    task_index: int = 0  # 1-based index of the current task (0 before the first)
    run_dir: str | None = None
    rank: int = 0
    world_size: int = 1
    bf16: bool = False  # whether training and evaluation run under bf16 autocast
    encode: Callable[[list[Example]], list[dict]] | None = None  # the training encoding
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] | None = None  # features -> batch of tensors
    forward: Callable[..., StepOutputs] | None = None  # (model, batch, keep=None): the training forward
    logged: dict[str, list[float | torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    # The image-text model's processor (None for a text model): `encode` uses it for examples with images,
    # whose features then hold the image inputs (pixel_values, ...) that `collate` batches.
    processor: Any = None

    @classmethod
    def create(
        cls,
        model: nn.Module,
        tokenizer: Any,
        config: RunConfig,
        tasks: list[Task],
        *,
        run_dir: str | None = None,
        rank: int = 0,
        world_size: int = 1,
        bf16: bool = False,
        task_index: int = 0,
        processor: Any = None,
    ) -> MethodContext:
        """The context of a run: examples are encoded as training encodes them (cutoff `train.cutoff_len`;
        with `processor`, an image-text model's, examples with images carry their image inputs), batched
        by left padding and run through the response-window forward."""
        cutoff = config.train.cutoff_len
        return cls(
            model=model,
            tokenizer=tokenizer,
            config=config,
            tasks=tasks,
            task_index=task_index,
            run_dir=run_dir,
            rank=rank,
            world_size=world_size,
            bf16=bf16,
            encode=lambda examples: encode_dataset(
                tokenizer, examples, cutoff, source="method", processor=processor
            ),
            collate=functools.partial(collate, pad_token_id=tokenizer.pad_token_id),
            forward=response_forward,
            processor=processor,
        )

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
    # Capabilities, declared by each method and checked when the config is read.
    supports_full_finetuning: ClassVar[bool] = True
    # Strategies under which the method would run wrong or is unchecked, each with the reason (one sentence
    # completing "<method> is refused under <strategy>: ..."). A key is a strategy name of
    # retain.runtime.STRATEGIES ("fsdp", "zero2", ...) or a family of STRATEGY_FAMILIES ("multiprocess",
    # "sharded-params", "sharded-grads", "sharded-optimizer", "deepspeed", "offload"), which refuses every
    # strategy that has the property. engine/plan.py refuses the run when the config is read; the table in
    # docs/compatibility.md is generated from these declarations (retain methods --strategies).
    refused_strategies: ClassVar[Mapping[str, str]] = {}
    # The method works on data with images (methods that write text-only pseudo samples do not).
    supports_images: ClassVar[bool] = True
    # The method is told which task a test prompt belongs to (an oracle; results.json records it).
    needs_task_id_at_test: ClassVar[bool] = False
    joint_training: ClassVar[bool] = False  # train once on all tasks (multitask upper bound)
    # The method decides which adapters or weights answer at test time (it overrides eval_model,
    # eval_routes, activate_route or restore); at most one such method may be combined with others.
    decides_eval_model: ClassVar[bool] = False
    # What the method does to the model between tasks, and what it needs from it; a combination whose
    # component needs something another component breaks is refused (methods/combine.py, CONFLICTS).
    adds_adapters: ClassVar[bool] = False  # adds LoRA adapters as the stream goes on
    freezes_adapters: ClassVar[bool] = False  # freezes adapters trained on earlier tasks
    # At the start of a task, the active adapters are switched (a fresh adapter alone, another group's
    # adapter, or the previous task's adapter left out), so the model a task starts from is not the model
    # the previous task ended with.
    switches_adapters: ClassVar[bool] = False
    # The method generates from the model a task starts from (pseudo samples of the earlier tasks), so
    # that model must be the one the previous task ended with.
    needs_previous_model_at_start: ClassVar[bool] = False
    # Why `retain export` cannot write the model this method evaluates as one plain model (e.g. it picks
    # adapters per prompt or mixes experts through routers), completing "<method> ..."; None: it can.
    export_refusal: ClassVar[str | None] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.refused_strategies) - set(STRATEGIES) - set(STRATEGY_FAMILIES)
        if unknown:  # a typo would silently allow the strategy it meant to refuse
            raise TypeError(
                f"{cls.__name__}.refused_strategies: unknown key(s) {sorted(unknown)}; use strategies "
                f"{STRATEGIES} or families {STRATEGY_FAMILIES}"
            )

    @property
    def components(self) -> list[ContinualMethod]:
        """The methods this one applies: itself, or each part of a combination."""
        return [self]

    @classmethod
    def declared_refusal(cls, strategy: Strategy) -> str | None:
        """The reason this class declares for refusing `strategy` (its name or one of its families)."""
        return next((why for key, why in cls.refused_strategies.items() if key in strategy.keys), None)

    def strategy_refusal(self, strategy: Strategy) -> str | None:
        """Why this method (or a component of a combination) cannot run under `strategy`, or None."""
        for component in self.components:
            reason = component.declared_refusal(strategy)
            if reason:
                return f"method '{component.name}' is refused under {strategy.label}: {reason}"
        return None

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        """The method's own state beyond the model and its optimizer (EMA copies, Fisher, memories, stored
        gradients, per-task adapters, bases), for `retain run --dry-run`'s memory estimate; per process.
        Sizes only: no weights are loaded. The default is no state (plain fine-tuning)."""
        return []

    def trained_params_estimate(self, sizes: RunSizes) -> int | None:
        """How many of the trainable parameters this method leaves trainable (they get gradients), for the dry
        run's estimate; None: all of them (the default)."""
        return None

    def optimizer_state_estimate(self, sizes: RunSizes) -> StateItem | None:
        """The state of the optimizer this method brings (`create_optimizer`), for the dry run's estimate in
        place of `train.optim`'s; None when the Trainer's optimizer is used (the default)."""
        return None

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

    def create_optimizer(self, ctx: MethodContext, args: TrainingArguments) -> torch.optim.Optimizer | None:
        """The optimizer of the task about to train (its learning rate, betas, epsilon and weight decay from
        `args`; the Trainer's schedule and clipping still apply), or None for the Trainer's own
        (`train.optim`). Called after `training_data`. At most one component of a combination overrides it.
        """
        return None

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

    def export_adapters(self, ctx: MethodContext) -> list[str]:
        """The LoRA adapters whose sum (as PEFT sums active adapters) is the model this method evaluates
        after task `ctx.task_index`, called after `restore`; [] for full fine-tuning (the model itself).

        `retain export` writes them as one plain adapter. The default reads the adapters `eval_model`
        leaves active, and refuses a method that answers tasks with different adapters. A method whose
        evaluated model is not such a sum sets `export_refusal` instead of overriding this.
        """
        chosen: list[str] | None = None
        for task in ctx.tasks:
            model = unwrap(self.eval_model(ctx, task))
            names = [n for n in adapter_names(model) if n in model.active_adapters]
            if chosen is not None and names != chosen:
                raise RetainError(
                    f"{self.name} answers task '{task.name}' with adapters {names} and earlier tasks with "
                    f"{chosen}: a single exported model cannot reproduce its scores; use retain eval"
                )
            chosen = names
        return chosen or []

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume after a task (saved in tasks/<k>-<name>/method_state.pt)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict returned."""

    def restore(self, ctx: MethodContext) -> None:
        """After a checkpoint's weights and this method's state are loaded: re-apply model-side state
        (which adapters are active or trainable, routing) for the task the checkpoint ended."""
