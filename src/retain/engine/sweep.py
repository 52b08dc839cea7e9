"""`retain sweep`: one config run over several methods x orders x seeds, then one summary with intervals.

Every combination is a normal run directory, run by `retain run` in its own process:

<parent>/                       default runs/<config>-sweep
  sweep_config.yaml             the config without its `sweep:` section (what each run reads)
  <method>/<order>/seed<k>/     one run directory (no <order>/ level when no orders are swept)
  <method>/<order>/seed<k>.log  that run's output
  summary.md, summary.json      the groups (mean ± std, 95% interval per metric), overlap notes, failures
  summary.html                  the same groups as retain compare's page (scatter, matrices, run links)

What to sweep comes from the command line or from a `sweep:` section of the config (the command line
wins):
  seeds:    N (N seeds: config.seed, config.seed + 1, ...) or a list [1, 2, 3] ("1,2,3" on the command line)
  orders:   benchmark order names [order1, order2]; for a task list, permutations of stream.tasks by
            0-based index, [2-0-1, 0-1-2] (or lists [[2, 0, 1]])
  methods:  method names [lwf, ewc]; in YAML an entry may be a mapping {name: ewc, lambda: 100, label: ewc100}
  parent, parallel: as --parent and --parallel

Runs go one after another, or `parallel` at a time with the CPU cores split between them
(OMP_NUM_THREADS). A run that fails is recorded with the tail of its output and the others go on.
Running the sweep again resumes: a finished run (results.json under the same settings) is skipped
without starting a process, an unfinished one resumes after its last completed task.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from retain.config import RunConfig, config_from_dict, method_label, read_yaml
from retain.data.benchmarks import benchmark_dir, find_benchmark, select_tasks
from retain.engine.run_dir import RunDir, resolved_params
from retain.errors import RetainError
from retain.evaluation.compare import (
    GroupSummary,
    Stats,
    check_sort,
    group_runs,
    groups_markdown,
    load_runs,
    overlap_notes,
)
from retain.evaluation.html_compare import render_compare_html
from retain.io import write_json_atomic, write_text_atomic
from retain.methods.registry import get_method_class

SWEEP_KEYS = ("seeds", "orders", "methods", "parent", "parallel")
PERMUTATION = re.compile(r"^\d+(-\d+)*$")
TAIL_LINES = 20


@dataclass
class SweepRun:
    """One combination: the `retain run` overrides that make it, and where it goes."""

    method: str
    order: str
    seed: int
    output_dir: str
    overrides: list[str]
    config: RunConfig = field(repr=False)

    @property
    def log_path(self) -> str:
        return self.output_dir.rstrip("/\\") + ".log"

    @property
    def label(self) -> str:
        return "/".join(p for p in (self.method, self.order, f"seed{self.seed}") if p)


@dataclass
class SweepPlan:
    config_path: str
    base: dict  # the config file without its sweep section
    overrides: list[str]  # the user's, given to every run
    parent: str
    parallel: int
    runs: list[SweepRun]

    @property
    def base_path(self) -> str:
        return os.path.join(self.parent, "sweep_config.yaml")


@dataclass
class Outcome:
    """How one run went: done (ran now), finished (skipped: done before) or failed."""

    run: SweepRun
    status: str
    seconds: float = 0.0
    returncode: int | None = None
    tail: str = ""


def read_sweep(path: str) -> tuple[dict, dict]:
    """The config file as (everything but `sweep:`, the `sweep:` section checked for known keys)."""
    raw = read_yaml(path)
    section = raw.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise RetainError(f"{path}: sweep must be a mapping (seeds, orders, methods, parent, parallel)")
    unknown = [k for k in section if k not in SWEEP_KEYS]
    if unknown:
        raise RetainError(f"{path}: unknown key 'sweep.{unknown[0]}'; known keys: {', '.join(SWEEP_KEYS)}")
    return raw, section


def _items(value: Any) -> list:
    """A command-line list (comma-separated text) or a YAML list as a list."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, list) else [value]


