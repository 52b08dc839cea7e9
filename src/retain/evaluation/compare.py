"""`retain compare`: one markdown table of several runs, sorted by a metric; runs that are seeds of one
setting are grouped as mean ± std with a 95% interval.

Every number comes from the runs' results.json files (metrics recomputed from each accuracy matrix, as
`retain metrics` does); wall time is the sum of the recorded model-load,
training and evaluation seconds, so a resumed run counts each task once.

Two runs share a setting when their config.yaml files are equal once `seed` and `output_dir` are left
out. A group's spread is the sample standard deviation (n - 1) and its 95% interval is the Student-t
interval mean ± t(0.975, n - 1) · std / sqrt(n). `group_runs` returns plain data that the markdown here
and the HTML page both render.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from retain.config import RunConfig, config_to_dict
from retain.errors import RetainError, did_you_mean
from retain.evaluation.metrics import METRIC_NAMES, compute_metrics
from retain.evaluation.report import load_matrix_file

# Higher is better for every metric but forgetting.
LOWER_IS_BETTER = {"forgetting"}
COLUMNS = ("last", "avg", "bwt", "fwt", "forgetting")
SORT_KEYS = (*METRIC_NAMES, "time", "name")
SIGNED = ("bwt", "fwt")
# Config keys that tell seeds of one setting apart rather than define the setting.
SEED_KEYS = ("seed", "output_dir")
# Two-sided 95% critical values of Student's t, t(0.975, dof) for dof = 1..30 (NIST/SEMATECH
# e-Handbook of Statistical Methods, table 1.3.6.7.2; equal to scipy.stats.t.ppf(0.975, dof) to 4 places).
T_975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
Z_975 = 1.959963984540054
# Keys tried first when naming groups: what a sweep varies.
NAME_KEYS = ("method.name", "stream.benchmark_order", "stream.tasks")


def t_critical(dof: int) -> float:
    """t(0.975, dof): the table up to 30 degrees of freedom, beyond it the Cornish-Fisher expansion
    around the normal quantile (within 1e-4 of the exact value from 30 on)."""
    if dof < 1:
        raise ValueError(f"t_critical: dof must be at least 1, got {dof}")
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = Z_975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


@dataclass
class Stats:
    """One metric over a group's runs (fractions, as in RunSummary.metrics); runs without a value are
    left out of n. std and the interval are None below 2 values."""

    n: int
    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    values: list[float]

    @classmethod
    def of(cls, values: list[float | None]) -> Stats:
        """Mean, sample std (n - 1) and the 95% Student-t interval of the values that are not None."""
        xs = [float(v) for v in values if v is not None]
        n = len(xs)
        if n == 0:
            return cls(0, None, None, None, None, [])
        mean = sum(xs) / n
        if n == 1:
            return cls(1, mean, None, None, None, xs)
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_critical(n - 1) * std / math.sqrt(n)
        return cls(n, mean, std, mean - half, mean + half, xs)

    def overlaps(self, other: Stats) -> bool | None:
        """Whether the two 95% intervals overlap; None when either has no interval."""
        if None in (self.low, self.high, other.low, other.high):
            return None
        return self.low <= other.high and other.low <= self.high  # type: ignore[operator]


@dataclass
class RunSummary:
    """What one row shows."""

    name: str
    method: str
    metrics: dict[str, float | None]
    seconds: float | None
    tasks: int
    path: str = ""
    seed: int | None = None
    # config.yaml minus SEED_KEYS, flattened (None: the run has no config.yaml, so it groups with none).
    setting: dict[str, Any] | None = None
    matrix: list = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)

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
            if k == "model_load_s" or k.startswith(("prepare_s/", "train_s/", "eval_s/"))
            if isinstance(v, (int, float))
        ]
        folder = run_dir if os.path.isdir(run_dir) else os.path.dirname(path)
        config = _read_config(os.path.join(folder, "config.yaml"))
        return cls(
            name=os.path.basename(os.path.normpath(folder)),
            method=str(data.get("method", "?")),
            metrics=compute_metrics(data["matrix"], joint=bool(data.get("joint", False))),
            seconds=sum(parts) if parts else None,
            tasks=len(data["tasks"]),
            path=run_dir,
            seed=config.get("seed") if config else None,
            setting=setting_of(config) if config else None,
            matrix=data["matrix"],
            task_names=list(data["tasks"]),
        )


def _read_config(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise RetainError(f"{path}: invalid YAML ({exc}); is it a retain run's config.yaml?") from None
    return data if isinstance(data, dict) else None


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_DEFAULTS = _flatten(config_to_dict(RunConfig()))


def setting_of(config: dict) -> dict[str, Any]:
    """A run's setting: its config flattened to dotted keys, without the keys that tell seeds apart. A
    setting its config.yaml lacks (written before the setting existed) counts at its default, as a resume
    counts it, so runs made before and after a new setting was added still group together."""
    flat = _flatten(config)
    for key, value in _DEFAULTS.items():
        flat.setdefault(key, value)
    return {k: v for k, v in flat.items() if k not in SEED_KEYS}


def _setting_key(run: RunSummary) -> str:
    if run.setting is None:
        return f"run:{os.path.abspath(run.path or run.name)}"  # no config.yaml: a group of its own
    return json.dumps(run.setting, sort_keys=True, default=str)


@dataclass
class GroupSummary:
    """Runs of one setting (seeds): per-metric Stats, named by the config values that set it apart."""

    name: str
    method: str
    members: list[RunSummary]
    metrics: dict[str, Stats]
    seconds: Stats
    tasks: int
    differs: dict[str, Any] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.members)


def _short(key: str, value: Any) -> str:
    """A config value as a group name part: task lists by their task names, method by its name."""
    if key == "stream.tasks" and isinstance(value, list):
        text = ">".join(str(t.get("name", "?")) if isinstance(t, dict) else str(t) for t in value)
    else:
        text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else str(value)
    text = text if len(text) <= 40 else text[:37] + "..."
    return text if key in NAME_KEYS[:2] else f"{key.rsplit('.', 1)[-1]}={text}"


def _value(setting: dict[str, Any], key: str) -> str:
    return json.dumps(setting.get(key), sort_keys=True, default=str)


def _name_keys(settings: list[dict[str, Any]]) -> list[str]:
    """The fewest config keys (sweep keys first) whose values tell every pair of settings apart."""
    differing = [k for k in sorted(set().union(*settings)) if len({_value(s, k) for s in settings}) > 1]
    ordered = [k for k in NAME_KEYS if k in differing] + [k for k in differing if k not in NAME_KEYS]
    chosen: list[str] = []
    for key in ordered:
        labels = {tuple(_value(s, k) for k in chosen) for s in settings}
        if len(labels) == len(settings):
            break
        if len({tuple(_value(s, k) for k in [*chosen, key]) for s in settings}) > len(labels):
            chosen.append(key)
    return chosen


def group_runs(runs: list[RunSummary]) -> list[GroupSummary]:
    """Runs grouped by setting, in order of first appearance."""
    by_key: dict[str, list[RunSummary]] = {}
    for run in runs:
        by_key.setdefault(_setting_key(run), []).append(run)
    members = list(by_key.values())
    settings = [m[0].setting for m in members if m[0].setting is not None]
    keys = _name_keys(settings) if len(settings) > 1 else []
    groups = []
    for group in members:
        first = group[0]
        if first.setting is None:
            name, differs = first.name, {}
        else:
            differs = {k: first.setting.get(k) for k in keys}
            name = ", ".join(_short(k, v) for k, v in differs.items()) or first.method
        groups.append(
            GroupSummary(
                name=name,
                method=first.method,
                members=group,
                metrics={m: Stats.of([r.metrics.get(m) for r in group]) for m in METRIC_NAMES},
                seconds=Stats.of([r.seconds for r in group]),
                tasks=first.tasks,
                differs=differs,
            )
        )
    return groups


def check_sort(key: str) -> None:
    """Refuse a sort key that is not a metric, time or name (with a did-you-mean)."""
    if key not in SORT_KEYS:
        raise RetainError(
            f"compare: cannot sort by '{key}'{did_you_mean(key, SORT_KEYS)}; use one of {SORT_KEYS}"
        )


def _order(values: list[tuple[Any, str, float | None]], key: str) -> list[Any]:
    """Items of (item, name, number) best first: by name, time ascending, or the metric."""
    if key == "name":
        return [v[0] for v in sorted(values, key=lambda v: v[1])]
    sign = 1.0 if key in LOWER_IS_BETTER or key == "time" else -1.0
    return [v[0] for v in sorted(values, key=lambda v: (v[2] is None, sign * (v[2] or 0.0)))]


def sort_runs(runs: list[RunSummary], key: str) -> list[RunSummary]:
    """Best first by `key`: a metric (forgetting ascending, others descending), time ascending, or name."""
    check_sort(key)
    number = (lambda r: r.seconds) if key == "time" else (lambda r: r.metrics.get(key))
    return _order([(r, r.name, number(r)) for r in runs], key)


def sort_groups(groups: list[GroupSummary], key: str) -> list[GroupSummary]:
    """Best first by the groups' means, as sort_runs orders runs."""
    check_sort(key)
    stats = (lambda g: g.seconds) if key == "time" else (lambda g: g.metrics[key])
    return _order([(g, g.name, stats(g).mean) for g in groups], key)


