"""CoSO: Continuous Subspace Optimization (Cheng, Wan, Wu, Hou and Zhang, NeurIPS 2025, arXiv:2505.11816;
reference code: the authors' CoSO repository, its CoSOProjector / DoubleSVD and their Adam).

Full fine-tuning in which each target weight matrix W is optimised in a sequence of low-rank subspaces
taken from its own gradient (as GaLore does), kept orthogonal to the subspaces of the earlier tasks. Per
optimizer step of task tau, with G the (accumulated, clipped) gradient of W and M_{tau-1} the orthonormal
basis of the earlier tasks:

1. G' = G - M M^T G                      (historical orthogonal projection)
2. every K steps (`update_gap`): U, s = SVD(G'); P = U[:, :r1] (`proj_rank`), and the task's Frequent
   Directions sketch takes Q = U[:, :r2] diag(s[:r2]) (`sketch_rank`): S <- FD([S, Q])
3. R = P^T G'; N = Adam(R), with the moments kept in the r1-dimensional coordinates (not reset when P
   changes, as in GaLore and the reference); W <- W - lr P N
4. at the task's end: U_S = SVD(S); the k leading directions holding less than `threshold` of the sketch's
   squared mass (the paper's eps_th = 0.98, GPM's rule) join the basis: M_tau = [M_{tau-1}, U_S[:, :k]].

Since every update lies in the complement of M, M^T dW = 0: an earlier task's gradient G_old, which lies in
span(M) as far as the sketch caught it, has <G_old, dW> = 0, so the earlier tasks' losses do not move to
first order. The subspace grows with the stream; `coso/history_fraction` logs how much of each matrix's
side it takes (at 1 the matrix stops learning).

Which side. The reference projects on the left (rows) of the gradient. Here the side is each matrix's
longer one (rows on a tie, so the reference's square attention output projection is unchanged): a rank-r1
subspace of the shorter side would be all of it for a LoRA factor (r rows), and the longer side leaves the
history more room. On the columns side every formula above applies to G^T.

Deviations, and why:
- After step 3 the update is projected out of M once more. When G' has rank below r1, SVD fills P with
  arbitrary orthonormal columns, possibly inside span(M), and Adam's moments (carried over from earlier
  projections) are non-zero there: the reference would leak into the protected subspace; this does not.
- Weight decay (train.weight_decay, 0 by default) is decoupled and applied to (I - M M^T) W only, so that
  it cannot shrink what the earlier tasks learned; the reference decays the whole weight.
- The optimizer is this Adam whatever `train.optim` says (a warning names it); the learning-rate schedule,
  warm-up and gradient clipping are the Trainer's.

Targets: every linear layer inside a decoder layer (`target_modules: []`), or those whose module name ends
with one of `target_modules` (the paper optimises only the attention output projection: `[o_proj]`).
Everything else stays frozen unless `train_other_params`, which trains it with plain AdamW in the same
optimizer. Under LoRA the targets are the trainable adapter factors of those layers.

Cost. Memory: per matrix with sides d (projected) x e, the Adam moments are 2 r1 e instead of 2 d e, plus P
(d r1), the sketch (d r2) and the history basis (d k per finished task, kept in method_state.pt).
Time: one fp32 SVD of a d x e matrix every K steps per target, O(d e min(d, e)), plus 4 d e (r1 + |M|)
per step for the projections: large for big matrices with K = 1 (the paper's choice on ImageNet-R), so
`update_gap` and `target_modules` are the knobs. Nothing of the sketch or moments is needed to resume
(the loop resumes at task boundaries); the basis is.

With several processes the gradient is projected after its all-reduce and every process computes the same
SVD, so they take the same step. Sharded parameters, gradients or optimizer states are refused.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.common.parameter_groups import block_linears, layer_groups, other_trainable
from retain.methods.common.subspaces import FrequentDirections, extend_orthonormal_basis, top_left_directions
from retain.methods.registry import register

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from retain.data.formats import Example
    from retain.data.streams import Task

logger = logging.getLogger(__name__)


@dataclass
class CoSOConfig:
    proj_rank: int = field(
        default=32,
        metadata={"help": "r1: rank of the subspace each step optimises in (the paper: 15-70 on ViT-B)"},
    )
    sketch_rank: int = field(
        default=96,
        metadata={
            "help": "r2: columns of the Frequent Directions sketch of the task's gradients (> proj_rank; "
            "the paper: 100-160)"
        },
    )
    update_gap: int = field(
        default=1,
        metadata={"help": "K: steps between two SVDs of the gradient (new subspace and sketch update)"},
    )
    threshold: float = field(
        default=0.98,
        metadata={"help": "eps_th: share of the sketch's squared mass that the kept directions stay under"},
    )
    target_modules: list[str] = field(
        default_factory=list,
        metadata={
            "help": "decoder linear layers to optimise, by name suffix (e.g. [o_proj], the paper's choice); "
            "[] = every linear layer inside a decoder layer"
        },
    )
    train_other_params: bool = field(
        default=False,
        metadata={"help": "also train, with plain AdamW, what is not a target (it is frozen otherwise)"},
    )

    def __post_init__(self) -> None:
        for name in ("proj_rank", "sketch_rank", "update_gap"):
            if getattr(self, name) < 1:
                raise RetainError(f"config: coso {name} must be >= 1, got {getattr(self, name)}")
        if self.sketch_rank < self.proj_rank:
            raise RetainError(
                f"config: coso sketch_rank ({self.sketch_rank}) must be >= proj_rank ({self.proj_rank}): "
                "the sketch keeps at least the directions each step optimises in"
            )
        if not 0.0 < self.threshold <= 1.0:
            raise RetainError(f"config: coso threshold must be in (0, 1], got {self.threshold}")


class SubspaceTarget:
    """One weight matrix under CoSO: the side it is projected on, the earlier tasks' basis of that side,
    and this task's projector and gradient sketch."""

    def __init__(self, name: str, param: nn.Parameter, history: torch.Tensor | None, config: CoSOConfig):
        rows, cols = param.shape
        self.name, self.param = name, param
        self.transposed = cols > rows  # work on G^T: the longer side is the projected one
        self.dim = max(rows, cols)
        self.proj_rank = min(config.proj_rank, rows, cols)
        self.sketch_rank = min(config.sketch_rank, rows, cols)
        self.history = history if history is not None else torch.zeros(self.dim, 0)
        # A step adds at most min(rows, cols) directions; the sketch gathers up to sketch_rank per task.
        self.sketch = FrequentDirections(self.dim, config.sketch_rank)
        self.projector: torch.Tensor | None = None  # dim x proj_rank

    def oriented(self, matrix: torch.Tensor) -> torch.Tensor:
        """`matrix` (the weight's shape) with the projected side first, and back."""
        return matrix.T if self.transposed else matrix

    def remove_history(self, matrix: torch.Tensor) -> torch.Tensor:
        """(I - M M^T) matrix, for an oriented matrix (dim x e)."""
        if self.history.shape[1] == 0:
            return matrix
        self.history = self.history.to(matrix.device)
        return matrix - self.history @ (self.history.T @ matrix)

    def refresh(self, gradient: torch.Tensor) -> None:
        """A new projector and a sketch update from the oriented, history-free gradient (one SVD)."""
        u, s = top_left_directions(gradient, self.sketch_rank)
        self.projector = u[:, : self.proj_rank]
        self.sketch.add(u * s)

    def finish_task(self, threshold: float) -> int:
        """Append the task's directions to the basis; returns how many were added."""
        before = self.history.shape[1]
        self.history = extend_orthonormal_basis(self.history, self.sketch.directions(threshold))
        return self.history.shape[1] - before