def parse_seeds(value: Any, first: int) -> list[int]:
    """`3` (or "3"): three seeds from `first` on; "1,2,3" or [1, 2, 3]: those seeds; None: [first]."""
    if value is None or value == "":
        return [first]
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        count = int(value)
        if count < 1:
            raise RetainError(
                f"sweep: seeds {value!r} must be a count of at least 1, or a list such as 1,2,3"
            )
        return [first + i for i in range(count)]
    seeds = []
    for item in _items(value):
        if isinstance(item, bool) or not str(item).strip().isdigit():
            raise RetainError(f"sweep: seed {item!r} is not a non-negative integer (seeds: N, or 1,2,3)")
        seeds.append(int(item))
    if len(set(seeds)) != len(seeds):
        raise RetainError(f"sweep: seeds {seeds} name a seed twice")
    return seeds


def _order_overrides(item: Any, base: RunConfig) -> tuple[str, list[str]]:
    """An order's folder label and the overrides that select it: a benchmark order name, or a
    permutation of stream.tasks (2-0-1 or [2, 0, 1])."""
    if isinstance(item, list) or (isinstance(item, (str, int)) and PERMUTATION.match(str(item))):
        indices = [int(i) for i in item] if isinstance(item, list) else [int(i) for i in str(item).split("-")]
        label = "-".join(str(i) for i in indices)
        tasks = base.stream.tasks
        if base.stream.benchmark:
            raise RetainError(
                f"sweep: order {label} is a permutation, but the stream is benchmark "
                f"{base.stream.benchmark}; give its order names (retain benchmarks lists them)"
            )
        if sorted(indices) != list(range(len(tasks))):
            raise RetainError(
                f"sweep: order {label} is not a permutation of the {len(tasks)} tasks' indices "
                f"0..{len(tasks) - 1} ({', '.join(t.name for t in tasks)})"
            )
        permuted = [dataclasses.asdict(tasks[i]) for i in indices]
        return label, ["stream.tasks=" + json.dumps(permuted)]
    name = str(item)
    if not base.stream.benchmark:
        raise RetainError(
            f"sweep: order '{name}' names a benchmark order, but the stream is a task list; give "
            f"permutations of its {len(base.stream.tasks)} tasks by index, e.g. "
            + "-".join(str(i) for i in reversed(range(len(base.stream.tasks))))
        )
    benchmark = find_benchmark(base.stream.benchmark, benchmark_dir(base.stream.benchmark_dir))
    select_tasks(benchmark, name, [], None)  # refuses an order the benchmark does not have
    return name, [f"stream.benchmark_order={name}"]


def _method_overrides(item: Any) -> tuple[str | None, list[str]]:
    """A method entry's label (None: from the config) and the override that selects it."""
    if isinstance(item, dict):
        entry = dict(item)
        label = entry.pop("label", None)
        if not entry.get("name"):
            raise RetainError(f"sweep: method entry {item!r} has no name")
        return (str(label) if label else None), ["method=" + json.dumps(entry)]
    return None, [f"method.name={item}"]


def plan_sweep(
    config_path: str,
    overrides: list[str] | None = None,
    *,
    seeds: Any = None,
    orders: Any = None,
    methods: Any = None,
    parent: str | None = None,
    parallel: int | None = None,
) -> SweepPlan:
    """Every (method, order, seed) combination as a run with its overrides and directory; each run's
    config is built and validated here, so a typo fails before anything starts. Arguments left None come
    from the config's `sweep:` section."""
    base, section = read_sweep(config_path)
    overrides = list(overrides or [])
    name = os.path.splitext(os.path.basename(config_path))[0] or "run"
    first = config_from_dict(base, source=config_path, overrides=overrides, name=name)
    seeds = section.get("seeds") if seeds is None else seeds
    orders = section.get("orders") if orders is None else orders
    methods = section.get("methods") if methods is None else methods
    parent = parent or section.get("parent") or os.path.join("runs", f"{name}-sweep")
    parallel = int(parallel or section.get("parallel") or 1)
    if parallel < 1:
        raise RetainError(f"sweep: parallel must be at least 1, got {parallel}")
    order_items = [_order_overrides(o, first) for o in _items(orders)] or [("", [])]
    method_items = [_method_overrides(m) for m in _items(methods)] or [(None, [])]
    runs: list[SweepRun] = []
    for method_label_given, method_args in method_items:
        for order, order_args in order_items:
            for seed in parse_seeds(seeds, first.seed):
                args = [*method_args, *overrides, *order_args, f"seed={seed}"]
                config = config_from_dict(base, source=config_path, overrides=args, name=name)
                method = method_label_given or method_label(config.method)
                folder = os.path.join(parent, method, order, f"seed{seed}") if order else None
                folder = folder or os.path.join(parent, method, f"seed{seed}")
                config.output_dir = folder
                runs.append(SweepRun(method, order, seed, folder, [*args, f"output_dir={folder}"], config))
    for method in {run.config.method.name for run in runs}:
        get_method_class(method)  # a misspelt name fails now; a method's settings are checked by its run
    seen: dict[str, SweepRun] = {}
    for run in runs:
        if run.output_dir in seen:
            raise RetainError(
                f"sweep: two runs would share {run.output_dir}; give the methods distinct labels "
                "(in the sweep section: {name: ..., label: ...})"
            )
        seen[run.output_dir] = run
    return SweepPlan(config_path, base, overrides, parent, parallel, runs)