MAX_PAIR_LINES = 6


def interval_pairs(groups: list[GroupSummary], metric: str) -> list[tuple[GroupSummary, GroupSummary, bool]]:
    """(a, b, overlap) for every pair of groups that both have a 95% interval for `metric`, in the
    groups' order."""
    pairs = []
    for a, b in itertools.combinations(groups, 2):
        overlap = a.metrics[metric].overlaps(b.metrics[metric])
        if overlap is not None:
            pairs.append((a, b, overlap))
    return pairs


def overlap_notes(groups: list[GroupSummary], metric: str) -> list[str]:
    """One line per pair of groups whose 95% intervals for `metric` overlap (one line counting them when
    there are more than MAX_PAIR_LINES), and one naming the pairs whose intervals do not (differences
    beyond seed noise)."""
    if metric not in METRIC_NAMES:
        return []
    pairs = interval_pairs(groups, metric)
    overlapping = [(a, b) for a, b, overlap in pairs if overlap]
    if len(overlapping) > MAX_PAIR_LINES:
        # A study of 25 methods has 300 pairs: name the few that stand apart, count the rest.
        notes = [
            f"{len(overlapping)} of {len(pairs)} pairs: intervals overlap; those differences are within "
            "seed noise"
        ]
    else:
        notes = [
            f"{a.name} and {b.name}: intervals overlap; the difference is within seed noise"
            for a, b in overlapping
        ]
    apart = [f"{a.name} vs {b.name}" for a, b, overlap in pairs if not overlap]
    if apart:
        notes.append(f"intervals apart (the difference exceeds seed noise): {'; '.join(apart)}")
    return notes


