"""The plan of a run: the config resolved into a method, a stream of loaded tasks and what is trained.

Everything that can fail on user input (config, data, scorers, method settings, cutoff) fails here,
before the run directory is touched; `retain run --dry-run` prints the plan and stops.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from transformers.training_args import OptimizerNames

from retain.config import RunConfig
from retain.data.encode import encode_dataset
from retain.data.formats import Example
from retain.data.streams import Stream, Task, load_stream
from retain.engine.memory_estimate import MemoryEstimate, count_parameters, estimate_memory
from retain.engine.trackers import check_trackers
from retain.errors import RetainError, did_you_mean
from retain.evaluation.scoring import get_scorer
from retain.methods.base import ContinualMethod
from retain.methods.registry import create_method, resolved_settings
from retain.models.adapters import check_adapter, select_layers
from retain.models.loading import check_model, is_image_text, model_layer_count
from retain.runtime import BatchLayout, Strategy, batch_layout, resolve_strategy


@dataclass
class Plan:
    """What a run will do, resolved and checked: printed by --dry-run, executed by run_experiment."""

    config: RunConfig
    tasks: list[Task]
    method: ContinualMethod
    train_units: list[Task] = field(default_factory=list)  # what is trained: the tasks, or one joint task
    stream: Stream | None = None  # warnings and benchmark description for the report
    batch: BatchLayout | None = None  # how a step's examples split over processes and accumulation
    strategy: Strategy | None = None  # single, DDP, FSDP or DeepSpeed ZeRO, on how many processes

    @property
    def joint(self) -> bool:
        return self.method.joint_training

    @property
    def eval_only(self) -> list[Task]:
        """The tasks scored in every row but never trained (stream.eval_only)."""
        return self.stream.eval_only if self.stream else []

    def fingerprints(self) -> dict[str, Any]:
        """What the results depend on besides config.yaml, as content hashes: the resolved method settings
        and each task's examples as used (after subsampling and the default system prompt), train and test,
        and the eval-only tasks' test examples ("general", only when there are any).
        state.json records them, and a resume whose data or settings hash differently is refused."""
        prints: dict[str, Any] = {
            "method": _digest([self.method.name, self.config.method.params]),
            "data": {
                task.name: {"train": examples_digest(task.train), "test": examples_digest(task.test)}
                for task in self.tasks
            },
        }
        if self.eval_only:
            prints["general"] = {task.name: {"test": examples_digest(task.test)} for task in self.eval_only}
        return prints

    def memory(self) -> MemoryEstimate | None:
        """Memory per process under the plan's strategy, counted on the meta device (no weights load);
        None when the model must be built first (a built-in model not converted yet)."""
        counts = count_parameters(self.config)
        if counts is None or self.strategy is None:
            return None
        sizes = [len(unit.train) for unit in self.train_units]
        return estimate_memory(self.config, self.strategy, self.method, counts, sizes)

    def data_source(self, task: str, split: str) -> str:
        """Where a task's `split` examples come from, for messages: the data file or dataset name."""
        for cfg in [*self.config.stream.tasks, *self.config.stream.eval_only]:
            if cfg.name == task:
                spec = cfg.test if split == "test" and cfg.test else cfg.train
                if spec:
                    return f"data file {spec}" if spec.endswith((".json", ".jsonl")) else f"dataset {spec}"
        if self.stream and self.stream.benchmark:
            return f"benchmark {self.stream.benchmark['name']} in {self.stream.benchmark['dir']}"
        return "its data source"


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def examples_digest(examples: list[Example]) -> str:
    """A content hash of examples in order: what the model is trained or tested on (messages, system)."""
    # Images enter as written in the data (relative paths), so moving the data folder keeps the hash.
    return _digest(
        [[e.messages, e.system, *([e.meta.get("images", e.images)] if e.images else [])] for e in examples]
    )


def check_optimizer(name: str) -> None:
    """`train.optim` is one of transformers' optimizer names (checked before the run directory is written;
    TrainingArguments would refuse it only when the first task starts)."""
    names = [o.value for o in OptimizerNames]
    if name not in names:
        raise RetainError(
            f"config: train.optim '{name}' is not a transformers optimizer{did_you_mean(name, names)}; "
            "use adamw_torch (the default), sgd, adafactor, ..."
        )


def make_plan(config: RunConfig) -> Plan:
    """Load and check everything the run needs except the model weights."""
    method = create_method(config.method.name, config.method.params)
    # What ran is what config.yaml and results.json record: every setting, defaults included.
    config.method.params = resolved_settings(method)
    if config.model.finetuning_type == "full" and not method.supports_full_finetuning:
        raise RetainError(
            f"method '{method.name}' does not support full fine-tuning; use finetuning_type: lora"
        )
    check_trackers(config)  # a tracker whose package is missing fails now, not after the first task
    check_optimizer(config.train.optim)
    strategy = resolve_strategy(config)
    check_strategy(method, strategy)
    batch = batch_layout(config.train, strategy.processes)
    # The model resolves (a Hub id is in the local cache), its settings are usable, the adapter it starts
    # from exists: checked here so --dry-run refuses what the run would.
    check_model(config.model)
    check_adapter(config.model)
    if config.model.finetuning_type == "lora" and config.model.lora_layers.strip() not in ("", "all"):
        select_layers(config.model.lora_layers, model_layer_count(config.model.name_or_path))
    stream = load_stream(config)
    tasks = stream.tasks
    check_images(config, tasks, method)
    for task in tasks + stream.eval_only:
        get_scorer(task.scorer)  # an unknown scorer name fails here, before anything trains
    units = tasks
    if method.joint_training:
        joint = [example for task in tasks for example in task.train]
        units = [Task(name="multitask", train=joint, test=[], scorer="exact")]
    return Plan(
        config=config,
        tasks=tasks,
        method=method,
        train_units=units,
        stream=stream,
        batch=batch,
        strategy=strategy,
    )


def check_strategy(method: ContinualMethod, strategy: Strategy) -> None:
    """The method declares it runs correctly under the strategy (ContinualMethod.refused_strategies);
    docs/compatibility.md lists every method's strategies."""
    reason = method.strategy_refusal(strategy)
    if reason:
        raise RetainError(
            f"config: {reason}. Choose another strategy (train.deepspeed / train.fsdp, or the accelerate "
            "config) or another method; docs/compatibility.md lists what each method supports"
        )


def check_images(config: RunConfig, tasks: list[Task], method: ContinualMethod) -> None:
    """Data with images needs an image-text model (its processor turns the images into model inputs);
    on a text-only model it is refused rather than trained on the text alone."""
    with_images = [t for t in tasks if any(e.images for e in t.train + t.test)]
    if not with_images:
        return
    task, model = with_images[0], config.model.name_or_path
    if not method.supports_images:
        raise RetainError(
            f"task '{task.name}' has images, and method '{method.name}' writes text-only pseudo samples; "
            "use a method that rehearses real examples (replay, ...) for image data"
        )
    if is_image_text(model):
        return
    raise RetainError(
        f"task '{task.name}' has images, but model {model} is a text-only model; use an image-text model "
        "(a local LLaVA, Qwen2-VL, SmolVLM, ... folder) or data without an images column"
    )


def check_encoding(plan: Plan, tokenizer, processor=None) -> None:
    """Encode every training set once (with the image-text model's processor for examples with images) so
    cutoff problems surface before anything is written."""
    for task in plan.tasks:
        encode_dataset(
            tokenizer,
            task.train,
            plan.config.train.cutoff_len,
            source=f"task '{task.name}' (train)",
            processor=processor,
        )