def finished(run: SweepRun) -> bool:
    """Whether the run's directory holds its results under the same settings (so it can be skipped); a
    folder holding a run with other settings is refused, as `retain run` would."""
    if not os.path.isfile(os.path.join(run.output_dir, "results.json")):
        return False
    config = copy.deepcopy(run.config)
    # As make_plan does before the run's own check: config.yaml records every default of the method.
    config.method.params = resolved_params(dataclasses.asdict(config.method))
    RunDir(run.output_dir).check_resumable(config)
    return True


def _threads(parallel: int) -> int:
    """Threads per run: the cores split between the runs at once, at most OMP_NUM_THREADS when set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = max(1, cores // parallel)
    given = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(given)) if given.isdigit() and int(given) > 0 else threads


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return "".join(handle.readlines()[-lines:]).rstrip()
    except OSError:
        return ""


def run_sweep(plan: SweepPlan, echo: Callable[[str], None] = print, sort: str = "last") -> list[Outcome]:
    """Run every combination not finished yet, `plan.parallel` at a time; returns the outcomes in the
    plan's order. Writes sweep_config.yaml first and the summary (groups sorted by `sort`) at the end."""
    check_sort(sort)  # now, not after hours of runs
    os.makedirs(plan.parent, exist_ok=True)
    write_text_atomic(plan.base_path, yaml.safe_dump(plan.base, sort_keys=False))
    threads = str(_threads(plan.parallel))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    outcomes: dict[int, Outcome] = {}
    pending: list[int] = []
    for i, run in enumerate(plan.runs):
        try:
            done = finished(run)
        except RetainError as exc:
            outcomes[i] = Outcome(run, "failed", tail=f"error: {exc}")
            echo(f"[{run.label}] failed: {exc}")
            continue
        if done:
            outcomes[i] = Outcome(run, "finished")
            echo(f"[{run.label}] finished before: skipped")
        else:
            pending.append(i)
    active: dict[int, tuple[subprocess.Popen, float, Any]] = {}
    try:
        while pending or active:
            while pending and len(active) < plan.parallel:
                i = pending.pop(0)
                run = plan.runs[i]
                os.makedirs(os.path.dirname(os.path.abspath(run.log_path)), exist_ok=True)
                log = open(run.log_path, "a", encoding="utf-8")
                command = [sys.executable, "-m", "retain.cli", "run", plan.base_path, *run.overrides]
                log.write("$ " + " ".join(command) + "\n")
                log.flush()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                active[i] = (process, time.perf_counter(), log)
                echo(f"[{run.label}] started (log: {run.log_path})")
            time.sleep(0.2)
            for i, (process, start, log) in list(active.items()):
                if process.poll() is None:
                    continue
                log.close()
                del active[i]
                run, seconds = plan.runs[i], time.perf_counter() - start
                if process.returncode == 0:
                    outcomes[i] = Outcome(run, "done", seconds, 0)
                    echo(f"[{run.label}] done in {seconds:.0f} s")
                else:
                    outcomes[i] = Outcome(run, "failed", seconds, process.returncode, _tail(run.log_path))
                    echo(f"[{run.label}] failed (exit code {process.returncode}; log: {run.log_path})")
    finally:
        # Interrupted (Ctrl-C) or a bug here: stop the runs this sweep started; each resumes next time.
        for process, _, log in active.values():
            process.terminate()
            process.wait()
            log.close()
    result = [outcomes[i] for i in range(len(plan.runs))]
    write_summary(plan, result, sort)
    return result


