"""OSFT: orthogonal-subspace fine-tuning (Nayak et al., 2025, "Sculpting Subspaces: Constrained Full
Fine-Tuning in LLMs for Continual Learning"; code: Red-Hat-AI-Innovation-Team/orthogonal-subspace-learning,
mini_trainer's osft_utils.py, and PEFT's OSF tuner, peft.tuners.osf).

At the start of task t every target matrix is decomposed afresh, W = U S V^T, and its top k_t singular
directions are frozen: W_h = U_h S_h V_h^T with U_h = U[:, :k_t], V_h = V^T[:k_t, :]. While the task
trains, each update of W stays in the orthogonal complement of both frozen subspaces:
grad W <- (I - U_h U_h^T) grad W (I - V_h^T V_h) before the optimizer step, and after it
W <- W_h + (I - U_h U_h^T) W (I - V_h^T V_h), which removes what AdamW's per-element scaling and weight
decay move back into the frozen subspace (mini_trainer's project_parameter_to_orthogonal_space does the
same). The next task decomposes the weights it receives, so the frozen subspace includes what this task
learned.

Rank schedule: k_t = floor(r_t * min(m, n)) with r_t = min(max_ratio, frozen_ratio + (t - 1) * ratio_step),
the frozen ("effective") rank of PEFT's OSFConfig given as a fraction. The defaults 0.3, 0.5, 0.7, ...
(capped at 0.9) are PEFT's continual-learning example (examples/orthogonal_subspace_learning); the
paper's T5 script grows a uniform fraction by a fixed step per task the same way (0.07 of max(m, n)
more per task over 15 tasks).
The paper's adaptive per-layer ratio (from input/output cosine similarity) is commented out in its code
and not implemented here.

Targets: every linear layer inside a decoder layer (attention and MLP projections, as in the paper and
mini_trainer); the LM head, embeddings, norms and biases are not decomposed and, as in PEFT's OSF (which
trains only the decomposed factors), stay frozen unless `train_other_params`.

Deviation, and why: the paper and PEFT train the factors U_l, S_l, V_l of the low part; here the step is
taken on W itself and confined to the same set of changes ({D : U_h^T D = 0, D V_h^T = 0}, which is the
tangent space of the factored form). The feasible set is the paper's; the optimizer's geometry is not
(a step on U_l is scaled by S_l, one on W is not). In exchange the forward pass, the checkpoints and the
optimizer are those of plain full fine-tuning: PEFT's osf.Linear adds a factored delta of rank
2 (min(m, n) - k) to every forward (up to twice the layer's multiply-adds in forward and backward), and
keeps U_low, S_low, V_low, their initial copies and U_high/V_high per matrix. The decomposition itself is
PEFT's (peft.tuners.osf.utils.decompose_weight_matrix, fp32 SVD).

Cost. Memory: U_h, S_h, V_h in fp32, k (m + n + 1) values per matrix (at r = 0.5, as much as the weight
itself for a square matrix), plus m x n fp32 temporaries while projecting; nothing is kept across tasks.
Time: one fp32 SVD per target matrix per task, and per optimizer step about 12 m n k floating-point
operations per matrix (4 m n k for the gradient, 8 m n k for the weight), against about 6 m n per token
for the forward and backward passes: the overhead is about 2 k / (tokens per step) of a step's linear-layer
work, so it is large with small steps (the quickstart's ~500 tokens) and small with long ones.

The fraction and every matrix's k_t are logged (osft/frozen_ratio) and kept in method_state.pt (`history`);
resuming needs nothing else, as the subspaces are recomputed from the checkpointed weights. With several
processes the gradient is projected after its all-reduce and every rank decomposes the same weights. The
projections run in fp32; bf16 weights are rounded back after each step, which leaves a leak of the order
of bf16's precision.

Under LoRA (not the paper's setting; use finetuning_type: full), the targets are the trainable LoRA
matrices: each adapter matrix keeps the top singular directions it had at the task's start, so the
adapter's rank is shared out among the tasks; the base weights do not change either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.common.parameter_groups import layer_groups, other_trainable
from retain.methods.common.subspaces import FrozenSubspace, frozen_rank
from retain.methods.registry import register

if TYPE_CHECKING:
    from retain.data.formats import Example
    from retain.data.streams import Task


@dataclass
class OSFTConfig:
    frozen_ratio: float = field(
        default=0.3,
        metadata={
            "help": "fraction of each matrix's rank min(m, n) frozen on task 1 (its top singular "
            "directions; PEFT OSF's effective_rank as a fraction)"
        },
    )
    ratio_step: float = field(
        default=0.2,
        metadata={
            "help": "added to the frozen fraction with each further task (PEFT's example: 0.3, 0.5, 0.7)"
        },
    )
    max_ratio: float = field(
        default=0.9,
        metadata={"help": "cap on the frozen fraction (below 1: some rank stays free)"},
    )
    train_other_params: bool = field(
        default=False,
        metadata={
            "help": "also train, unconstrained, what is not decomposed (embeddings, norms, LM head, "
            "biases); PEFT's OSF keeps them frozen"
        },
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_ratio < 1.0:
            raise RetainError(f"config: osft max_ratio must be in [0, 1), got {self.max_ratio}")
        if not 0.0 <= self.frozen_ratio <= self.max_ratio:
            raise RetainError(
                f"config: osft frozen_ratio must be in [0, max_ratio={self.max_ratio}], "
                f"got {self.frozen_ratio}"
            )
        if self.ratio_step < 0:
            raise RetainError(f"config: osft ratio_step must be >= 0, got {self.ratio_step}")

    def ratio(self, task_index: int) -> float:
        """The frozen fraction r_t of task `task_index` (1-based)."""
        return min(self.max_ratio, self.frozen_ratio + (task_index - 1) * self.ratio_step)


@register("osft", config=OSFTConfig)
class OSFT(ContinualMethod):
    """OSFT: each weight matrix learns only outside the top singular subspace it had at the task's start."""

    config: OSFTConfig
    refused_strategies = {
        "sharded-params": "it takes the SVD of each full weight matrix and constrains the weights in place; "
        "under FSDP / ZeRO-3 a process holds only a shard of each",
        "sharded-grads": "it projects each weight's full gradient out of the frozen subspace before the "
        "update; under FSDP / ZeRO-2/3 a process holds only a shard of each gradient",
        "deepspeed": "it reads and rewrites param.grad before the step and the weights after it; DeepSpeed "
        "keeps the reduced gradients in its own buffers and restores the weights from its fp32 master copy",
    }

    def __init__(self, config: OSFTConfig | None = None) -> None:
        super().__init__(config or OSFTConfig())
        self.targets: list[tuple[nn.Parameter, FrozenSubspace]] = []
        self.frozen: list[nn.Parameter] = []  # parameters this method froze for the current task
        # Per task: the frozen fraction and each matrix's frozen rank (a record; nothing is needed to resume).
        self.history: dict[int, dict[str, Any]] = {}

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        # FrozenSubspace keeps U (m x k), S (k) and V (k x n) of each matrix; k is largest on the last task.
        ratio = self.config.ratio(max(sizes.tasks, 1))
        bases = sum((m + n + 1) * frozen_rank((m, n), ratio) for m, n in sizes.block_matrices)
        return [StateItem("frozen singular subspaces (U, S, V)", bases)]

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        # Decomposed here, once every component of a combination has run its before_task: only then are
        # the trainable weights (the new adapter of O-LoRA, ...) final.
        self.release()
        ratio = self.config.ratio(ctx.task_index)
        groups = layer_groups(ctx.model)
        matrices = [(n, p) for g in groups for n, p in g.params if p.dim() == 2]
        if not matrices:
            raise RetainError(
                "osft: the model has no trainable linear layer inside a decoder layer to constrain; "
                "use finetuning_type: full (or LoRA on the decoder layers)"
            )
        ranks = {}
        for name, param in matrices:
            k = frozen_rank(param.shape, ratio)
            ranks[name] = k
            if k > 0:
                self.targets.append((param, FrozenSubspace(param, k)))
        if not self.config.train_other_params:
            matrix_ids = {id(p) for _, p in matrices}
            rest = [p for g in groups for _, p in g.params if id(p) not in matrix_ids]
            self.frozen = [p for _, p in other_trainable(ctx.model, groups)] + rest
            for param in self.frozen:
                param.requires_grad_(False)
        self.history[ctx.task_index] = {"ratio": ratio, "frozen_rank": ranks}
        ctx.log("osft/frozen_ratio", ratio)
        return data

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        with torch.no_grad():
            for param, subspace in self.targets:
                if param.grad is not None:
                    subspace.to(param.device)
                    param.grad.copy_(subspace.project_out(param.grad))

    def after_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        with torch.no_grad():
            for param, subspace in self.targets:
                subspace.to(param.device)
                subspace.constrain_(param.data)

    def release(self) -> None:
        """Drop the subspaces and make trainable again what this method froze."""
        for param in self.frozen:
            param.requires_grad_(True)
        self.targets, self.frozen = [], []

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        self.release()

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = dict(state.get("history", {}))
