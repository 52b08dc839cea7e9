"""How results are named and formatted in reports: metric labels and definitions, row labels, percentages.

Shared by the markdown, terminal and HTML reports so that every page says the same thing.
"""

from __future__ import annotations

import inspect

from retain.evaluation import metrics

METRIC_LABELS = {
    "last": "Last (final average accuracy)",
    "avg": "Avg (average incremental accuracy)",
    "bwt": "BWT (backward transfer)",
    "fwt": "FWT (forward transfer)",
    "forgetting": "Forgetting (max - last)",
    "plasticity": "Plasticity (New.ACC)",
}

_METRIC_FUNCTIONS = {
    "last": metrics.last_accuracy,
    "avg": metrics.average_incremental_accuracy,
    "bwt": metrics.backward_transfer,
    "fwt": metrics.forward_transfer,
    "forgetting": metrics.forgetting,
    "plasticity": metrics.plasticity,
}

# Transfers are differences: a sign makes a loss impossible to misread as a score.
SIGNED_METRICS = ("bwt", "fwt")


def metric_definition(name: str) -> str:
    """The definition of metric `name`, from its function's docstring (formula and source), on one line."""
    doc = inspect.getdoc(_METRIC_FUNCTIONS[name]) or ""
    return " ".join(doc.split())


def row_labels(results: dict) -> list[str]:
    """One label per accuracy-matrix row: "before", then "after task k: name" (or joint training)."""
    if results.get("joint"):
        return ["before", "after joint training"]
    return ["before"] + [f"after task {i}: {name}" for i, name in enumerate(results["tasks"], start=1)]


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal; "—" when not evaluated."""
    return "—" if value is None else f"{100 * value:.1f}"


def signed_percent(value: float | None) -> str:
    """A difference of fractions as a signed percentage; "n/a" when undefined."""
    return "n/a" if value is None else f"{100 * value:+.1f}"


def metric_value(name: str, value: float | None) -> str:
    """A metric in percent as reports show it: signed for transfers, "n/a" where undefined."""
    if name in SIGNED_METRICS:
        return signed_percent(value)
    return "n/a" if value is None else percent(value)
