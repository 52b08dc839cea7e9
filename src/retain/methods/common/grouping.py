"""Instruction grouping (LCIA, reference `instruct/LoRASelect.py`): a prompt's instruction template, one
score per group from a similarity matrix, and the rules that pick a group for a task and for a test
instance.

CoIN's tasks come with a handful of instruction templates each ("Answer the question using a single word
or phrase."), so comparing templates compares tasks. Real instruction data mixes the instruction with
the instance (LLaMA-Factory joins instruction and input; EasyCL's COPA quotes the premise inside the
instruction), so the `instruction` mode first learns what a task's prompts share (`learn_instruction`):
the masked lines that recur across its instances, or, when no line recurs, the words every prompt starts
and ends with. A prompt's template keeps only those parts; the instance text is dropped. A test instance
is templated with the parts every trained group learned, so it is routed by its instruction alone.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np

from retain.data.formats import Example

logger = logging.getLogger(__name__)

TemplateMode = Literal["instruction", "masked", "first_line", "last_line", "full"]
Aggregate = Literal["best_match", "mean", "max"]
TEMPLATE_MODES: tuple[str, ...] = get_args(TemplateMode)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)

_QUOTED = re.compile(r"(?<!\w)'[^'\n]+'(?!\w)|\"[^\"\n]+\"|\u201c[^\u201d\n]+\u201d")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,:/]\d+)*")
_SPACES = re.compile(r"[ \t]+")


def _user_turn(example: Example) -> str:
    return next((m["content"] for m in example.messages if m.get("role") == "user"), "")


def _mask(line: str) -> str:
    return _SPACES.sub(" ", _NUMBER.sub("{}", _QUOTED.sub("{}", line))).strip()


def masked_lines(example: Example) -> list[str]:
    """The non-empty lines of the first user turn, quoted spans and numbers replaced by `{}`."""
    return [_mask(line) for line in _user_turn(example).splitlines() if line.strip()]


@dataclass
class InstructionPatterns:
    """What the prompts of a task share: recurring masked lines, and [prefix, suffix] word affixes of
    prompts in which no line recurs (lists, so the patterns are plain data in the method state)."""

    lines: list[str] = field(default_factory=list)
    affixes: list[list[str]] = field(default_factory=list)

    def template(self, example: Example) -> str:
        """The prompt's instruction: its lines that are known instruction lines, and its lines that carry
        a known affix (as `prefix {} suffix`); every other line is instance text and is dropped."""
        known = set(self.lines)
        kept = []
        for line in masked_lines(example):
            if line in known:
                kept.append(line)
                continue
            for prefix, suffix in self.affixes:
                if _carries(line, prefix, suffix):
                    kept.append(f"{prefix} {{}} {suffix}".strip())
                    break
        return "\n".join(kept)

    def merge(self, other: InstructionPatterns) -> None:
        self.lines += [line for line in other.lines if line not in self.lines]
        self.affixes += [a for a in other.affixes if a not in self.affixes]

    def to_dict(self) -> dict[str, Any]:
        return {"lines": list(self.lines), "affixes": [list(a) for a in self.affixes]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstructionPatterns:
        return cls(list(data.get("lines", [])), [list(a) for a in data.get("affixes", [])])


def _carries(line: str, prefix: str, suffix: str) -> bool:
    """Whether `line` is `prefix`, some instance text, then `suffix`."""
    return len(line) > len(prefix) + len(suffix) and line.startswith(prefix) and line.endswith(suffix)


def _common_words(lines: list[list[str]]) -> list[str]:
    """The longest run of words every line starts with."""
    common: list[str] = []
    for words in zip(*lines, strict=False):
        if any(w != words[0] for w in words):
            break
        common.append(words[0])
    return common


def learn_instruction(examples: Sequence[Example], min_share: float = 0.05) -> InstructionPatterns:
    """What a task's prompts share. A masked line is an instruction line when it occurs in at least two
    prompts and at least `min_share` of them (any line of a single prompt). Prompts with no such line
    contribute the words they all start and end with, so a one-line prompt that embeds its instance
    ("Classify: <text>") still yields "Classify: {}"."""
    turns = [masked_lines(e) for e in examples]
    if len(turns) == 1:
        return InstructionPatterns(lines=list(dict.fromkeys(turns[0])))
    counts = Counter(line for lines in turns for line in dict.fromkeys(lines))
    need = max(2, math.ceil(min_share * len(turns)))
    shared = [line for line, count in counts.items() if count >= need]
    known = set(shared)
    bare = [" ".join(lines).split() for lines in turns if lines and not known.intersection(lines)]
    affixes = []
    if len(bare) >= 2:
        prefix = _common_words(bare)
        rest = [words[len(prefix) :] for words in bare]
        suffix = _common_words([words[::-1] for words in rest])[::-1]
        if prefix or suffix:
            affixes.append([" ".join(prefix), " ".join(suffix)])
    return InstructionPatterns(lines=shared, affixes=affixes)


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


def task_templates(
    examples: Sequence[Example], mode: str, limit: int, task: str = "task"
) -> tuple[list[str], InstructionPatterns]:
    """The task's distinct templates, the `limit` most frequent first (ties: first seen), and what its
    prompts share (the `instruction` mode's patterns)."""
    patterns = learn_instruction(examples)
    if mode == "instruction":
        counts = Counter(patterns.template(e) for e in examples)
    else:
        counts = Counter(extract_template(e, mode) for e in examples)
    templates = [t for t, _ in counts.most_common(limit)]
    if mode == "instruction" and templates == [""]:
        logger.warning(
            "lcia: the prompts of task %s share no instruction (no recurring line, prefix or suffix); it "
            "cannot be grouped with other tasks, and test prompts like its own go to the newest group",
            task,
        )
    return templates, patterns


def new_group_entry(adapter: str) -> dict[str, Any]:
    """A group of the codebook: its adapter, templates, tasks and patterns (plain data, for the state)."""
    return {"adapter": adapter, "templates": [], "tasks": [], "patterns": InstructionPatterns().to_dict()}


def copy_group(group: dict[str, Any]) -> dict[str, Any]:
    """A group read back from a method state (states saved before patterns existed have none)."""
    return {
        "adapter": group["adapter"],
        "templates": list(group["templates"]),
        "tasks": list(group["tasks"]),
        "patterns": InstructionPatterns.from_dict(group.get("patterns", {})).to_dict(),
    }


def add_task(group: dict[str, Any], task: str, templates: list[str], patterns: InstructionPatterns) -> None:
    """Record that `task` trains `group`'s adapter: its templates and patterns join the group's."""
    group["templates"] += [t for t in templates if t not in group["templates"]]
    merged = InstructionPatterns.from_dict(group["patterns"])
    merged.merge(patterns)
    group["patterns"] = merged.to_dict()
    group["tasks"].append(task)


def prompt_templates(examples: Sequence[Example], mode: str, groups: list[dict[str, Any]]) -> list[str]:
    """The template of each test prompt; in the `instruction` mode, its parts that some group's tasks
    share (a test prompt alone cannot tell its instruction from its instance text)."""
    if mode != "instruction":
        return [extract_template(e, mode) for e in examples]
    known = InstructionPatterns()
    for group in groups:
        known.merge(InstructionPatterns.from_dict(group["patterns"]))
    return [known.template(e) for e in examples]


def group_scores(sims: np.ndarray, aggregate: str = "best_match") -> float:
    """One score from a (templates x codebook entries) similarity matrix.

    best_match: the mean over the templates of each one's best codebook entry, so a task with two
    templates (COPA's "cause" and "effect" questions) scores 1.0 against its own group; mean: the mean of
    every pair (the reference's rule; it scores such a task about 0.85 against itself); max.
    """
    if sims.size == 0:
        return 0.0
    if aggregate == "best_match":
        return float(sims.max(axis=1).mean())
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
