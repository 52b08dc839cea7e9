"""Shared machinery of the gradient-projection methods GEM and A-GEM (registers no method).

- `EpisodicMemory`: a per-task sample of training examples, filled after each task (Algorithm R, so a
  uniform sample of the task's data), saved and restored through the method state.
- `flat_grad` / `write_flat_grad`: the trainable parameters' gradients as one vector and back.
- `memory_gradient`: the gradient of the training loss on a memory batch, computed with
  torch.autograd.grad (so the current step's .grad is untouched and DDP's hooks stay quiet), each rank
  on its share of the batch, then all-reduced (weighted by response tokens) across ranks.
- `EpisodicProjection`: the common method skeleton; once per optimizer step, on the accumulated
  (already all-reduced) gradient g, a subclass's `project` may replace g before clipping and the update.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from retain.data.batching import IGNORE_INDEX
from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext
from retain.methods.common.memory import reservoir_sample
from retain.models.adapters import trainable_parameters, unwrap


@dataclass
class EpisodicConfig:
    memory_size: int = field(
        default=256, metadata={"help": "examples kept per task (a uniform sample of its training data)"}
    )
    memory_batch_size: int = field(
        default=8, metadata={"help": "memory examples in the forward/backward of each memory gradient"}
    )

    def __post_init__(self) -> None:
        if self.memory_size <= 0 or self.memory_batch_size <= 0:
            raise RetainError(
                f"config: method.memory_size and method.memory_batch_size must be > 0, "
                f"got {self.memory_size} and {self.memory_batch_size}"
            )


class EpisodicMemory:
    """Task name -> examples kept from that task, in the order the tasks were learned."""

    def __init__(self) -> None:
        self.tasks: dict[str, list[Example]] = {}
        self._features: dict[str, list[dict[str, list[int]]]] = {}  # encodings, derived, never saved

    def __bool__(self) -> bool:
        return any(self.tasks.values())

    def add(self, task: str, data: list[Example], size: int, rng: random.Random) -> None:
        """Keep a uniform sample of `size` of the task's own examples (examples replayed by another
        method, marked `replayed_from`, belong to earlier tasks and are left out)."""
        own = [e for e in data if "replayed_from" not in e.meta]
        self.tasks[task] = reservoir_sample(own, size, rng)
        self._features.pop(task, None)

    def features(self, ctx: MethodContext, task: str) -> list[dict[str, list[int]]]:
        """The task's memory encoded as for training (encoded once, then cached)."""
        if task not in self._features:
            self._features[task] = ctx.encode(self.tasks[task])
        return self._features[task]

    def sample_task(self, ctx: MethodContext, task: str, n: int, rng: random.Random) -> list[dict]:
        """n encoded examples of one task's memory, without replacement (all of it if smaller)."""
        features = self.features(ctx, task)
        return [features[i] for i in sorted(rng.sample(range(len(features)), min(n, len(features))))]

    def sample_all(self, ctx: MethodContext, n: int, rng: random.Random) -> list[dict]:
        """n encoded examples drawn uniformly from the union of every task's memory."""
        pool = [(t, i) for t in self.tasks for i in range(len(self.features(ctx, t)))]
        return [self.features(ctx, t)[i] for t, i in sorted(rng.sample(pool, min(n, len(pool))))]

    def state_dict(self) -> dict[str, Any]:
        return {t: [e.to_dict() for e in examples] for t, examples in self.tasks.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = {t: [Example.from_dict(r) for r in records] for t, records in state.items()}
        self._features = {}


CHUNK = 1 << 22  # vector entries converted to float64 at a time: exact-ish products, bounded memory


def dots64(G: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """G @ x (G: k x p, x: p) accumulated in float64, a chunk of columns at a time."""
    out = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    for Gc, xc in zip(G.split(CHUNK, dim=1), x.split(CHUNK), strict=True):
        out += Gc.double() @ xc.double()
    return out


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    """The parameters' .grad as one float32 vector (zeros for a parameter without a gradient)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
    )


def write_flat_grad(params: list[nn.Parameter], flat: torch.Tensor) -> None:
    """Write a vector made by `flat_grad` back into the parameters' .grad, in place."""
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.to(p.dtype).clone()
        else:
            p.grad.copy_(chunk)


def memory_gradient(
    ctx: MethodContext, model: nn.Module, params: list[nn.Parameter], features: list[dict]
) -> torch.Tensor:
    """Flattened gradient of the token-mean training loss on `features`, reduced over ranks.

    Each rank takes its share of the batch; the per-rank gradients are weighted by their numbers of
    response tokens, so the result is the one-process gradient whatever the number of processes.
    """
    share = features[ctx.rank :: ctx.world_size]
    device = params[0].device
    local = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
    tokens = torch.zeros((), dtype=torch.float32, device=device)
    if share:
        batch = {k: v.to(device) for k, v in ctx.collate(share).items()}
        with torch.enable_grad():
            # The unwrapped model: a forward through DDP would expect a backward that never comes.
            outputs = ctx.forward(unwrap(model), batch)
            grads = torch.autograd.grad(outputs.loss, params, allow_unused=True)
        pairs = zip(grads, params, strict=True)
        local = torch.cat(
            [(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in pairs]
        )
        tokens = (outputs.labels != IGNORE_INDEX).sum().float()
    if ctx.world_size > 1 and dist.is_initialized():
        local = local * tokens
        dist.all_reduce(local)
        dist.all_reduce(tokens)
        local = local / tokens.clamp(min=1.0)
    return local


class EpisodicProjection(ContinualMethod):
    """Per-task episodic memory + a projection of the accumulated gradient once per optimizer step.

    Subclasses implement `project(ctx, model, params, g) -> g̃ or None` (None: leave the gradient as
    it is, bitwise) and log under their own name.
    """

    config: EpisodicConfig

    def __init__(self, config: EpisodicConfig) -> None:
        super().__init__(config)
        self.memory = EpisodicMemory()
        self.steps = 0  # optimizer steps of the current task
        self.projected = 0  # of which projected

    def before_task(self, ctx: MethodContext, task) -> None:
        self.steps = self.projected = 0

    def project(
        self, ctx: MethodContext, model: nn.Module, params: list[nn.Parameter], g: torch.Tensor
    ) -> torch.Tensor | None:
        raise NotImplementedError

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        self.steps += 1
        if not self.memory:
            return
        params = list(trainable_parameters(model).values())
        new = self.project(ctx, model, params, flat_grad(params))
        ctx.log(f"{self.name}/projected", float(new is not None))
        if new is not None:
            self.projected += 1
            write_flat_grad(params, new)

    def step_rng(self, ctx: MethodContext) -> random.Random:
        """The generator of this step's memory draws: the same on every rank and on resume."""
        return ctx.rng(f"{self.name}:step:{self.steps}")

    def after_task(self, ctx: MethodContext, task, data: list[Example]) -> None:
        if self.steps and ctx.task_index > 1:
            ctx.log(f"{self.name}/projected_fraction", self.projected / self.steps)
        self.memory.add(task.name, data, self.config.memory_size, ctx.rng(f"{self.name}:memory"))
        ctx.log(f"{self.name}/memory_examples", sum(len(m) for m in self.memory.tasks.values()))

    def state_dict(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory.load_state_dict(state.get("memory", {}))
