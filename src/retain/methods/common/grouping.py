"""Instruction grouping (LCIA, reference `instruct/LoRASelect.py`): a prompt's instruction template, one
score per group from a similarity matrix, and the rules that pick a group for a task and for a test
instance."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from retain.data.formats import Example

TemplateMode = Literal["masked", "first_line", "last_line", "full"]
Aggregate = Literal["mean", "max"]
TEMPLATE_MODES: tuple[str, ...] = get_args(TemplateMode)
AGGREGATES: tuple[str, ...] = get_args(Aggregate)

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
