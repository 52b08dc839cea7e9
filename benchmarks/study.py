"""The comparison study: every method x 3 seeds on the same slice of real data, then one table.

The study is the `sweep:` section of examples/study_lnt.yaml, run by `retain sweep` (each run in its own
process; a finished run is skipped, an interrupted one resumes). This script adds two things around it:

- `--keep DIR` (default benchmarks/study_lnt/): each finished run's results.json and config.yaml are
  copied there, and copied back into the sweep's folder before it starts, so a study that takes longer
  than one machine session goes on where it stopped (the run folders themselves hold checkpoints and
  are not kept). The kept files are the data behind RESULTS.md.
- `benchmarks/RESULTS.md` is written from the kept runs: the groups' table (mean ± std and the 95%
  Student-t interval per metric), which method differences exceed their intervals, the per-method
  settings and the exact commands. Nothing in it is typed by hand.

    .venv/bin/python benchmarks/study.py --benchmark-dir ../shared/data/easycl_benchmarks/benchmark
    .venv/bin/python benchmarks/study.py --report-only         # RESULTS.md from the kept runs
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import machine  # noqa: E402

from retain.engine.sweep import plan_sweep, read_sweep, run_sweep  # noqa: E402
from retain.evaluation.compare import (  # noqa: E402
    COLUMNS,
    group_runs,
    groups_markdown,
    interval_pairs,
    load_runs,
    sort_groups,
)

KEPT_FILES = ("results.json", "config.yaml")
# The metrics whose interval comparisons RESULTS.md spells out.
NOTED_METRICS = ("last", "bwt")
# Matrices RESULTS.md shows side by side, as (title, left method, right method): whether reinforcement
# fine-tuning forgets less than supervised fine-tuning on the same stream (Lai et al., 2025).
SIDE_BY_SIDE = [("RFT next to SFT", "sequential", "rft")]


def kept_dir(keep: str, parent: str, run_dir: str) -> str:
    return os.path.join(keep, os.path.relpath(run_dir, parent))


def restore_kept(plan, keep: str) -> int:
    """Copy kept results back into run folders that lack them (so the sweep skips those runs)."""
    restored = 0
    for run in plan.runs:
        source = kept_dir(keep, plan.parent, run.output_dir)
        if os.path.isfile(os.path.join(source, "results.json")) and not os.path.isfile(
            os.path.join(run.output_dir, "results.json")
        ):
            os.makedirs(run.output_dir, exist_ok=True)
            for name in KEPT_FILES:
                shutil.copy2(os.path.join(source, name), os.path.join(run.output_dir, name))
            restored += 1
    return restored


def keep_finished(plan, keep: str) -> list[str]:
    """Copy each finished run's KEPT_FILES into `keep`; returns the kept run folders, in plan order."""
    kept = []
    for run in plan.runs:
        if not os.path.isfile(os.path.join(run.output_dir, "results.json")):
            continue
        target = kept_dir(keep, plan.parent, run.output_dir)
        os.makedirs(target, exist_ok=True)
        for name in KEPT_FILES:
            if os.path.abspath(os.path.join(run.output_dir, name)) != os.path.abspath(
                os.path.join(target, name)
            ):
                shutil.copy2(os.path.join(run.output_dir, name), os.path.join(target, name))
        kept.append(target)
    return kept


def apart_lines(groups, metric: str) -> list[str]:
    """The pairs of groups whose 95% intervals for `metric` do not overlap, best group first."""
    pairs = [(a, b) for a, b, overlap in interval_pairs(sort_groups(groups, metric), metric) if not overlap]
    total = len(interval_pairs(groups, metric))
    if not pairs:
        return [f"- {metric}: no pair of the {total} has intervals apart; no difference exceeds seed noise."]
    lines = [f"- {metric}: {len(pairs)} of {total} pairs have intervals apart:"]
    for a, b in pairs:
        ma, mb = a.metrics[metric], b.metrics[metric]
        lines.append(
            f"  - {a.name} ({100 * ma.mean:+.1f} [{100 * ma.low:+.1f}, {100 * ma.high:+.1f}]) vs {b.name} "
            f"({100 * mb.mean:+.1f} [{100 * mb.low:+.1f}, {100 * mb.high:+.1f}])"
        )
    return lines


def mean_matrix(runs) -> list[list[float | None]]:
    """The runs' accuracy matrices averaged cell by cell, in % (None where no run has the cell)."""
    rows = max(len(run.matrix) for run in runs)
    out = []
    for i in range(rows):
        cells = [run.matrix[i] for run in runs if i < len(run.matrix) and run.matrix[i] is not None]
        width = max((len(c) for c in cells), default=0)
        out.append(
            [
                100 * sum(c[j] for c in cells) / len(cells)
                if cells and all(c[j] is not None for c in cells)
                else None
                for j in range(width)
            ]
        )
    return out