def _stats_json(stats: Stats) -> dict:
    return dataclasses.asdict(stats)


def summary_groups(outcomes: list[Outcome]) -> list[GroupSummary]:
    """The finished runs grouped by setting (seeds of one method and order form a group)."""
    done = [o.run.output_dir for o in outcomes if o.status != "failed"]
    return group_runs(load_runs(done)) if done else []


def summary_data(plan: SweepPlan, outcomes: list[Outcome], groups: list[GroupSummary], sort: str) -> dict:
    """summary.json's content: the runs and how each went, the groups with per-metric Stats (fractions),
    and the interval notes for `sort`."""
    return {
        "config": plan.config_path,
        "parent": plan.parent,
        "overrides": plan.overrides,
        "runs": [
            {
                "method": o.run.method,
                "order": o.run.order,
                "seed": o.run.seed,
                "output_dir": o.run.output_dir,
                "status": o.status,
                "seconds": round(o.seconds, 1),
                "returncode": o.returncode,
                "log": o.run.log_path,
                "tail": o.tail,
            }
            for o in outcomes
        ],
        "groups": [
            {
                "name": g.name,
                "method": g.method,
                "n": g.n,
                "tasks": g.tasks,
                "members": [m.path for m in g.members],
                "differs": g.differs,
                "metrics": {k: _stats_json(s) for k, s in g.metrics.items()},
                "seconds": _stats_json(g.seconds),
            }
            for g in groups
        ],
        "notes": overlap_notes(groups, sort),
        "sort": sort,
    }


def summary_markdown(plan: SweepPlan, outcomes: list[Outcome], groups: list[GroupSummary], sort: str) -> str:
    """summary.md: what ran, the groups' table (retain compare's grouped table) and the failures."""
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "finished", "failed")}
    lines = [
        f"# Sweep of {plan.config_path}",
        "",
        f"{len(outcomes)} runs under {plan.parent}: {counts['done']} ran now, {counts['finished']} finished "
        f"before, {counts['failed']} failed.",
        "",
    ]
    if groups:
        lines.append(groups_markdown(groups, sort))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        lines += ["## Failed runs", ""]
        for o in failed:
            code = "" if o.returncode is None else f" (exit code {o.returncode})"
            lines += [f"### {o.run.label}{code}", "", f"log: {o.run.log_path}", "", "```", o.tail, "```", ""]
        lines.append("Fix the cause and run the same sweep again: finished runs are skipped.")
    return "\n".join(lines).rstrip() + "\n"


def write_summary(plan: SweepPlan, outcomes: list[Outcome], sort: str = "last") -> tuple[str, str]:
    """Write <parent>/summary.md, summary.json and summary.html (retain compare's page of the finished
    runs, linking each run's report.html); returns the first two paths."""
    md, js = os.path.join(plan.parent, "summary.md"), os.path.join(plan.parent, "summary.json")
    groups = summary_groups(outcomes)
    write_text_atomic(md, summary_markdown(plan, outcomes, groups, sort))
    write_json_atomic(js, summary_data(plan, outcomes, groups, sort))
    if groups:
        page = render_compare_html(groups, sort, base=plan.parent)
        write_text_atomic(os.path.join(plan.parent, "summary.html"), page)
    return md, js


def describe(plan: SweepPlan) -> str:
    """The --dry-run listing: each run, its folder and whether it is finished."""
    lines = [
        f"sweep of {plan.config_path}: {len(plan.runs)} runs under {plan.parent}, {plan.parallel} at a time "
        f"({_threads(plan.parallel)} thread(s) each)"
    ]
    for run in plan.runs:
        try:
            state = "finished (skipped)" if finished(run) else "to run"
        except RetainError as exc:
            state = f"refused: {exc}"
        lines.append(f"  {run.label:<40} {run.output_dir}  {state}")
    lines.append("dry run: nothing was run")
    return "\n".join(lines) + "\n"
