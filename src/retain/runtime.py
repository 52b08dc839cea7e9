"""The machine and the processes a run executes on: bf16 support, the process group, the batch layout.

Nothing here knows about tasks or methods; every layer above may ask it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from accelerate import PartialState

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