def side_by_side_lines(groups, title: str, left: str, right: str) -> list[str]:
    """Two methods' mean matrices in one table, row by row (nothing unless both have runs)."""
    by_method = {g.method: g for g in groups}
    if left not in by_method or right not in by_method:
        return []
    one, two = by_method[left], by_method[right]
    tasks = one.members[0].task_names
    left_rows, right_rows = mean_matrix(one.members), mean_matrix(two.members)

    def cells(row) -> str:
        return " / ".join("-" if v is None else f"{v:.1f}" for v in row)

    lines = [
        f"## {title}",
        "",
        f"Mean accuracy (%) over {one.n} and {two.n} seed(s); row 0 is the model before training, row k "
        f"after task k. Tasks: {' / '.join(tasks)}.",
        "",
        f"| row | {left}: {' / '.join(tasks)} | {right}: {' / '.join(tasks)} |",
        "| ---: | --- | --- |",
    ]
    for i in range(max(len(left_rows), len(right_rows))):
        a = cells(left_rows[i]) if i < len(left_rows) else ""
        b = cells(right_rows[i]) if i < len(right_rows) else ""
        lines.append(f"| {i} | {a} | {b} |")

    def stat(value, sign: str) -> str:
        if value.mean is None:
            return "-"
        return f"{value.mean * 100:{sign}.1f}" + ("" if value.std is None else f" ± {value.std * 100:.1f}")

    for metric in NOTED_METRICS:
        sign = "+" if metric == "bwt" else ""
        lines.append(f"| {metric} | {stat(one.metrics[metric], sign)} | {stat(two.metrics[metric], sign)} |")
    return [*lines, ""]


def untimed_preparation_note(kept: list[str]) -> list[str]:
    """A sentence on the kept runs that predate `prepare_s/<k>` timings (a task's before_task and
    training_data hooks): their wall time leaves out that work, which is most of rft's and lamol's."""
    timed, untimed = set(), set()
    for folder in kept:
        with open(os.path.join(folder, "results.json"), encoding="utf-8") as handle:
            results = json.load(handle)
        timings = results.get("timings") or {}
        if any(k.startswith("prepare_s/") for k in timings):
            timed.add(str(results.get("method", "?")))
        elif any(k.startswith("train_s/") for k in timings):
            untimed.add(str(results.get("method", "?")))
    what = (
        "a task's preparation (the method's before_task and training_data hooks: rollout filters, "
        "pseudo-sample generation, decompositions, tokenising)"
    )
    without = "their wall time counts only the Trainer, after_task and evaluation"
    if not untimed:
        return []
    if not timed:
        return [f"These runs were recorded before {what} was timed, so {without}."]
    if len(untimed) <= len(timed):
        return [f"Runs of {', '.join(sorted(untimed))} were recorded before {what} was timed, so {without}."]
    return [
        f"Only the runs of {', '.join(sorted(timed))} count {what} in their wall time; the others were "
        f"recorded before it was timed, so {without}."
    ]


def method_settings(plan) -> list[str]:
    """`- name: key=value ...` for each method entry of the sweep that sets more than its name."""
    lines = []
    for item in read_sweep(plan.config_path)[1].get("methods", []) or []:
        if isinstance(item, dict) and len(item) > 1:
            settings = " ".join(f"{k}={v}" for k, v in item.items() if k not in ("name", "label"))
            lines.append(f"- `{item['name']}`: `{settings}`")
    return lines


