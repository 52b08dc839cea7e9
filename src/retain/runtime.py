"""The machine and the processes a run executes on: bf16 support, the process group, the batch layout,
the distributed strategy (DDP, FSDP, DeepSpeed ZeRO) the launcher or the config chose.

Nothing here knows about tasks or methods; every layer above may ask it.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import PartialState

from retain.config import fsdp_words
from retain.errors import RetainError

if TYPE_CHECKING:
    from retain.config import RunConfig, TrainConfig


def bf16_supported() -> bool:
    """bf16 autocast pays off on GPUs with bf16 and on CPUs with AVX512-BF16 or AMX."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive on entry (the millions that importing torch and transformers creates) out of
    Python's cyclic garbage collector until exit. The Trainer forces a full collection at the end of every
    task (accelerate's free_memory), and each walked them all: about 0.5 s a task on a CPU, a fifth of a
    small run. Objects created inside are collected as usual; on exit the frozen ones are handed back, so a
    long-lived process (a notebook) loses nothing. Nested or under a caller's own gc.freeze(): a no-op."""
    if gc.get_freeze_count():
        yield
        return
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def process_state() -> PartialState:
    """The process group (from torchrun / accelerate launch env vars); gloo on CPU-only machines."""
    return PartialState(cpu=not torch.cuda.is_available())


def use_bf16(config: RunConfig) -> bool:
    """Whether training and evaluation run under bf16 autocast: `train.bf16` auto, true or false."""
    setting = config.train.bf16
    return bf16_supported() if setting == "auto" else setting == "true"


def launched_processes() -> int:
    """The number of processes the launcher (torchrun, accelerate) started, without joining the group."""
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's examples are split: global = per_device x processes x accumulation."""

    per_device: int
    processes: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.processes * self.accumulation

    def describe(self) -> str:
        return (
            f"{self.global_batch} examples per step = {self.per_device} per device x {self.processes} "
            f"process(es) x {self.accumulation} accumulation step(s)"
        )

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "global": self.global_batch}


def batch_layout(train: TrainConfig, processes: int) -> BatchLayout:
    """The batch layout for `processes` processes.

    Without `global_batch_size` each process takes `per_device_train_batch_size`, so more processes mean
    a larger step. With it the step stays `global_batch_size` examples whatever the process count: each
    process's share is split into the largest micro-batch up to `per_device_train_batch_size` that
    divides it, and gradient accumulation makes up the rest.
    """
    if train.global_batch_size is None:
        return BatchLayout(train.per_device_train_batch_size, processes, train.gradient_accumulation_steps)
    if train.global_batch_size % processes:
        raise RetainError(
            f"config: train.global_batch_size {train.global_batch_size} cannot be split over {processes} "
            f"processes; choose a multiple of {processes}"
        )
    share = train.global_batch_size // processes
    micro = max(d for d in range(1, min(share, train.per_device_train_batch_size) + 1) if share % d == 0)
    return BatchLayout(micro, processes, share // micro)


# The strategies a run can train under, in the order tables list them.
STRATEGIES = ("single", "ddp", "fsdp", "zero0", "zero1", "zero2", "zero3")
# Families a method can refuse at once (methods/base.py, ContinualMethod.refused_strategies): every strategy
# that has the property. A key of refused_strategies is a strategy name or one of these.
STRATEGY_FAMILIES = (
    "multiprocess",  # more than one process (any strategy launched on several)
    "sharded-params",  # a process holds a shard of each parameter: fsdp, zero3
    "sharded-grads",  # a process holds a shard of each gradient after the backward: fsdp, zero2, zero3
    "sharded-optimizer",  # a process holds a shard of the optimizer state: fsdp, zero1, zero2, zero3
    "deepspeed",  # the DeepSpeed engine wraps model and optimizer: zero0..zero3
    "offload",  # optimizer state (and for fsdp / zero3 the parameters) live in CPU RAM
)
_LABELS = {"single": "single process", "ddp": "DDP", "fsdp": "FSDP"}


@dataclass(frozen=True)
class Strategy:
    """How training is spread over processes: `name` one of STRATEGIES, on `processes` processes, with
    `offload` (DeepSpeed offload_optimizer / offload_param, FSDP CPU offload) or not.

    FSDP counts as sharding parameters, gradients and optimizer state whatever its sharding strategy
    (shard_grad_op and no_shard shard less): refusals and memory estimates take the strictest reading.
    """

    name: str
    processes: int = 1
    offload: bool = False

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.name!r}; one of {', '.join(STRATEGIES)}")
        if self.processes < 1:
            raise ValueError(f"a strategy runs on at least one process, got {self.processes}")
        if self.offload and self.name in ("single", "ddp"):
            raise ValueError(f"offload needs FSDP or DeepSpeed, not {self.name}")

    @property
    def zero_stage(self) -> int | None:
        """DeepSpeed's ZeRO stage (0-3), or None when DeepSpeed is not in use."""
        return int(self.name[-1]) if self.name.startswith("zero") else None

    @property
    def shards_parameters(self) -> bool:
        return self.name in ("fsdp", "zero3")

    @property
    def shards_gradients(self) -> bool:
        return self.name in ("fsdp", "zero2", "zero3")

    @property
    def shards_optimizer(self) -> bool:
        return self.name in ("fsdp", "zero1", "zero2", "zero3")

    @property
    def families(self) -> frozenset[str]:
        """The STRATEGY_FAMILIES this strategy belongs to (on its process count)."""
        member = {
            "multiprocess": self.processes > 1,
            "sharded-params": self.shards_parameters,
            "sharded-grads": self.shards_gradients,
            "sharded-optimizer": self.shards_optimizer,
            "deepspeed": self.zero_stage is not None,
            "offload": self.offload,
        }
        return frozenset(name for name, on in member.items() if on)

    @property
    def keys(self) -> frozenset[str]:
        """Every key a method's refused_strategies may use to refuse this strategy."""
        return self.families | {self.name}

    @property
    def label(self) -> str:
        """For people: "DDP", "FSDP + offload", "ZeRO-2 + offload"."""
        base = f"ZeRO-{self.zero_stage}" if self.zero_stage is not None else _LABELS[self.name]
        return base + (" + offload" if self.offload else "")

    def describe(self) -> str:
        return f"{self.label} on {self.processes} process(es)"


