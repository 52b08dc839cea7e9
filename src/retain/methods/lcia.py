"""LCIA: dynamic EMA (DEMA) plus instruction grouping (Qiao et al., "Large Continual Instruction
Assistant", ICML 2025; arXiv 2410.10868; reference code JingyangQiao/CoIN).

DEMA, as in the reference `LoraModel.ema_update` / `ema_replace` (CoIN/peft/tuners/lora.py), per
trainable tensor after every optimizer step t, with g_t the gradient the optimizer used:
    alpha_t = c (1 + |g_t|_1) / (|theta_t - theta*_{t-1}|_1 |g_t - g_{t-1}|_1),  fallback unless in (0, 1)
    theta*_t = (1 - alpha_t) theta*_{t-1} + alpha_t theta_t      (theta* = theta after the first step)
and theta <- theta* at the end of the task (c = 2, fallback 0.01; Continual-NExT: c = 0.01, fallback 0.001).
g_t is the accumulated (and, with several processes, all-reduced) gradient before any clipping: the
before_optimizer_step hook runs ahead of train.max_grad_norm clipping, so alpha, which is not
scale-invariant in g, reads the same gradient as in the reference. The raw pre-EMA weights are
discarded unless `keep_raw: true`.

Instruction grouping (reference `instruct/LoRASelect.py`): each task's instruction templates are compared
with every group's codebook by the mean pairwise TF-IDF cosine. At or above the threshold the task retrains
that group's LoRA with DEMA; below it a new group opens with a new LoRA that starts from the latest trained
adapter. At test time each instance goes to its most similar group, or to the newest group below the
threshold (evaluation answers each route's instances together: eval_routes / activate_route).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from retain.data.formats import Example
from retain.errors import RetainError
from retain.io import write_json_atomic
from retain.methods.base import MethodContext
from retain.methods.common.routing import RoutedMethod
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, add_adapter, trainable_parameters
from retain.models.embedder import SIMILARITIES, Similarity, build_similarity

if TYPE_CHECKING:
    from retain.data.streams import Task

logger = logging.getLogger(__name__)

CODEBOOK_FILE = "lcia_codebook.json"
FIRST_ADAPTER = "default"  # the adapter apply_finetuning creates: group 1
VARIANTS = {"coin": (2.0, 0.01), "continual_next": (0.01, 0.001)}  # (c, fallback alpha)
TEMPLATE_MODES = ("masked", "first_line", "last_line", "full")
AGGREGATES = ("mean", "max")


@dataclass
class LCIAConfig:
    dema: bool = field(
        default=True,
        metadata={"help": "dynamic EMA on tasks that retrain an existing adapter (ablation: false)"},
    )
    dema_on_new_group: bool = field(
        default=False,
        metadata={"help": "also use DEMA on tasks that open a new group (the reference trains them plainly)"},
    )
    variant: str = field(
        default="coin",
        metadata={
            "help": "DEMA preset: coin (c=2, fallback 0.01) or continual_next (c=0.01, fallback 0.001)"
        },
    )
    dema_c: float | None = field(
        default=None,
        metadata={"help": "constant c in alpha = c(1+|g|)/(|theta-ema| |g-g_prev|); default: the variant's"},
    )
    fallback_alpha: float | None = field(
        default=None,
        metadata={"help": "weight on the new weights when alpha is outside (0, 1); default: the variant's"},
    )
    grouping: bool = field(
        default=True,
        metadata={
            "help": "one LoRA per group of similar instructions, routed per test instance (false: one)"
        },
    )
    similarity: str = field(
        default="tfidf",
        metadata={"help": "template similarity: tfidf (reference) or minilm (offline embedder)"},
    )
    threshold: float = field(
        default=0.9, metadata={"help": "similarity at or above which a task reuses a group (reference: 0.9)"}
    )
    aggregate: str = field(
        default="mean",
        metadata={"help": "group score over (template, codebook entry) pairs: mean (reference) or max"},
    )
    template: str = field(
        default="masked",
        metadata={
            "help": "template of a prompt: masked (first user turn, numbers and quoted spans -> {}), "
            "first_line, last_line (reference VQA rule) or full"
        },
    )
    max_templates: int = field(
        default=16, metadata={"help": "most frequent distinct templates a task adds to its group's codebook"}
    )
    keep_raw: bool = field(
        default=False,
        metadata={
            "help": "keep each DEMA-trained adapter's raw (pre-EMA) weights in the method state of every "
            "later checkpoint (for analysis; costs one adapter copy per group)"
        },
    )

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise RetainError(
                f"config: lcia variant '{self.variant}' is unknown; use {' or '.join(VARIANTS)}"
            )
        c, fallback = VARIANTS[self.variant]
        self.dema_c = c if self.dema_c is None else self.dema_c
        self.fallback_alpha = fallback if self.fallback_alpha is None else self.fallback_alpha
        if self.dema_c <= 0 or not 0 < self.fallback_alpha < 1:
            raise RetainError("config: lcia needs dema_c > 0 and fallback_alpha in (0, 1)")
        if self.similarity not in SIMILARITIES:
            raise RetainError(f"config: lcia similarity must be one of {', '.join(SIMILARITIES)}")
        if self.aggregate not in AGGREGATES or self.template not in TEMPLATE_MODES:
            raise RetainError(
                f"config: lcia aggregate must be one of {', '.join(AGGREGATES)} and template one of "
                f"{', '.join(TEMPLATE_MODES)}"
            )
        if not 0 <= self.threshold <= 1 or self.max_templates < 1:
            raise RetainError("config: lcia needs threshold in [0, 1] and max_templates >= 1")


# --- dynamic EMA ----------------------------------------------------------------------------------------


class DynamicEMA:
    """The EMA copy theta* and the previous gradient of each trainable tensor (both fp32), for one task.

    `capture` runs before the optimizer step (the gradient is accumulated and all-reduced there, not yet
    clipped), `update` after it; both work on all tensors at once (torch._foreach_*) and
    never wait on the device. `stats` summarises the alphas used from running sums (no per-step list).
    """

    def __init__(self, c: float, fallback: float) -> None:
        self.c, self.fallback = c, fallback
        self.ema: dict[str, torch.Tensor] = {}
        self.prev_grad: dict[str, torch.Tensor] = {}
        # name -> (|g_t|_1, |g_t - g_{t-1}|_1 or None), or (None, None) for a tensor without gradient
        self.pending: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self.last: torch.Tensor | None = None  # the alphas used at the last update, one per tensor
        self.count = 0  # (step, tensor) alphas used so far
        self.missing_grad = 0
        self._sum: torch.Tensor | None = None  # running sum / min / max of the alphas, accepted count
        self._min: torch.Tensor | None = None
        self._max: torch.Tensor | None = None
        self._accepted: torch.Tensor | None = None

    @property
    def accepted(self) -> int:
        """How many (step, tensor) alphas the rule produced in (0, 1) (reading it waits on the device)."""
        return 0 if self._accepted is None else int(self._accepted)

    @torch.no_grad()
    def capture(self, params: dict[str, torch.Tensor]) -> None:
        """Record |g_t|_1 and |g_t - g_{t-1}|_1 of every tensor, then keep g_t as the previous gradient."""
        if params and all(p.grad is None for p in params.values()):
            raise RetainError(
                "lcia: DEMA needs the gradients of the trainable parameters before the optimizer step, but "
                "none has one (DeepSpeed ZeRO-1 and above partition them); use DDP or ZeRO-0, or dema: false"
            )
        self.pending = {}
        names = [n for n, p in params.items() if p.grad is not None]
        for name in params:
            if params[name].grad is None:
                self.pending[name] = (None, None)
                self.prev_grad.pop(name, None)
        grads = [params[n].grad.detach().float() for n in names]
        grad_l1 = torch._foreach_norm(grads, 1) if grads else []
        seen = [i for i, n in enumerate(names) if n in self.prev_grad]
        changes: dict[int, torch.Tensor] = {}
        if seen:
            diffs = torch._foreach_sub([grads[i] for i in seen], [self.prev_grad[names[i]] for i in seen])
            changes = dict(zip(seen, torch._foreach_norm(diffs, 1), strict=True))
            torch._foreach_copy_([self.prev_grad[names[i]] for i in seen], [grads[i] for i in seen])
        for i, name in enumerate(names):
            self.pending[name] = (grad_l1[i], changes.get(i))
            if name not in self.prev_grad:
                self.prev_grad[name] = grads[i].clone()

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        """theta* <- (1 - alpha) theta* + alpha theta for every tensor, alpha by the DEMA rule or fallback."""
        if set(self.pending) != set(params):
            raise RetainError("lcia: DEMA update without the gradients of this step (capture was not called)")
        if not params:
            return
        names = list(params)
        values = [params[n].detach().float() for n in names]
        self.missing_grad += sum(self.pending[n][0] is None for n in names)
        fresh = [i for i, n in enumerate(names) if n not in self.ema]
        for i in fresh:
            # theta* starts as the weights after the first step (the reference's fallback there averages
            # theta with itself), so the first step counts as not accepted.
            self.ema[names[i]] = values[i].clone()
        emas = [self.ema[n] for n in names]
        diffs = torch._foreach_sub(values, emas)  # theta_t - theta*_{t-1}
        distance = torch.stack(torch._foreach_norm(diffs, 1)).double()
        device = distance.device
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=device)

        def stacked(position: int) -> torch.Tensor:
            items = [self.pending[n][position] for n in names]
            return torch.stack([nan if t is None else t.to(device, torch.float64) for t in items])

        raw = self.c * (1 + stacked(0)) / (distance * stacked(1))
        if fresh:
            raw[fresh] = nan
        ok = torch.isfinite(raw) & (raw > 0) & (raw < 1)
        used = torch.where(ok, raw, torch.full_like(raw, self.fallback))
        # theta* += alpha (theta - theta*), one alpha per tensor
        torch._foreach_mul_(diffs, [a.float() for a in used.unbind()])
        torch._foreach_add_(emas, diffs)
        self.last = used
        self.count += len(names)
        if self._sum is None:
            self._sum, self._min, self._max = used.sum(), used.min(), used.max()
            self._accepted = ok.sum()
        else:
            self._sum += used.sum()
            self._min = torch.minimum(self._min, used.min())
            self._max = torch.maximum(self._max, used.max())
            self._accepted += ok.sum()
        self.pending = {}

    def write_back(self, params: dict[str, torch.Tensor], keep_raw: bool = False) -> dict[str, torch.Tensor]:
        """Put theta* into the model; returns the raw (pre-EMA) weights, fp32 on the CPU, if `keep_raw`."""
        raw = {}
        with torch.no_grad():
            for name, param in params.items():
                if keep_raw:
                    raw[name] = param.detach().float().cpu().clone()
                if name in self.ema:
                    param.copy_(self.ema[name].to(param.dtype))
        return raw

    def stats(self) -> dict[str, float]:
        """Share of (step, tensor) alphas accepted by the rule; mean/min/max of the alphas used."""
        if not self.count:
            return {"updates": 0}
        return {
            "accepted_frac": self.accepted / self.count,
            "alpha_mean": float(self._sum) / self.count,
            "alpha_min": float(self._min),
            "alpha_max": float(self._max),
            "updates": self.count,
            "missing_grad": self.missing_grad,
        }


# --- instruction templates and routing ------------------------------------------------------------------

_QUOTED = re.compile(r"(?<!\w)'[^'\n]+'(?!\w)|\"[^\"\n]+\"|\u201c[^\u201d\n]+\u201d")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,:/]\d+)*")
_SPACES = re.compile(r"[ \t]+")


def extract_template(example: Example, mode: str = "masked") -> str:
    """The instruction template of one example: its first user turn, instance-specific parts removed.

    masked: the whole turn with quoted spans and numbers replaced by `{}`; first_line / last_line: that
    line of the turn, masked the same way (last_line is the reference's rule for VQA prompts, whose
    question comes first and the fixed instruction last); full: the turn unchanged.
    """
    text = next((m["content"] for m in example.messages if m.get("role") == "user"), "")
    if mode == "full":
        return text.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    text = lines[0] if mode == "first_line" else lines[-1] if mode == "last_line" else "\n".join(lines)
    text = _NUMBER.sub("{}", _QUOTED.sub("{}", text))
    return "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines()).strip()


def task_templates(examples: Sequence[Example], mode: str, limit: int) -> list[str]:
    """The task's distinct templates, the `limit` most frequent first (ties: first seen)."""
    counts = Counter(extract_template(e, mode) for e in examples)
    return [t for t, _ in counts.most_common(limit)]