class CoSOAdam(torch.optim.Optimizer):
    """Adam whose step on each target is taken in that target's current low-rank subspace (CoSO's steps
    1-3); other parameters get plain AdamW. Decoupled weight decay, bias-corrected as torch's AdamW."""

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        targets: dict[nn.Parameter, SubspaceTarget],
        update_gap: int,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.targets, self.update_gap = targets, update_gap

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                step = state.get("step", 0)
                target = self.targets.get(param)
                grad = param.grad.float()
                if target is not None:
                    grad = target.remove_history(target.oriented(grad))
                    if target.projector is None or step % self.update_gap == 0:
                        target.refresh(grad)
                    grad = target.projector.T @ grad
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                state["step"] = step = step + 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                step_size = group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                weight = param.float()
                if target is not None:
                    update = target.oriented(target.remove_history(target.projector @ update))
                if group["weight_decay"] > 0 and param.dim() > 1:
                    decay = weight
                    if target is not None:
                        decay = target.oriented(target.remove_history(target.oriented(weight)))
                    weight = weight - group["lr"] * group["weight_decay"] * decay
                param.copy_((weight - step_size * update).to(param.dtype))
        return loss


@register("coso", config=CoSOConfig)
class CoSO(ContinualMethod):
    """CoSO: each weight learns in low-rank subspaces of its gradient, orthogonal to the earlier tasks'."""

    config: CoSOConfig
    refused_strategies = {
        "sharded-params": "it takes the SVD of each weight's full gradient and updates the full weight; "
        "under FSDP / ZeRO-3 a process holds only a shard of each",
        "sharded-grads": "it projects each weight's full gradient; under FSDP / ZeRO-2/3 a process holds "
        "only a shard of each gradient",
        "deepspeed": "it brings its own optimizer (Adam in a moving low-rank subspace), which DeepSpeed's "
        "engine would replace or partition",
    }

    def __init__(self, config: CoSOConfig | None = None) -> None:
        super().__init__(config or CoSOConfig())
        self.history: dict[str, torch.Tensor] = {}  # target name -> orthonormal basis (dim x k), CPU
        self.targets: list[SubspaceTarget] = []
        self.frozen: list[nn.Parameter] = []
        self.others: list[tuple[str, nn.Parameter]] = []

    def _target_shapes(self, sizes: RunSizes) -> list[tuple[int, int]]:
        """The block matrices this method projects, by target_modules when the names are known."""
        matrices = block_linears(sizes.block_matrix_names, sizes.block_matrices)
        if not self.config.target_modules or matrices is None:
            return sizes.block_matrices
        # the rule training_data applies to the same linear layers
        return [shape for (_, _, linear), shape in matrices if self._selected(linear)]

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        # At most sketch_rank directions per matrix per finished task, never more than its longer side.
        earlier = max(sizes.tasks - 1, 0)
        shapes = self._target_shapes(sizes)
        bases = sum(max(m, n) * min(max(m, n), earlier * self.config.sketch_rank) for m, n in shapes)
        sketches = sum(max(m, n) * (self.config.sketch_rank + self.config.proj_rank) for m, n in shapes)
        return [
            StateItem("earlier tasks' gradient bases (at most)", bases),
            StateItem("gradient sketch and projector of the task in training", sketches),
        ]

    def trained_params_estimate(self, sizes: RunSizes) -> int | None:
        # Without train_other_params everything but the targets is frozen for the task.
        if self.config.train_other_params:
            return None
        return sum(m * n for m, n in self._target_shapes(sizes))

    def optimizer_state_estimate(self, sizes: RunSizes) -> StateItem | None:
        # Adam's two moments live in the r1 coordinates: 2 x r1 x (shorter side) per target matrix, against
        # 2 x m x n for AdamW; train_other_params adds AdamW's two per weight of the rest.
        shapes = self._target_shapes(sizes)
        moments = sum(2 * min(self.config.proj_rank, m, n) * min(m, n) for m, n in shapes)
        others = sizes.trainable_params - sum(m * n for m, n in shapes)
        if self.config.train_other_params:
            return StateItem(
                "optimizer state (coso's projected Adam; plain AdamW on the rest)", moments + 2 * others
            )
        return StateItem(
            "optimizer state (coso's projected Adam: 2 moments of r1 x shorter side per matrix)", moments
        )

    def _selected(self, module: str) -> bool:
        return not self.config.target_modules or any(module.endswith(t) for t in self.config.target_modules)

    def training_data(self, ctx: MethodContext, task: Task, data: list[Example]) -> list[Example]:
        # Built here, once every component of a combination has run its before_task (adapters are final).
        self.release()
        groups = layer_groups(ctx.model)
        matrices = [(n, p) for g in groups for n, p in g.params if p.dim() == 2 and self._selected(g.name)]
        if not matrices:
            raise RetainError(
                "coso: no trainable linear layer inside a decoder layer matches method.target_modules "
                f"{self.config.target_modules or '(all)'}; check the names (retain prints them with "
                "--dry-run) or use finetuning_type: full"
            )
        self.targets = [SubspaceTarget(n, p, self.history.get(n), self.config) for n, p in matrices]
        chosen = {id(p) for _, p in matrices}
        rest = [(n, p) for g in groups for n, p in g.params if id(p) not in chosen]
        rest += other_trainable(ctx.model, groups)
        if self.config.train_other_params:
            self.others = rest
        else:
            self.frozen = [p for _, p in rest]
            for param in self.frozen:
                param.requires_grad_(False)
        return data

    def create_optimizer(self, ctx: MethodContext, args: TrainingArguments) -> torch.optim.Optimizer:
        if args.optim not in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
            logger.warning("coso steps with its own projected Adam; train.optim=%s is not used", args.optim)
        groups: list[dict[str, Any]] = [{"params": [t.param for t in self.targets]}]
        if self.others:
            groups.append({"params": [p for _, p in self.others]})
        return CoSOAdam(
            groups,
            {t.param: t for t in self.targets},
            self.config.update_gap,
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
        )

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        added, fractions = 0, []
        for target in self.targets:
            added += target.finish_task(self.config.threshold)
            self.history[target.name] = target.history.cpu()
            fractions.append(target.history.shape[1] / target.dim)
        if fractions:
            ctx.log("coso/added_directions", added / len(fractions))
            ctx.log("coso/history_fraction", sum(fractions) / len(fractions))
        self.release()

    def release(self) -> None:
        """Drop this task's projectors and sketches and make trainable again what this method froze."""
        for param in self.frozen:
            param.requires_grad_(True)
        self.targets, self.frozen, self.others = [], [], []

    def state_dict(self) -> dict[str, Any]:
        return {"history": {n: b.clone() for n, b in self.history.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {n: b.float() for n, b in state.get("history", {}).items()}
