"""HFT: Half Fine-Tuning (Hui et al., "HFT: Half Fine-Tuning for Large Language Models", ACL 2025;
arXiv 2404.18466). No official code was released.

For each task, half of every decoder layer's parameter groups (its linear layers) are frozen and the
other half is fine-tuned as usual: theta_frozen <- theta_frozen, theta_free <- theta_free - lr * step.
The selection follows the paper's per-layer rule: in the attention block, 2 of the 4 matrices
{W_Q, W_K, W_V, W_O} are frozen; in the feed-forward block, 2 of the 3 matrices {W_up, W_gate, W_down}
in a random half of the layers and 1 of 3 in the other half, so half of each category is frozen over the
model. It is drawn again at the start of every task from a generator seeded by (run seed, task index), so
each task updates another half, the same on every rank and after a resume.

Generalised for other shapes: in each layer, a block of n groups freezes n (1 - p) of them (p is
`trainable_fraction`, 0.5 in the paper); when that is not a whole number, the layers that freeze one
more are drawn so that the total over the layers is n L (1 - p), rounded at random when it is not whole.

What the rule does not cover, chosen here: the embeddings, the LM head, the norms and anything else
outside the decoder layers' linear layers are frozen (`train_other_params: false`), the conservative
choice; the paper's handling of them could not be checked. The frozen parameters are excluded from the
optimizer (which the trainer builds after this selection), so they get neither gradients nor optimizer
state: steps are cheaper than full fine-tuning, as the paper reports (about 30% less time).

Under LoRA, a group is the trainable LoRA adapter (A and B) of one linear layer, and the rule freezes the
adapters of half of them: the LoRA analogue of freezing half of the matrices.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes
from retain.methods.common.parameter_groups import Group, block_linears, layer_groups, other_trainable
from retain.methods.registry import register

if TYPE_CHECKING:
    from retain.data.formats import Example
    from retain.data.streams import Task


@dataclass
class HFTConfig:
    trainable_fraction: float = field(
        default=0.5,
        metadata={"help": "fraction of each layer's attention and MLP matrices trained per task (HFT: 0.5)"},
    )
    train_other_params: bool = field(
        default=False,
        metadata={
            "help": "also train what lies outside the decoder layers' linear layers (embeddings, norms, "
            "LM head) under full fine-tuning; frozen by default"
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.trainable_fraction < 1.0:
            raise RetainError(
                f"config: hft trainable_fraction must be in (0, 1), got {self.trainable_fraction}"
            )


def choose_frozen(groups: list[Group], trainable_fraction: float, rng: random.Random) -> list[Group]:
    """The groups to freeze: per layer and block, n (1 - p) of its n groups, with the extra one of a
    fractional count given to a random share of the layers (the paper's 2-of-3 / 1-of-3 rule)."""
    blocks: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for group in groups:
        blocks[(group.layer, group.block)].append(group)
    frozen = []
    for block in sorted({b for _, b in blocks}):
        layers = sorted(layer for layer, b in blocks if b == block)
        # Layers with the same number of groups share one draw of who freezes one more.
        by_size: dict[int, list[str]] = defaultdict(list)
        for layer in layers:
            by_size[len(blocks[(layer, block)])].append(layer)
        for size, members in sorted(by_size.items()):
            share = size * (1.0 - trainable_fraction)
            base = math.floor(share + 1e-9)
            extra_total = math.floor((share - base) * len(members) + rng.random())
            extra = set(rng.sample(members, min(extra_total, len(members))))
            for layer in members:
                count = min(size, base + (layer in extra))
                frozen.extend(rng.sample(blocks[(layer, block)], count))
    return sorted(frozen, key=lambda g: g.name)


@register("hft", config=HFTConfig)
class HFT(ContinualMethod):
    """HFT: each task fine-tunes a freshly drawn half of every layer's matrices; the other half is frozen."""

    config: HFTConfig

    def __init__(self, config: HFTConfig | None = None) -> None:
        super().__init__(config or HFTConfig())
        self.frozen: list[nn.Parameter] = []  # parameters this method froze for the current task
        self.chosen: dict[int, list[str]] = {}  # task index -> the linear layers frozen for it

    def trained_params_estimate(self, sizes: RunSizes) -> int | None:
        # At most: every layer keeps n - floor(n (1 - p)) of a block's n groups trainable, and they might
        # be its largest (the draw decides which; some layers freeze one more).
        matrices = block_linears(sizes.block_matrix_names, sizes.block_matrices)
        if matrices is None:
            return None
        blocks: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for (layer, block, linear), (m, n) in matrices:
            blocks[(layer, block)][linear] += m * n
        trained = 0
        for sizes_of in blocks.values():
            kept = len(sizes_of) - math.floor(len(sizes_of) * (1.0 - self.config.trainable_fraction) + 1e-9)
            trained += sum(sorted(sizes_of.values(), reverse=True)[:kept])
        if self.config.train_other_params:
            trained += sizes.trainable_params - sum(m * n for m, n in sizes.block_matrices)
        return trained

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        # Chosen here, once every component of a combination has run its before_task: only then are the
        # trainable adapters final (O-LoRA, ConPET and ABSCL set theirs in before_task).
        self.release()
        groups = layer_groups(ctx.model)
        if not groups:
            raise RetainError(
                "hft: the model has no trainable linear layer inside a decoder layer to choose from; "
                "use finetuning_type: full (or LoRA on the decoder layers)"
            )
        frozen = choose_frozen(groups, self.config.trainable_fraction, ctx.rng("hft"))
        params = [p for g in frozen for _, p in g.params]
        if not self.config.train_other_params:
            params += [p for _, p in other_trainable(ctx.model, groups)]
        for param in params:
            param.requires_grad_(False)
        self.frozen = params
        self.chosen[ctx.task_index] = [g.name for g in frozen]
        total = sum(g.numel() for g in groups)
        ctx.log("hft/frozen_share", sum(g.numel() for g in frozen) / total)
        return data

    def release(self) -> None:
        """Make trainable again what this method froze."""
        for param in self.frozen:
            param.requires_grad_(True)
        self.frozen = []

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        self.release()

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.chosen = dict(state.get("chosen", {}))
