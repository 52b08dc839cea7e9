"""Sample memories: the reservoir that keeps a uniform sample of a task, and an even draw over memories."""

from __future__ import annotations

import random
from typing import Any


def reservoir_sample(stream: list[Any], k: int, rng: random.Random) -> list[Any]:
    """Algorithm R: a uniform sample of k items from a stream seen once."""
    reservoir: list[Any] = []
    for i, item in enumerate(stream):
        if i < k:
            reservoir.append(item)
        else:
            j = rng.randint(0, i)
            if j < k:
                reservoir[j] = item
    return reservoir


def draw_evenly(memories: list[list[Any]], n: int, rng: random.Random) -> list[Any]:
    """n items spread evenly over the memories; a memory smaller than its share is cycled."""
    if n <= 0 or not memories:
        return []
    drawn: list[Any] = []
    for i, memory in enumerate(memories):
        share = n // len(memories) + (1 if i < n % len(memories) else 0)
        order = rng.sample(memory, len(memory))
        drawn.extend(order[j % len(order)] for j in range(share))
    return drawn
