"""Elastic Weight Consolidation, online form (Kirkpatrick et al., 2017; Schwarz et al., 2018).

After task t: F <- gamma * F + F_t, with F_t the diagonal empirical Fisher E[(d log p(y|x) / d theta)^2]
over `fisher_samples` training examples (one gradient per example), and theta* <- theta. log p(y|x) is
the answer's log-likelihood, the sum over its tokens, not the token mean the training loss uses: the
mean would shrink F by the square of the answer length and make lambda depend on it.
While training later tasks: L = L_task + lambda/2 * sum_i F_i (theta_i - theta*_i)^2, a penalty with a
gradient lambda * F * (theta - theta*) that pulls every parameter back toward theta*.
With several processes each rank estimates the Fisher on its share of the samples and the sums are
all-reduced, so every rank holds the same F.

F and theta* are keyed by parameter name and follow whatever is trainable, so EWC combines with methods
that add or freeze adapters (O-LoRA, ConPET, ABSCL, ...): the penalty covers the parameters trainable
now that have an anchor (a frozen parameter cannot move and needs none; a fresh adapter has no anchor
yet), and after a task F and theta* are recorded for the parameters that task trained (taken at its first
`loss` call, since another component may freeze them in its own after_task). Task 1 has no penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from retain.data.batching import IGNORE_INDEX
from retain.errors import RetainError
from retain.methods.base import ContinualMethod, MethodContext, RunSizes, StateItem
from retain.methods.common.sharding import DEEPSPEED_UNVERIFIED, EXTRA_BACKWARD_SHARDED
from retain.methods.registry import register
from retain.models.adapters import trainable_parameters, unwrap
from retain.models.forward import StepOutputs


@dataclass
class EWCConfig:
    ewc_lambda: float = field(default=1000.0, metadata={"help": "penalty strength lambda"})
    gamma: float = field(default=1.0, metadata={"help": "decay of the accumulated Fisher (online EWC)"})
    fisher_samples: int = field(
        default=64, metadata={"help": "training examples used to estimate the Fisher"}
    )

    def __post_init__(self) -> None:
        if self.ewc_lambda < 0 or not 0.0 <= self.gamma <= 1.0 or self.fisher_samples <= 0:
            raise RetainError("config: ewc needs ewc_lambda >= 0, gamma in [0, 1] and fisher_samples > 0")


def diagonal_fisher(
    ctx: MethodContext, examples: list, names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Mean squared per-example gradient of the answer's log-likelihood (summed over its tokens) for the
    parameters `names` (default: every trainable parameter); they need not be trainable any more (their
    flags are restored afterwards)."""
    inner = unwrap(ctx.model)
    every = dict(inner.named_parameters())
    names = list(trainable_parameters(ctx.model)) if names is None else [n for n in names if n in every]
    if not names:
        return {}
    params = {n: every[n] for n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    share = examples[ctx.rank :: ctx.world_size]
    features = ctx.encode(share)
    was_training = ctx.model.training
    ctx.model.eval()  # no dropout: the Fisher of the model as it is
    for p in params.values():
        p.requires_grad_(True)
    for feature in features:
        batch = {k: v.to(ctx.device) for k, v in ctx.collate([feature]).items()}
        outputs = ctx.forward(ctx.model, batch)
        log_likelihood = outputs.loss * (outputs.labels != IGNORE_INDEX).sum()  # the loss is a token mean
        # autograd.grad leaves .grad untouched (and DDP's gradient hooks quiet).
        grads = torch.autograd.grad(log_likelihood, [params[n] for n in names], allow_unused=True)
        for n, g in zip(names, grads, strict=True):
            if g is not None:
                fisher[n] += g.detach().float() ** 2
    for n, p in params.items():
        p.requires_grad_(flags[n])
    ctx.model.train(was_training)
    count = torch.tensor(float(len(features)))
    if ctx.world_size > 1 and dist.is_initialized():
        for tensor in fisher.values():
            dist.all_reduce(tensor)
        dist.all_reduce(count)
    return {n: f / count.clamp(min=1.0) for n, f in fisher.items()}


@register("ewc", config=EWCConfig)
class EWC(ContinualMethod):
    """Online EWC: a Fisher-weighted quadratic penalty that pulls weights back toward earlier tasks'."""

    config: EWCConfig
    refused_strategies = {
        "sharded-params": f"the Fisher needs per-example gradients: {EXTRA_BACKWARD_SHARDED}",
        "deepspeed": DEEPSPEED_UNVERIFIED,
    }

    def __init__(self, config: EWCConfig | None = None) -> None:
        super().__init__(config or EWCConfig())
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.trained: list[str] = []  # the parameters the current task trains (set at its first loss)

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        return [
            StateItem("Fisher diagonal", sizes.trainable_params),
            StateItem("anchor parameters (theta*)", sizes.trainable_params),
        ]

    def before_task(self, ctx: MethodContext, task) -> None:
        self.trained = []

    def penalty(self, model) -> torch.Tensor:
        """lambda/2 * sum F (theta - theta*)^2 over the trainable parameters that have an anchor."""
        params = trainable_parameters(model)
        total = next(iter(params.values())).new_zeros((), dtype=torch.float32)
        for name, fisher in self.fisher.items():
            param = params.get(name)
            if param is None or name not in self.anchor:
                continue  # frozen: it cannot move
            anchor = self.anchor[name].to(param.device)
            total = total + (fisher.to(param.device) * (param.float() - anchor) ** 2).sum()
        return 0.5 * self.config.ewc_lambda * total

    def loss(self, ctx: MethodContext, model, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        if not self.trained:
            self.trained = list(trainable_parameters(model))
        if not self.fisher or ctx.task_index <= 1:
            return outputs.loss
        penalty = self.penalty(model)
        ctx.log("ewc/penalty", penalty)
        return outputs.loss + penalty

    def after_task(self, ctx: MethodContext, task, data: list) -> None:
        generator = torch.Generator().manual_seed(ctx.config.seed + ctx.task_index)
        order = torch.randperm(len(data), generator=generator)[: self.config.fisher_samples].tolist()
        names = self.trained or list(trainable_parameters(ctx.model))
        new = diagonal_fisher(ctx, [data[i] for i in order], names)
        for name, value in new.items():
            old = self.fisher.get(name)
            self.fisher[name] = value if old is None else self.config.gamma * old + value
        params = dict(unwrap(ctx.model).named_parameters())
        for name in new:
            self.anchor[name] = params[name].detach().clone().float()
        self.trained = []
        if self.fisher:
            ctx.log("ewc/fisher_mean", torch.stack([f.mean() for f in self.fisher.values()]).mean())

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher = dict(state.get("fisher", {}))
        self.anchor = dict(state.get("anchor", {}))
