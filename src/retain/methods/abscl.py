"""ABSCL / LLM-CL: a shared adapter plus one domain adapter per task, chosen at test time by domain
positioning (Ding et al., "Boosting Large Language Models with Continual Learning for Aspect-based
Sentiment Analysis", Findings of EMNLP 2024).

While training task t, both the shared adapter s (PEFT's "default") and the new domain adapter d_t are
trained, with the loss
L = CE(D_t; s + d_t) + CE(M; s) + lambda1 * sum_m |A_s^m A_dt^m^T|_1 + lambda2 * ||s||^2,
where M is a replay batch from the memories of earlier domains (through the shared adapter alone), the
orthogonality term keeps d_t's input subspace out of the shared one (A_s detached, as O-LoRA treats its
reference adapter), and the L2 term is on the SHARED adapter. After the task, the mean mu_t of the prompt
features f(x) and a count-weighted shared covariance S are updated; a test instance uses s + d_k with
k = argmin_t (f - mu_t)^T S^-1 (f - mu_t), with f computed from the same base model and prompt text
(by default the last prompt token of the second-to-last layer, as in the paper).

Deviation from the paper (METHODS.md card 10b): the paper trains each task in two stages, first the
shared adapter alone on D_t and the replay memory, then the domain adapter on D_t with the orthogonality
term against the (then fixed) shared adapter. Here both stages are folded into ONE training run per task:
s and d_t are trained jointly on the sum above, with A_s detached in the orthogonality term so that only
d_t is pushed out of the shared subspace. This keeps one optimizer pass per task (the loop trains one
run per task) at the price of the shared adapter moving while d_t is being fitted; two stages would need
a second training run inside the task and are not implemented.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.methods.base import MethodContext, RunSizes, StateItem, earlier_adapters, example_memory
from retain.methods.common.penalties import a_overlap_l1, lora_a_overlap_pairs, norm_of
from retain.methods.common.routing import (
    FeaturePool,
    RoutedMethod,
    check_feature_settings,
    prompt_features,
    sample_indices,
)
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, adapter_state, add_adapter, peft_model
from retain.models.forward import StepOutputs

if TYPE_CHECKING:
    from retain.data.streams import Task

SHARED = "default"


@dataclass
class ABSCLConfig:
    orthogonal_lambda: float = field(
        default=0.1,
        metadata={"help": "weight lambda1 of the L1 overlap |A_shared A_domain^T| (O-LoRA style)"},
    )
    shared_l2_lambda: float = field(
        default=0.01, metadata={"help": "weight lambda2 of the squared L2 norm of the shared adapter"}
    )
    memory_size: int = field(
        default=32, metadata={"help": "examples per domain kept to replay through the shared adapter"}
    )
    replay_batch_size: int = field(
        default=4, metadata={"help": "replayed examples per training step (0: no replay)"}
    )
    stats_samples: int = field(
        default=256, metadata={"help": "training prompts per domain for the feature statistics (0: all)"}
    )
    shrinkage: float = field(
        default=0.1, metadata={"help": "covariance shrinkage toward a scaled identity, in [0, 1]"}
    )
    feature_layer: int = field(
        default=-2, metadata={"help": "hidden_states index the features come from (-2: second-to-last layer)"}
    )
    feature_pool: FeaturePool = field(
        default="last",
        metadata={
            "help": "pooling over prompt tokens: last (the last prompt token, as in the paper) or mean"
        },
    )
    feature_batch_size: int = field(default=16, metadata={"help": "prompts per feature-extraction forward"})

    def __post_init__(self) -> None:
        if self.orthogonal_lambda < 0 or self.shared_l2_lambda < 0:
            raise RetainError("config: abscl needs orthogonal_lambda >= 0 and shared_l2_lambda >= 0")
        if self.memory_size < 0 or self.replay_batch_size < 0 or self.stats_samples < 0:
            raise RetainError("config: abscl needs memory_size, replay_batch_size and stats_samples >= 0")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise RetainError(f"config: abscl shrinkage must be in [0, 1], got {self.shrinkage}")
        check_feature_settings("abscl", self.feature_batch_size)


def mahalanobis_domains(features: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Index of the nearest mean under the precision matrix P, for each feature row, in float64.

    (f - mu)^T P (f - mu) = f.Pf - 2 f.P mu + mu.P mu, so no [N, T, d] difference tensor is built.
    """
    f, mu, p = features.double(), means.double(), precision.double()
    fp = f @ p  # [N, d]
    distance = (fp * f).sum(-1, keepdim=True) - 2 * fp @ mu.T + ((mu @ p) * mu).sum(-1)[None]
    return distance.argmin(dim=1)