def write_results(path: str, plan, kept: list[str], args) -> str:
    runs = load_runs(kept)
    groups = group_runs(runs)
    first = json.load(open(os.path.join(kept[0], "results.json"), encoding="utf-8"))
    benchmark = first.get("benchmark", {})
    seeds = sorted({run.seed for run in plan.runs})
    complete = [g for g in groups if g.n == len(seeds)]
    methods = sorted({run.method for run in plan.runs})
    missing = sorted({run.method for run in plan.runs} - {g.method for g in groups})
    where = machine()
    rel = os.path.relpath
    command = [".venv/bin/python", rel(__file__, ROOT)]
    command += ["--benchmark-dir", args.benchmark_dir] if args.benchmark_dir else []
    command += ["--parallel", str(args.parallel)]
    lines = [
        "# Comparison study: every method, 3 seeds, on a slice of real data",
        "",
        f"Benchmark {benchmark.get('name', '?')} ({benchmark.get('layout', '?')} layout), "
        f"{benchmark.get('order', '?')}, tasks {' -> '.join(benchmark.get('tasks', []))}; "
        f"{_sizes(first.get('train_sizes', {}))} training and {_sizes(first.get('test_sizes', {}))} test "
        f"examples per task; model {first.get('model', '?')} with LoRA; evaluation: "
        f"{_sizes(first.get('eval_mode', {}))}; seeds {', '.join(map(str, seeds))}.",
        "",
        f"**{len(kept)} of {len(plan.runs)} runs** are in ({len(complete)} of {len(methods)} methods "
        f"with all {len(seeds)} seeds)." + (f" Not run yet: {', '.join(missing)}." if missing else ""),
        "",
        "Reproduce (finished runs are skipped, an interrupted one resumes; the kept results.json and "
        f"config.yaml of every run are in `{rel(args.keep, ROOT)}/`):",
        "",
        "```sh",
        " ".join(shlex.quote(p) for p in command),
        "# which runs:",
        f"retain sweep {rel(plan.config_path, ROOT)} --parallel {args.parallel} "
        + " ".join(shlex.quote(o) for o in plan.overrides),
        "```",
        "",
        "Per-method settings (the sweep section of the config; rehearsal methods at replay's memory budget, "
        "everything else default):",
        "",
        *method_settings(plan),
        "",
        groups_markdown(groups, args.sort).rstrip("\n").replace(os.path.abspath(ROOT) + os.sep, ""),
        "",
        "## Which differences exceed seed noise",
        "",
        f"Two methods differ beyond seed noise when their 95% intervals over the {len(seeds)} seeds do not "
        "overlap (a conservative reading: with 3 seeds the t-interval is ±4.3 standard errors wide). No "
        "correction for the number of pairs is made: across a hundred or more pairs, one or two apart may "
        "be chance, so read a lone pair as a lead to rerun with more seeds, not as a ranking.",
        "",
        *[line for metric in NOTED_METRICS for line in apart_lines(complete, metric)],
        "",
        *[line for spec in SIDE_BY_SIDE for line in side_by_side_lines(groups, *spec)],
        "Wall time is the mean over seeds of each run's recorded model-load, training and evaluation "
        f"seconds, on {where['cpu_count']} CPU cores (torch {where['torch']}), "
        f"{args.parallel} run(s) at a time with {max(1, (where['cpu_count'] or 1) // args.parallel)} "
        "thread(s) each; it includes contention from other jobs on the machine and the time a run was "
        "paused (SIGSTOP) while the test suite was timed, so it does not rank methods.",
        *untimed_preparation_note(kept),
        *(["", args.note] if args.note else []),
    ]
    checks = first.get("data_checks", {})
    if checks.get("findings") or checks.get("warnings"):
        lines += ["", "Data checks reported by the runs (the same for every method):", ""]
        lines += [f"- {w}" for w in checks.get("warnings", [])]
        lines += [f"- {f['task']}: {f['message']}" for f in checks.get("findings", [])]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    return path


def _sizes(per_task: dict) -> str:
    """'112' when every task has the same value, else 'task: value, ...'."""
    values = set(map(str, per_task.values()))
    if len(values) == 1:
        return values.pop()
    return ", ".join(f"{task}: {value}" for task, value in per_task.items())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=os.path.join(ROOT, "examples", "study_lnt.yaml"))
    parser.add_argument("--benchmark-dir", default=os.environ.get("RETAIN_BENCHMARK_DIR", ""))
    parser.add_argument("--parent", default=os.path.join(ROOT, "runs", "study_lnt-sweep"))
    parser.add_argument("--keep", default=os.path.join(HERE, "study_lnt"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--sort", default="last", choices=COLUMNS)
    parser.add_argument("--report-only", action="store_true", help="write RESULTS.md from the kept runs")
    parser.add_argument("--note", default="", help="a sentence on how the runs were made (for RESULTS.md)")
    args = parser.parse_args()

    overrides = [f"benchmark_dir={args.benchmark_dir}"] if args.benchmark_dir else []
    plan = plan_sweep(args.config, overrides, parent=args.parent, parallel=args.parallel)
    restored = restore_kept(plan, args.keep)
    if restored:
        print(f"restored {restored} finished run(s) from {args.keep}")
    if not args.report_only:
        run_sweep(plan, sort=args.sort)
    kept = keep_finished(plan, args.keep)
    if not kept:
        raise SystemExit(f"no finished run under {args.parent} or {args.keep}: nothing to report")
    print(f"wrote {write_results(args.results, plan, kept, args)}")


if __name__ == "__main__":
    main()
