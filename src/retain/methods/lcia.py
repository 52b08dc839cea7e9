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

Which tensors: every trainable one, as the reference's `ema_update` and `ema_replace` loop over
`model.named_parameters()` keeping those with `requires_grad`. On an image-text model that is the active
group's LoRA and, with `model.train_projector` (LLaVA's train.py leaves `mm_projector` trainable and saves
it as non_lora_trainables.bin), the projector's own weights (and an unfrozen vision tower's); their EMA is
written back with the LoRA's, so the checkpoint (trainable_base.safetensors) and a resume hold the blend.

Instruction grouping (reference `instruct/LoRASelect.py`): each task's instruction templates are compared
with every group's codebook by TF-IDF cosine. At or above the threshold the task retrains that group's
LoRA with DEMA; below it a new group opens with a new LoRA that starts from the latest trained adapter.
At test time each instance goes to its most similar group, or to the newest group below the threshold
(evaluation answers each route's instances together: eval_routes / activate_route).

Deviations, because CoIN's prompts are a fixed instruction while real instruction data mixes instruction
and instance (methods/common/grouping.py): by default a task's templates are what its prompts share
(`template: instruction`), not whole prompts, and a group's score is the mean of each template's best
codebook match (`aggregate: best_match`) rather than the mean over all pairs, which scores a task with
two templates well below 1 against its own group. `template: masked, aggregate: mean` is the reference's
rule. Two refinements of what a task shares, both so that CoIN's tasks group by their instruction as the
reference's per-dataset line rules do (ScienceQA; TextVQA, GQA, VizWiz, VQAv2, OCR-VQA; ImageNet;
Grounding):
- image placeholders are not template text (the reference's line rules never read the `<image>` line):
  it opens every image prompt of every task, so as a shared line it made image tasks alike and hid a
  one-line instruction's affix (Grounding's "Please provide the bounding box coordinate of the region
  this sentence describes: {}");
- a recurring line is instance text when its place in the prompts (its line index from the start or
  from the end) holds mostly lines that do not recur: OCR-VQA asks "Who wrote this book?" of many covers,
  but other covers get "Is this book related to Travel?" in the same place, so the question is not part
  of OCR-VQA's instruction (with it, OCR-VQA scored 0.83 against its VQA group and opened its own).
  ImageNet's one question, asked of every image, stays part of its instruction.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from retain.data.formats import Example
from retain.data.images import IMAGE_PLACEHOLDER
from retain.errors import RetainError
from retain.io import write_json_atomic
from retain.methods.base import MethodContext, RunSizes, StateItem, earlier_adapters
from retain.methods.common.ema import DynamicEMA
from retain.methods.common.grouping import (
    Aggregate,
    InstructionPatterns,
    TemplateMode,
    add_task,
    assign_group,
    copy_group,
    group_scores,
    masked_lines,
    new_group_entry,
    prompt_templates,
    route_instance,
    task_templates,
)
from retain.methods.common.routing import RoutedMethod
from retain.methods.common.sharding import DEEPSPEED_GRADIENTS
from retain.methods.registry import register
from retain.models.adapters import activate_adapters, add_adapter, trainable_parameters
from retain.models.embedder import Similarity, SimilarityName, build_similarity

if TYPE_CHECKING:
    from retain.data.streams import Task

logger = logging.getLogger(__name__)

CODEBOOK_FILE = "lcia_codebook.json"
FIRST_ADAPTER = "default"  # the adapter apply_finetuning creates: group 1
VARIANTS = {"coin": (2.0, 0.01), "continual_next": (0.01, 0.001)}  # (c, fallback alpha)
Variant = Literal["coin", "continual_next"]
# A line index (from the start or the end of the prompts) is an instruction's place when at least this
# share of the prompts that reach it hold a recurring line there; a little below 1 so that an instruction
# variant seen once in a small training set (CoIN-10Type's ten instructions) does not undo the place.
INSTRUCTION_PLACE_SHARE = 0.8


# --- what a task's prompts share, for grouping -------------------------------------------------------


def without_image_placeholders(examples: Sequence[Example]) -> list[Example]:
    """The examples with every `<image>` placeholder taken out of their user turns (blank lines dropped);
    examples without one are returned as they are."""
    out = []
    for example in examples:
        if not any(
            m.get("role") == "user" and IMAGE_PLACEHOLDER in m.get("content", "") for m in example.messages
        ):
            out.append(example)
            continue
        messages = [
            {**m, "content": _drop_placeholders(m["content"])} if m.get("role") == "user" else m
            for m in example.messages
        ]
        out.append(Example(messages, example.system, example.meta, list(example.images)))
    return out


def _drop_placeholders(text: str) -> str:
    lines = (line.replace(IMAGE_PLACEHOLDER, "").strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def instruction_places(examples: Sequence[Example], lines: Sequence[str]) -> set[str]:
    """The recurring `lines` that sit in an instruction's place in at least one prompt: a line index,
    counted from the start or from the end of each prompt and reached by at least half of the prompts, at
    which at least INSTRUCTION_PLACE_SHARE of the prompts that reach it hold one of `lines`. The others are
    instance text that happens to recur."""
    known = set(lines)
    turns = [masked_lines(e) for e in examples]
    placed: set[str] = set()
    for order in (1, -1):  # from the start, from the end
        depth = max((len(t) for t in turns), default=0)
        for index in range(depth):
            held = [t[::order][index] for t in turns if len(t) > index]
            if 2 * len(held) < len(turns):  # only the longest prompts reach it: it tells little
                continue
            recurring = [line for line in held if line in known]
            if len(recurring) >= INSTRUCTION_PLACE_SHARE * len(held):
                placed.update(recurring)
    return placed


def grouping_templates(
    examples: Sequence[Example], mode: str, limit: int, task: str = "task"
) -> tuple[list[str], InstructionPatterns]:
    """A task's templates and patterns (`task_templates`), on its prompts without image placeholders and,
    in the `instruction` mode, without the recurring lines that sit in an instance's place."""
    examples = without_image_placeholders(examples)
    templates, patterns = task_templates(examples, mode, limit, task)
    if mode != "instruction":
        return templates, patterns
    placed = instruction_places(examples, patterns.lines)
    dropped = [line for line in patterns.lines if line not in placed]
    if not dropped:
        return templates, patterns
    logger.info("lcia: task %s: recurring instance lines left out of its instruction: %s", task, dropped)
    patterns = InstructionPatterns([line for line in patterns.lines if line in placed], patterns.affixes)
    counts = Counter(patterns.template(e) for e in examples)
    templates = [t for t, _ in counts.most_common(limit)]
    if templates == [""]:
        logger.warning(
            "lcia: the prompts of task %s share only recurring instance lines, no instruction; it cannot be "
            "grouped with other tasks, and test prompts like its own go to the newest group",
            task,
        )
    return templates, patterns


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
    variant: Variant = field(
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
    similarity: SimilarityName = field(
        default="tfidf",
        metadata={"help": "template similarity: tfidf (reference) or minilm (offline embedder)"},
    )
    threshold: float = field(
        default=0.9, metadata={"help": "similarity at or above which a task reuses a group (reference: 0.9)"}
    )
    aggregate: Aggregate = field(
        default="best_match",
        metadata={
            "help": "group score from the (template, codebook entry) similarities: best_match (mean of each "
            "template's best entry), mean (of every pair, the reference) or max"
        },
    )
    template: TemplateMode = field(
        default="instruction",
        metadata={
            "help": "template of a prompt: instruction (the lines or affixes the task's prompts share; the "
            "instance text dropped), masked (the first user turn, numbers and quoted spans -> {}), "
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
        if not 0 <= self.threshold <= 1 or self.max_templates < 1:
            raise RetainError("config: lcia needs threshold in [0, 1] and max_templates >= 1")


# --- the method -----------------------------------------------------------------------------------------


@register("lcia", config=LCIAConfig)
class LCIA(RoutedMethod):
    """LCIA: dynamic-EMA LoRA training with instruction-grouped adapters and per-instance routing."""

    config: LCIAConfig
    export_refusal = "picks an adapter per prompt (by its instruction group)"
    refused_strategies = {
        "fsdp": "it adds a LoRA adapter for each new instruction group after the model is sharded, and an "
        "FSDP2 model is not sharded again (accelerate), so the new adapter would stay whole beside sharded "
        "ones; DEMA itself reads whole tensors (methods/common/sharding.py, tested on FSDP2 shards)",
        "deepspeed": DEEPSPEED_GRADIENTS,
    }

    def __init__(self, config: LCIAConfig | None = None) -> None:
        super().__init__(config or LCIAConfig())
        # {"adapter", "templates", "tasks", "patterns"}, in creation order; patterns: what the group's
        # tasks' prompts share (InstructionPatterns.to_dict()), used to template test instances
        self.groups: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []  # one record per trained task
        self.latest: str | None = None  # adapter trained last
        self.raw: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> pre-EMA weights (keep_raw only)
        self.ema: DynamicEMA | None = None
        self.params: dict[str, nn.Parameter] = {}  # the trainable tensors of the current task
        self.current: dict[str, Any] | None = None
        self._similarity: Similarity | None = None

    def state_estimate(self, sizes: RunSizes) -> list[StateItem]:
        items = [earlier_adapters(sizes, "adapters of the other instruction groups (at most one per task)")]
        if self.config.dema:
            items += [
                StateItem("DEMA: EMA copy of the trained tensors", sizes.trainable_params),
                StateItem("DEMA: previous step's gradient", sizes.trainable_params),
            ]
        if self.config.keep_raw:
            items.append(
                StateItem("raw (pre-EMA) adapters", sizes.tasks * sizes.trainable_params, on_device=False)
            )
        return items

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
        templates, patterns = grouping_templates(task.train, cfg.template, cfg.max_templates, task.name)
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
            self.groups.append(new_group_entry(name))
            index = len(self.groups) - 1
        group = self.groups[index]
        add_task(group, task.name, templates, patterns)
        activate_adapters(ctx.model, [group["adapter"]], [group["adapter"]])
        use_dema = cfg.dema and (not new_group or cfg.dema_on_new_group)
        self.ema = DynamicEMA(cfg.dema_c, cfg.fallback_alpha) if use_dema else None
        # Every trainable tensor, as the reference's loop over requires_grad parameters: the group's LoRA
        # and the base weights trained beside it (an image-text model's projector with train_projector).
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
        if use_dema:
            lora = sum("lora_" in name for name in self.params)
            self.current["dema_tensors"] = {"adapter": lora, "base": len(self.params) - lora}
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
        settings = {
            key: getattr(self.config, key) for key in ("similarity", "threshold", "aggregate", "template")
        }
        return {
            **settings,
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
        templates = prompt_templates(without_image_placeholders(task.test), self.config.template, self.groups)
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
        self.groups = [copy_group(g) for g in state.get("groups", [])]
        self.history = [dict(r) for r in state.get("history", [])]
        self.latest = state.get("latest")
        self.raw = {k: dict(v) for k, v in state.get("raw", {}).items()}
        self.ema, self.params, self.current = None, {}, None