def format_stats(stats: Stats, signed: bool = False) -> str:
    """In percent: `45.2 ± 3.1 [38.0, 52.4]`, the value alone for one run, `n/a` for none."""
    if stats.mean is None:
        return "n/a"
    if stats.std is None:
        return _cell(stats.mean, signed)
    return (
        f"{_cell(stats.mean, signed)} ± {100 * stats.std:.1f} "
        f"[{_cell(stats.low, signed)}, {_cell(stats.high, signed)}]"
    )


def _cell(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def load_runs(run_dirs: list[str]) -> list[RunSummary]:
    """RunSummary of each run directory (or results.json); other files (a glob's log files) are skipped
    with a note on stderr."""
    skipped = [d for d in run_dirs if os.path.isfile(d) and not d.endswith(".json")]
    run_dirs = [d for d in run_dirs if d not in skipped]
    if skipped:
        print(
            f"compare: skipped {len(skipped)} file(s) that are not results.json: {', '.join(skipped)}",
            file=sys.stderr,
        )
    if not run_dirs:
        raise RetainError("compare: give at least one run directory")
    runs = [RunSummary.from_dir(d) for d in run_dirs]
    if len({r.name for r in runs}) < len(runs):
        # Folder names repeat (a sweep's <method>/seed42): name each run by its path below the common folder.
        folders = [os.path.abspath(d if os.path.isdir(d) else os.path.dirname(d)) for d in run_dirs]
        common = os.path.commonpath(folders)
        for run, folder in zip(runs, folders, strict=True):
            run.name = os.path.relpath(folder, os.path.dirname(common) if folder == common else common)
    return runs


def _footer(sort: str) -> str:
    order = "ascending" if sort in LOWER_IS_BETTER or sort in ("time", "name") else "descending"
    return f"Sorted by {sort} ({order}); metrics in %, from each run's results.json."


def runs_markdown(runs: list[RunSummary], sort: str = "last") -> str:
    """One row per run."""
    header = "| run | method | tasks | Last | Avg | BWT | FWT | Forgetting | wall time (s) |"
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for run in sort_runs(runs, sort):
        metrics = [_cell(run.metrics.get(m), signed=m in SIGNED) for m in COLUMNS]
        seconds = "n/a" if run.seconds is None else f"{run.seconds:.0f}"
        lines.append(
            f"| {run.name} | {run.method} | {run.tasks} | " + " | ".join(metrics) + f" | {seconds} |"
        )
    return "\n".join([*lines, "", _footer(sort)]) + "\n"


def groups_markdown(groups: list[GroupSummary], sort: str = "last") -> str:
    """One row per group: mean ± std [95% interval] per metric, the members, the overlap notes."""
    groups = sort_groups(groups, sort)
    header = "| setting | method | runs | tasks | Last | Avg | BWT | FWT | Forgetting | wall time (s) |"
    lines = [header, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for group in groups:
        metrics = [format_stats(group.metrics[m], signed=m in SIGNED) for m in COLUMNS]
        seconds = "n/a" if group.seconds.mean is None else f"{group.seconds.mean:.0f}"
        lines.append(
            f"| {group.name} | {group.method} | {group.n} | {group.tasks} | "
            + " | ".join(metrics)
            + f" | {seconds} |"
        )
    lines += ["", "Runs:"]
    for group in groups:
        seeds = ", ".join(m.path or m.name for m in group.members)
        lines.append(f"- {group.name}: {seeds}")
    notes = overlap_notes(groups, sort)
    if notes:
        lines += ["", f"95% intervals of {sort}:", *[f"- {note}" for note in notes]]
    lines += [
        "",
        _footer(sort),
        "Groups: runs whose config.yaml differ only in seed and output_dir; mean ± sample std "
        "[95% Student-t interval] over the group's runs; one run shows its value alone.",
    ]
    return "\n".join(lines) + "\n"


def compare_markdown(run_dirs: list[str], sort: str = "last", group: bool | None = None) -> str:
    """The comparison table as markdown, metrics in percent: one row per run, or per group of seeds
    when `group` is True (None: when two runs share a setting)."""
    check_sort(sort)
    runs = load_runs(run_dirs)
    groups = group_runs(runs)
    if group is None:
        group = any(g.n > 1 for g in groups)
    return groups_markdown(groups, sort) if group else runs_markdown(runs, sort)