def _deepspeed_json(path: str, where: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as exc:
        raise RetainError(
            f"config: {where} {path} cannot be read ({exc.strerror}); give a DeepSpeed JSON file"
        ) from None
    except ValueError as exc:
        raise RetainError(f"config: {where} {path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RetainError(f"config: {where} {path} must hold a JSON object (a DeepSpeed config)")
    return data


def _offloaded(section: Any) -> bool:
    return isinstance(section, dict) and str(section.get("device", "none")).lower() not in ("none", "")


def _zero_from_json(data: dict[str, Any], path: str, where: str) -> tuple[int, bool]:
    """(stage, offload) of a DeepSpeed config's zero_optimization section (stage 0 when absent)."""
    zero = data.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage not in (0, 1, 2, 3):
        raise RetainError(
            f"config: {where} {path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r} "
            '(retain reads the stage before the run to check the method and estimate memory; "auto" '
            "is not resolved)"
        )
    offload = _offloaded(zero.get("offload_optimizer")) or _offloaded(zero.get("offload_param"))
    return stage, offload


def _is_true(value: str | None) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes")


def _accelerate_zero(env: Mapping[str, str]) -> tuple[int, bool]:
    """(stage, offload) from accelerate launch's DeepSpeed environment (its config file wins)."""
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        return _zero_from_json(_deepspeed_json(path, "deepspeed_config_file"), path, "deepspeed_config_file")
    stage_text = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0")
    if stage_text not in ("0", "1", "2", "3"):
        raise RetainError(
            f"accelerate launch: zero_stage must be 0, 1, 2 or 3, got {stage_text!r}; "
            "fix the accelerate config"
        )
    offload = any(
        env.get(key, "none").lower() not in ("none", "")
        for key in (
            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE",
            "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE",
        )
    )
    return int(stage_text), offload


def resolve_strategy(config: RunConfig, env: Mapping[str, str] = os.environ) -> Strategy:
    """The strategy a run trains under.

    `train.deepspeed` (a DeepSpeed JSON: zero_optimization.stage and offload_optimizer / offload_param are
    read from it) or accelerate launch's DeepSpeed environment (ACCELERATE_USE_DEEPSPEED with
    ACCELERATE_DEEPSPEED_CONFIG_FILE or ACCELERATE_DEEPSPEED_ZERO_STAGE and the offload devices);
    `train.fsdp` (TrainingArguments' string; "offload" among its words) or ACCELERATE_USE_FSDP=true
    (FSDP_OFFLOAD_PARAMS); otherwise DDP when the launcher started more than one process (WORLD_SIZE),
    else a single process. The config and the launcher may not ask for two different strategies.
    """
    processes = max(1, int(env.get("WORLD_SIZE", "1")))
    train = config.train
    asked: list[tuple[str, Strategy]] = []
    if train.deepspeed:
        stage, offload = _zero_from_json(
            _deepspeed_json(train.deepspeed, "train.deepspeed"), train.deepspeed, "train.deepspeed"
        )
        asked.append(("train.deepspeed", Strategy(f"zero{stage}", processes, offload)))
    if _is_true(env.get("ACCELERATE_USE_DEEPSPEED")):
        stage, offload = _accelerate_zero(env)
        asked.append(("accelerate launch (DeepSpeed)", Strategy(f"zero{stage}", processes, offload)))
    if train.fsdp.strip():
        asked.append(("train.fsdp", Strategy("fsdp", processes, "offload" in fsdp_words(train.fsdp))))
    if _is_true(env.get("ACCELERATE_USE_FSDP")):
        asked.append(
            (
                "accelerate launch (FSDP)",
                Strategy("fsdp", processes, _is_true(env.get("FSDP_OFFLOAD_PARAMS"))),
            )
        )
    chosen = {strategy for _, strategy in asked}
    if len(chosen) > 1:
        listed = "; ".join(f"{source}: {strategy.label}" for source, strategy in asked)
        raise RetainError(
            f"config: two strategies asked for ({listed}); keep one (train.deepspeed / train.fsdp, or the "
            "accelerate config)"
        )
    if chosen:
        return chosen.pop()
    return Strategy("ddp" if processes > 1 else "single", processes)