def shrunk_precision(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Inverse (float64) of the shrunk covariance (1 - a) S + a * tr(S)/d * I, plus a small ridge."""
    cov = cov.double()
    dim = cov.shape[0]
    scale = float(torch.trace(cov)) / dim if dim else 0.0
    eye = torch.eye(dim, dtype=torch.float64)
    return torch.linalg.inv((1 - shrinkage) * cov + (shrinkage * scale + 1e-6 * max(scale, 1e-12)) * eye)


@register("abscl", config=ABSCLConfig)
class ABSCL(RoutedMethod):
    """ABSCL: a shared adapter plus orthogonal domain adapters chosen per instance by Mahalanobis distance."""

    config: ABSCLConfig
    export_refusal = "picks an adapter per prompt (by its domain positioning)"
    refused_strategies = {
        "multiprocess": "its replay pass switches the active adapters inside a training step, which no run "
        "has checked under more than one process",
        "sharded-params": "its orthogonality penalty reads the shared adapter's full LoRA matrices and it "
        "computes prompt features with its own forward passes; under FSDP / ZeRO-3 a process holds only a "
        "shard of each",
    }

    def __init__(self, config: ABSCLConfig | None = None) -> None:
        super().__init__(config or ABSCLConfig())
        self.domains: list[str] = []  # domain adapter of each finished task, in stream order
        self.means = torch.zeros(0, 0)  # [T, d] feature mean per domain
        self.cov = torch.zeros(0, 0)  # [d, d] count-weighted average of the domains' covariances
        self.count = 0
        self.memory: dict[str, list[Example]] = {}
        self.current: str | None = None
        self._precision: torch.Tensor | None = None  # float64 inverse of the shrunk cov, cached
        self._replay: list[dict] = []
        self._draws: random.Random | None = None
        self._pairs: list[tuple[list[torch.Tensor], nn.Parameter]] = []  # (A_shared, A_domain) per layer
        self._shared: list[nn.Parameter] = []  # the shared adapter's tensors

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        kept = sum(min(n, self.config.memory_size) for n in sizes.train_examples[:-1])  # 0: no memory
        # per-domain feature means and the shared covariance and its inverse, on the CPU
        statistics = StateItem(
            "domain statistics", (sizes.tasks + 2 * sizes.hidden_size) * sizes.hidden_size, on_device=False
        )
        return [earlier_adapters(sizes), example_memory(sizes, kept, "replay memory"), statistics]

    def _features(self, ctx: MethodContext, examples: Sequence[Example]) -> torch.Tensor:
        c = self.config
        return prompt_features(ctx, examples, c.feature_layer, c.feature_pool, c.feature_batch_size)

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        self.current = f"domain{ctx.task_index}"
        add_adapter(ctx.model, self.current)
        activate_adapters(ctx.model, [SHARED, self.current], trainable=[SHARED, self.current])
        memory = [e for examples in self.memory.values() for e in examples]
        self._replay = ctx.encode(memory) if memory and self.config.replay_batch_size else []
        self._draws = ctx.rng("abscl:replay")
        # Built once per task; the views follow the shared adapter as it trains.
        self._pairs = lora_a_overlap_pairs(ctx.model, [SHARED], self.current)
        self._shared = list(adapter_state(ctx.model, SHARED).values())

    def _replay_loss(self, ctx: MethodContext, model: nn.Module) -> torch.Tensor:
        size = min(self.config.replay_batch_size, len(self._replay))
        picked = self._draws.sample(range(len(self._replay)), size)
        batch = {k: v.to(ctx.device) for k, v in ctx.collate([self._replay[i] for i in picked]).items()}
        # Only the active set changes (PEFT's set_adapter); the domain adapter is back in before backward.
        inner = peft_model(model)
        inner.base_model.set_adapter([SHARED])
        try:
            return ctx.forward(model, batch).loss
        finally:
            inner.base_model.set_adapter([SHARED, self.current])

    def orthogonal(self) -> torch.Tensor:
        """sum over LoRA modules of |A_shared A_domain^T|_1, A_shared detached (only the domain moves)."""
        return a_overlap_l1(self._pairs)

    def shared_l2(self) -> torch.Tensor:
        """||shared adapter||^2: the sum of squares of its A and B matrices."""
        return norm_of(self._shared, squared=True)

    def loss(self, ctx: MethodContext, model: nn.Module, batch: dict, outputs: StepOutputs) -> torch.Tensor:
        total = outputs.loss
        c = self.config
        orth = self.orthogonal()
        ctx.log("abscl/orthogonal", orth)
        total = total + c.orthogonal_lambda * orth
        if c.shared_l2_lambda:
            l2 = self.shared_l2()
            ctx.log("abscl/shared_l2", l2)
            total = total + c.shared_l2_lambda * l2
        if self._replay:
            replay = self._replay_loss(ctx, model)
            ctx.log("abscl/replay", replay)
            total = total + replay
        return total

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        rng = ctx.rng("abscl:samples")
        own = [e for e in data if "replayed_from" not in e.meta]
        kept = sample_indices(len(own), self.config.stats_samples, rng)
        features = self._features(ctx, [own[i] for i in kept]).double()
        mean = features.mean(dim=0)
        centred = features - mean
        cov = centred.T @ centred / len(features)
        n = len(features)
        if self.count:
            self.cov = ((self.count * self.cov.double() + n * cov) / (self.count + n)).float()
            self.means = torch.cat([self.means, mean.float()[None]])
        else:
            self.cov, self.means = cov.float(), mean.float()[None]
        self.count += n
        self._precision = shrunk_precision(self.cov, self.config.shrinkage)
        if self.config.memory_size:
            picked = sample_indices(len(own), self.config.memory_size, rng)
            self.memory[self.current] = [own[i] for i in picked]
        self.domains.append(self.current)
        self._replay, self._pairs, self._shared = [], [], []
        activate_adapters(ctx.model, [SHARED, self.current], trainable=[])
        ctx.log("abscl/domain_accuracy_train", self._train_accuracy(features, len(self.domains) - 1))

    def _train_accuracy(self, features: torch.Tensor, domain: int) -> float:
        return float((mahalanobis_domains(features, self.means, self.precision()) == domain).double().mean())

    def precision(self) -> torch.Tensor:
        """Inverse of the shrunk shared covariance, computed once per change of the statistics."""
        if self._precision is None:
            self._precision = shrunk_precision(self.cov, self.config.shrinkage)
        return self._precision

    def domain_of(self, ctx: MethodContext, examples: Sequence[Example]) -> list[int]:
        """Index (into self.domains) of the nearest domain of each example's prompt."""
        return mahalanobis_domains(self._features(ctx, examples), self.means, self.precision()).tolist()

    def route(self, ctx: MethodContext, task: Task) -> list[str]:
        if not self.domains:
            return [SHARED] * len(task.test)
        if len(self.domains) == 1:
            return [self.domains[0]] * len(task.test)
        return [self.domains[k] for k in self.domain_of(ctx, task.test)]

    def route_adapters(self, name: str) -> list[str]:
        return [SHARED] if name == SHARED else [SHARED, name]

    def restore(self, ctx: MethodContext) -> None:
        activate_adapters(ctx.model, [SHARED, *self.domains[-1:]], trainable=[])

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "means": self.means.clone(),
            "cov": self.cov.clone(),
            "count": self.count,
            "memory": {d: [e.to_dict() for e in examples] for d, examples in self.memory.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.domains = list(state.get("domains", []))
        self.means = state.get("means", torch.zeros(0, 0))
        self.cov = state.get("cov", torch.zeros(0, 0))
        self.count = int(state.get("count", 0))
        self.memory = {d: [Example.from_dict(r) for r in recs] for d, recs in state.get("memory", {}).items()}
        self.current = self.domains[-1] if self.domains else None
        self._precision = shrunk_precision(self.cov, self.config.shrinkage) if self.domains else None
