"""`retain compare`: one markdown table of several runs (one row per run directory), sorted by a metric.

Every number comes from the runs' results.json files (metrics recomputed from each accuracy matrix, as
`retain metrics` does); wall time is the sum of the recorded model-load,
training and evaluation seconds, so a resumed run counts each task once.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from retain.errors import RetainError, did_you_mean
from retain.evaluation.metrics import METRIC_NAMES, compute_metrics
from retain.evaluation.report import load_matrix_file

# Higher is better for every metric but forgetting.
LOWER_IS_BETTER = {"forgetting"}
COLUMNS = ("last", "avg", "bwt", "fwt", "forgetting")
SORT_KEYS = (*METRIC_NAMES, "time", "name")


@dataclass
class RunSummary:
    """What one row shows."""

    name: str
    method: str
    metrics: dict[str, float | None]
    seconds: float | None
    tasks: int

    @classmethod
    def from_dir(cls, run_dir: str) -> RunSummary:
        path = os.path.join(run_dir, "results.json") if os.path.isdir(run_dir) else run_dir
        if not os.path.exists(path):
            raise RetainError(f"{run_dir}: no results.json; is it a finished retain run directory?")
        data = load_matrix_file(path)
        timings = data.get("timings") or {}
        parts = [
            float(v)
            for k, v in timings.items()
            if k == "model_load_s" or k.startswith(("train_s/", "eval_s/"))
            if isinstance(v, (int, float))
        ]
        name = os.path.basename(
            os.path.normpath(run_dir if os.path.isdir(run_dir) else os.path.dirname(path))
        )
        return cls(
            name=name,
            method=str(data.get("method", "?")),
            metrics=compute_metrics(data["matrix"], joint=bool(data.get("joint", False))),
            seconds=sum(parts) if parts else None,
            tasks=len(data["tasks"]),
        )


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def sort_runs(runs: list[RunSummary], key: str) -> list[RunSummary]:
    """Best first by `key`: a metric (forgetting ascending, others descending), time ascending, or name."""
    if key not in SORT_KEYS:
        raise RetainError(
            f"compare: cannot sort by '{key}'{did_you_mean(key, SORT_KEYS)}; use one of {SORT_KEYS}"
        )
    if key == "name":
        return sorted(runs, key=lambda r: r.name)
    if key == "time":
        return sorted(runs, key=lambda r: (r.seconds is None, r.seconds or 0.0))
    sign = 1.0 if key in LOWER_IS_BETTER else -1.0
    return sorted(runs, key=lambda r: (r.metrics.get(key) is None, sign * (r.metrics.get(key) or 0.0)))


def compare_markdown(run_dirs: list[str], sort: str = "last") -> str:
    """The comparison table as markdown, metrics in percent."""
    # A shell glob over a folder of runs also matches their log files: those are not runs, so skip them.
    skipped = [d for d in run_dirs if os.path.isfile(d) and not d.endswith(".json")]
    run_dirs = [d for d in run_dirs if d not in skipped]
    if skipped:
        print(
            f"compare: skipped {len(skipped)} file(s) that are not results.json: {', '.join(skipped)}",
            file=sys.stderr,
        )
    if not run_dirs:
        raise RetainError("compare: give at least one run directory")
    runs = sort_runs([RunSummary.from_dir(d) for d in run_dirs], sort)
    header = "| run | method | tasks | Last | Avg | BWT | FWT | Forgetting | wall time (s) |"
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in runs:
        metrics = [_cell(run.metrics.get(m), signed=m in ("bwt", "fwt")) for m in COLUMNS]
        seconds = "n/a" if run.seconds is None else f"{run.seconds:.0f}"
        lines.append(
            f"| {run.name} | {run.method} | {run.tasks} | " + " | ".join(metrics) + f" | {seconds} |"
        )
    order = "ascending" if sort in LOWER_IS_BETTER or sort in ("time", "name") else "descending"
    lines.append("")
    lines.append(f"Sorted by {sort} ({order}); metrics in %, from each run's results.json.")
    return "\n".join(lines) + "\n"