def group_scores(sims: np.ndarray, aggregate: str = "mean") -> float:
    """One score from a (templates x codebook entries) similarity matrix: its mean (reference) or max."""
    return float(sims.mean() if aggregate == "mean" else sims.max())


def assign_group(scores: Sequence[float], threshold: float) -> int | None:
    """Training: index of the group whose score is highest if it reaches `threshold`, else None (new)."""
    if not scores:
        return None
    best = int(np.argmax(scores))
    return best if scores[best] >= threshold else None


def route_instance(scores: Sequence[float], threshold: float) -> int:
    """Test: index of the most similar group if its score reaches `threshold`, else the newest group."""
    best = assign_group(scores, threshold)
    return len(scores) - 1 if best is None else best


# --- the method -----------------------------------------------------------------------------------------


@register("lcia", config=LCIAConfig)
class LCIA(RoutedMethod):
    """LCIA: dynamic-EMA LoRA training with instruction-grouped adapters and per-instance routing."""

    config: LCIAConfig

    def __init__(self, config: LCIAConfig | None = None) -> None:
        super().__init__(config or LCIAConfig())
        self.groups: list[dict[str, Any]] = []  # {"adapter", "templates", "tasks"}, in creation order
        self.history: list[dict[str, Any]] = []  # one record per trained task
        self.latest: str | None = None  # adapter trained last
        self.raw: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> pre-EMA weights (keep_raw only)
        self.ema: DynamicEMA | None = None
        self.params: dict[str, nn.Parameter] = {}  # the trainable tensors of the current task
        self.current: dict[str, Any] | None = None
        self._similarity: Similarity | None = None

    @property
    def similarity(self) -> Similarity:
        if self._similarity is None:
            self._similarity = build_similarity(self.config.similarity)
        return self._similarity

    def scores(self, templates: Sequence[str]) -> list[float]:
        """Each group's similarity to `templates`."""
        return [
            group_scores(self.similarity.matrix(templates, g["templates"]), self.config.aggregate)
            for g in self.groups
        ]

    def before_task(self, ctx: MethodContext, task: Task) -> None:
        cfg = self.config
        templates = task_templates(task.train, cfg.template, cfg.max_templates)
        scores: list[float] = []
        if not self.groups:
            index = None
        elif not cfg.grouping:
            index = 0
        else:
            scores = self.scores(templates)
            index = assign_group(scores, cfg.threshold)
        new_group = index is None
        if new_group:
            name = FIRST_ADAPTER if not self.groups else f"group{len(self.groups) + 1}"
            if self.groups:
                add_adapter(ctx.model, name, init_from=self.latest)
            self.groups.append({"adapter": name, "templates": [], "tasks": []})
            index = len(self.groups) - 1
        group = self.groups[index]
        group["templates"] += [t for t in templates if t not in group["templates"]]
        group["tasks"].append(task.name)
        activate_adapters(ctx.model, [group["adapter"]], [group["adapter"]])
        use_dema = cfg.dema and (not new_group or cfg.dema_on_new_group)
        self.ema = DynamicEMA(cfg.dema_c, cfg.fallback_alpha) if use_dema else None
        self.params = trainable_parameters(ctx.model) if use_dema else {}
        self.current = {
            "task": task.name,
            "group": index + 1,
            "adapter": group["adapter"],
            "new_group": new_group,
            "scores": [round(s, 6) for s in scores],
            "templates": templates,
            "dema": use_dema,
        }
        logger.info(
            "lcia: task %s -> group %d (%s, %s; best score %s)",
            task.name,
            index + 1,
            group["adapter"],
            "new" if new_group else "retrain",
            f"{max(scores):.3f}" if scores else "-",
        )

    def before_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.capture(self.params)

    def after_optimizer_step(self, ctx: MethodContext, model: nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(self.params)

    def after_task(self, ctx: MethodContext, task: Task, data: list[Example]) -> None:
        record = dict(self.current or {"task": task.name})
        if self.ema is not None:
            raw = self.ema.write_back(self.params, keep_raw=self.config.keep_raw)
            if self.config.keep_raw:
                self.raw[record["adapter"]] = raw
            stats = self.ema.stats()
            record["dema_stats"] = stats
            for key in ("accepted_frac", "alpha_mean", "alpha_min", "alpha_max"):
                if key in stats:
                    ctx.log(f"lcia/dema_{key}", stats[key])
            if stats.get("missing_grad"):
                logger.warning(
                    "lcia: %d DEMA updates of task %s had no gradient and used the fallback alpha",
                    stats["missing_grad"],
                    task.name,
                )
        self.ema, self.params = None, {}
        self.latest = record.get("adapter", self.latest)
        self.history.append(record)
        ctx.log("lcia/adapters", len(self.groups))
        if ctx.rank == 0 and ctx.run_dir:
            write_json_atomic(os.path.join(ctx.run_dir, CODEBOOK_FILE), self.codebook())

    def codebook(self) -> dict[str, Any]:
        """The groups, their templates and each task's decision, as written to lcia_codebook.json."""
        cfg = self.config
        return {
            "similarity": cfg.similarity,
            "threshold": cfg.threshold,
            "aggregate": cfg.aggregate,
            "template": cfg.template,
            "num_adapters": len(self.groups),
            "groups": self.groups,
            "tasks": self.history,
        }

    def restore(self, ctx: MethodContext) -> None:
        if self.latest is not None:
            activate_adapters(ctx.model, [self.latest], [self.latest])

    def route(self, ctx: MethodContext, task: Task) -> list[str]:
        """The adapter of each test instance: its most similar group, or the newest below the threshold."""
        if not self.groups:
            return [FIRST_ADAPTER] * len(task.test)
        templates = [extract_template(e, self.config.template) for e in task.test]
        if not self.config.grouping or len(self.groups) == 1:
            return [self.groups[-1]["adapter"]] * len(templates)
        chosen = {
            t: route_instance(self.scores([t]), self.config.threshold) for t in dict.fromkeys(templates)
        }
        return [self.groups[chosen[t]]["adapter"] for t in templates]

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"groups": self.groups, "history": self.history, "latest": self.latest}
        if self.raw:
            state["raw"] = self.raw
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups = [
            {"adapter": g["adapter"], "templates": list(g["templates"]), "tasks": list(g["tasks"])}
            for g in state.get("groups", [])
        ]
        self.history = [dict(r) for r in state.get("history", [])]
        self.latest = state.get("latest")
        self.raw = {k: dict(v) for k, v in state.get("raw", {}).items()}
        self.ema, self.params, self.current = None, {}, None
