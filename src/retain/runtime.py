"""The machine and the processes a run executes on: bf16 support and the process group.

Nothing here knows about tasks or methods; every layer above may ask it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from accelerate import PartialState

if TYPE_CHECKING:
    from retain.config import RunConfig


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
