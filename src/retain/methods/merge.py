"""Model merging as a continual-learning method: one LoRA adapter per task, merged after every task.

Task t trains its own adapter, either from the pre-trained model (`start: base`, the usual setting of
task arithmetic, Ilharco et al., ICLR 2023) or from a copy of the previous task's adapter
(`start: sequential`, merging sequential fine-tuning checkpoints); the earlier adapters are frozen and
inactive while it trains. Each adapter's task vector is tau_t = s B_t A_t per layer (theta_t - theta_0),
and after task t the model evaluated on every task is theta_0 + merge(tau_1, ..., tau_t):
- task_arithmetic: lam * sum_t tau_t (exact through PEFT's `add_weighted_adapter(..., "cat")`);
- ties (Yadav et al., NeurIPS 2023, "TIES-Merging"): trim each tau_t to its top-`density` magnitudes over
  the whole vector, elect each entry's sign as the sign of the sum, average the agreeing entries, times lam;
- dare_linear / dare_ties (Yu et al., ICML 2024, "Language Models are Super Mario"): drop each entry with
  probability `drop_rate`, rescale by 1 / (1 - drop_rate), then sum or TIES-merge, times lam.
methods/common/task_vectors.py has the rules and says why TIES and DARE are computed on the dense
Delta W (not with PEFT's factor-wise merges); the merged adapter is exact (rank min(out, in)).

lam defaults to 1/t for task_arithmetic and dare_linear (the mean of the task vectors; the papers tune it
on validation data, which a stream does not have) and to 1 for ties and dare_ties (the TIES default).
The merged adapter is built for evaluation only; training never starts from it, and the checkpoints
hold the per-task adapters, so `retain merge RUN_DIR` can merge them again with other settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem, earlier_adapters
from retain.methods.common.task_vectors import MERGE_HOWS, MergeHow, merge_adapters
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, add_adapter, peft_model

if TYPE_CHECKING:
    from retain.data.streams import Task

MERGED = "merged"


def default_lam(how: str, count: int) -> float:
    """1/T for the summing merges (their mean), 1 for the TIES-style ones (already a mean per entry)."""
    return 1.0 / count if how in ("task_arithmetic", "dare_linear") else 1.0


@dataclass
class MergeConfig:
    how: MergeHow = field(
        default="ties",
        metadata={"help": "merge rule: task_arithmetic, ties, dare_linear or dare_ties"},
    )
    start: Literal["base", "sequential"] = field(
        default="base",
        metadata={"help": "each task's adapter starts from the base model, or from the previous task's"},
    )
    lam: float | None = field(
        default=None,
        metadata={"help": "scale of the merged task vector; null: 1/T (task_arithmetic, dare_linear) or 1"},
    )
    density: float = field(default=0.2, metadata={"help": "TIES: fraction of each task vector kept (k)"})
    drop_rate: float = field(default=0.5, metadata={"help": "DARE: probability of dropping an entry"})

    def __post_init__(self) -> None:
        if self.how not in MERGE_HOWS:
            raise RetainError(
                f"config: merge how '{self.how}' is unknown; use one of {', '.join(MERGE_HOWS)}"
            )
        if not 0.0 < self.density <= 1.0 or not 0.0 <= self.drop_rate < 1.0:
            raise RetainError(
                f"config: merge needs density in (0, 1] and drop_rate in [0, 1), got {self.density} "
                f"and {self.drop_rate}"
            )
        if self.lam is not None and self.lam <= 0:
            raise RetainError(f"config: merge lam must be > 0 (or null for the default), got {self.lam}")


def task_adapter(index: int) -> str:
    """The adapter task `index` (1-based) trains: 'default' (made with the model) for task 1."""
    return "default" if index <= 1 else f"task{index}"


@register("merge", config=MergeConfig)
class Merge(ContinualMethod):
    """Model merging: an adapter per task, merged (task arithmetic / TIES / DARE) after each task."""

    config: MergeConfig
    refused_strategies = {
        "sharded-params": "it builds task vectors from each task's full LoRA matrices and merges them; "
        "under FSDP / ZeRO-3 a process holds only a shard of each",
    }
    supports_full_finetuning = False
    decides_eval_model = True
    adds_adapters = freezes_adapters = switches_adapters = True

    def __init__(self, config: MergeConfig | None = None) -> None:
        super().__init__(config or MergeConfig())
        self.merged_for: int | None = None  # the task index the merged adapter was built after

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        if self.config.how == "task_arithmetic":  # PEFT's "cat": the ranks of all tasks side by side
            merged = sizes.tasks * sizes.trainable_params
        else:  # the dense Delta W of each LoRA layer as an adapter of rank min(out, in)
            factors = sizes.block_matrices  # (r, in) of lora_A, then (out, r) of lora_B, per layer
            merged = sum(
                (o + i) * min(o, i) for (_, i), (o, _) in zip(factors[::2], factors[1::2], strict=True)
            )
        return [earlier_adapters(sizes), StateItem("the merged adapter (for evaluation)", merged)]

    def _train_only(self, model: nn.Module, index: int) -> None:
        name = task_adapter(index)
        activate_adapters(model, active=[name], trainable=[name])

    def _drop_merged(self, model: nn.Module) -> None:
        inner = peft_model(model)
        if MERGED in inner.peft_config:
            inner.base_model.set_adapter(["default"])  # PEFT warns when the active adapter is deleted
            inner.delete_adapter(MERGED)
        self.merged_for = None

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        self._drop_merged(ctx.model)
        inner = peft_model(ctx.model)
        name = task_adapter(ctx.task_index)
        if name not in inner.peft_config:
            previous = task_adapter(ctx.task_index - 1) if self.config.start == "sequential" else None
            add_adapter(ctx.model, name, init_from=previous)
        self._train_only(ctx.model, ctx.task_index)

    def lam(self, count: int) -> float:
        return self.config.lam if self.config.lam is not None else default_lam(self.config.how, count)

    def build_merged(self, ctx: MethodContext) -> list[str]:
        """Add the 'merged' adapter from the adapters of tasks 1..t; returns the merged adapters' names."""
        adapters = [task_adapter(i) for i in range(1, ctx.task_index + 1)]
        merge_adapters(
            ctx.model,
            adapters,
            self.config.how,
            MERGED,
            lam=self.lam(len(adapters)),
            density=self.config.density,
            drop_rate=self.config.drop_rate,
            seed=ctx.config.seed + ctx.task_index,  # DARE's masks: the same on resume
        )
        self.merged_for = ctx.task_index
        return adapters

    def eval_model(self, ctx: MethodContext, task: Task) -> nn.Module:
        if ctx.task_index < 1:  # before training: the untrained adapter, i.e. the base model
            self._train_only(ctx.model, 1)
            return ctx.model
        if self.merged_for != ctx.task_index or MERGED not in peft_model(ctx.model).peft_config:
            self.build_merged(ctx)
        activate_adapters(ctx.model, active=[MERGED], trainable=[])
        return ctx.model

    def restore(self, ctx: MethodContext) -> None:
        self._drop_merged(ctx.model)
        self._train_only(ctx.model, max(ctx.task_index, 1))
