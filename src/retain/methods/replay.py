"""Experience replay: a per-task sample memory, mixed into the training data of later tasks.

Memory: after task t, a reservoir sample (Vitter's Algorithm R, seeded) of `memory_size` examples, or
`memory_ratio` x |D_t|, is kept. Training set of task t: D_t plus
n_replay = replay_ratio/(1-replay_ratio) x |D_t|
examples drawn evenly from the memories of tasks 1..t-1, so replayed samples make up `replay_ratio`
of it (Chaudhry et al., 2019, "On Tiny Episodic Memories in Continual Learning").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Any

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, example_memory
from retain.methods.common.memory import draw_evenly, reservoir_sample
from retain.methods.registry import register


@dataclass
class ReplayConfig:
    memory_size: int = field(default=64, metadata={"help": "examples kept per task (0: use memory_ratio)"})
    memory_ratio: float = field(default=0.0, metadata={"help": "fraction of each task's data kept, if > 0"})
    replay_ratio: float = field(
        default=0.2, metadata={"help": "fraction of a later task's training set drawn from memory"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the reservoir and of the draws"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_ratio < 1.0:
            raise RetainError(f"config: method.replay_ratio must be in [0, 1), got {self.replay_ratio}")
        if self.memory_size < 0 or not 0.0 <= self.memory_ratio <= 1.0:
            raise RetainError("config: method.memory_size must be >= 0 and method.memory_ratio in [0, 1]")
        if self.memory_size == 0 and self.memory_ratio == 0.0:
            raise RetainError("config: replay needs method.memory_size > 0 or method.memory_ratio > 0")


@register("replay", config=ReplayConfig)
class Replay(ContinualMethod):
    """Experience replay: per-task reservoir memory mixed into later tasks' training data."""

    config: ReplayConfig

    def __init__(self, config: ReplayConfig | None = None) -> None:
        super().__init__(config or ReplayConfig())
        self.memory: dict[str, list[Example]] = {}

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        c = self.config
        kept = [c.memory_size or max(1, round(c.memory_ratio * n)) for n in sizes.train_examples]
        return [example_memory(sizes, sum(kept[:-1]))]  # the last task's memory is never replayed

    def _rng(self, ctx: MethodContext, salt: str) -> random.Random:
        return random.Random(f"{self.config.seed}:{ctx.config.seed}:{ctx.task_index}:{salt}")

    def training_data(self, ctx: MethodContext, task, data: list[Example]) -> list[Example]:
        ratio = self.config.replay_ratio
        if not self.memory or ratio == 0.0:
            return data
        n_replay = round(ratio / (1.0 - ratio) * len(data))
        replayed = draw_evenly(list(self.memory.values()), n_replay, self._rng(ctx, "draw"))
        ctx.log("replay/examples", len(replayed))
        return data + [replace(e, meta={**e.meta, "replayed_from": t}) for t, e in replayed]

    def after_task(self, ctx: MethodContext, task, data: list[Example]) -> None:
        own = [e for e in data if "replayed_from" not in e.meta]
        size = self.config.memory_size or max(1, round(self.config.memory_ratio * len(own)))
        sample = reservoir_sample(own, size, self._rng(ctx, "reservoir"))
        self.memory[task.name] = [(task.name, e) for e in sample]

    def state_dict(self) -> dict[str, Any]:
        return {"memory": {t: [e.to_dict() for _, e in items] for t, items in self.memory.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory = {
            t: [(t, Example.from_dict(r)) for r in records] for t, records in state.get("memory", {}).items()
        }
