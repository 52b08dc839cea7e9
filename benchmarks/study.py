"""The comparison study: every registered method on the same slice of real data, then one table.

Each method runs `retain run CONFIG method.name=<m> <settings> output_dir=<out>/<m>` in its own process
(a finished run is skipped, an interrupted one resumes), then `retain compare` builds the table from the
run directories and `benchmarks/RESULTS.md` is written with the exact command, the settings and the
table. Nothing in the table is typed by hand.

    .venv/bin/python benchmarks/study.py --benchmark-dir ../shared/data/easycl_benchmarks/benchmark
    .venv/bin/python benchmarks/study.py --methods sequential replay ewc --results /tmp/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _common import machine  # noqa: E402

from retain.evaluation.compare import compare_markdown  # noqa: E402
from retain.methods.registry import available  # noqa: E402

# Settings that keep every rehearsal method at the same memory budget as `replay` (20% of a task's 112
# training examples) and the generation-based ones within minutes on a CPU; everything else is default.
SETTINGS = {
    "replay": ["method.memory_size=24"],
    "gem": ["method.memory_size=24"],
    "agem": ["method.memory_size=24"],
    "lamol": ["method.memory_per_task=24"],
    "ssr": ["method.candidates_per_task=48", "method.memory_per_task=24", "method.n_clusters=8"],
    "pseudo_replay": ["method.memory_per_task=24"],
    "conpet": ["method.memory_per_task=24"],
    "abscl": ["method.memory_size=24"],
    "ilora": ["method.buffer_size=96"],
    "gere": ["method.num_samples=112"],
}


def run_method(config: str, method: str, out: str, extra: list[str]) -> tuple[list[str], float, int]:
    """Run one method (resuming if it was interrupted); return its command, seconds and exit code."""
    command = [
        os.path.join(os.path.dirname(sys.executable), "retain"),
        "run",
        config,
        f"method.name={method}",
        *SETTINGS.get(method, []),
        *extra,
        f"output_dir={os.path.join(out, method)}",
    ]
    if os.path.isfile(os.path.join(out, method, "results.json")):
        return command, 0.0, 0
    start = time.perf_counter()
    with open(os.path.join(out, f"{method}.log"), "w", encoding="utf-8") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    return command, time.perf_counter() - start, code


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
    parser.add_argument("--methods", nargs="*", help="default: every registered method")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "study_lnt"))
    parser.add_argument("--results", default=os.path.join(HERE, "RESULTS.md"))
    parser.add_argument("--sort", default="last")
    parser.add_argument("--note", default="", help="a sentence on how the runs were made (for RESULTS.md)")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = parser.parse_args()

    methods = args.methods or list(available())
    extra = ([f"benchmark_dir={args.benchmark_dir}"] if args.benchmark_dir else []) + args.overrides
    os.makedirs(args.out, exist_ok=True)
    done, failed = [], []
    for method in methods:
        command, seconds, code = run_method(args.config, method, args.out, extra)
        status = "ok" if code == 0 else f"FAILED (exit {code}, see {args.out}/{method}.log)"
        print(f"{method:14s} {seconds:7.0f} s  {status}", flush=True)
        (done if code == 0 else failed).append(method)
    run_dirs = [os.path.join(args.out, m) for m in done]
    table = compare_markdown(run_dirs, sort=args.sort)
    where = machine()
    first = json.load(open(os.path.join(run_dirs[0], "results.json"), encoding="utf-8")) if run_dirs else {}
    benchmark = first.get("benchmark", {})
    rel = os.path.relpath
    lines = [
        "# Comparison study: every method on a slice of real data",
        "",
        f"Benchmark {benchmark.get('name', '?')} ({benchmark.get('layout', '?')} layout), "
        f"{benchmark.get('order', '?')}, tasks {' -> '.join(benchmark.get('tasks', []))}; "
        f"{_sizes(first.get('train_sizes', {}))} training and {_sizes(first.get('test_sizes', {}))} test "
        f"examples per task; model {first.get('model', '?')} with LoRA; evaluation: "
        f"{_sizes(first.get('eval_mode', {}))}.",
        "",
        "Reproduce (each run resumes or is skipped when its results.json exists):",
        "",
        "```sh",
        " ".join(
            shlex.quote(p)
            for p in [".venv/bin/python", rel(__file__, ROOT), "--config", rel(args.config, ROOT)]
            + (["--benchmark-dir", args.benchmark_dir] if args.benchmark_dir else [])
            + ["--out", rel(args.out, ROOT), *args.overrides]
        ),
        "```",
        "",
        "which runs, per method, `retain run CONFIG method.name=<m> <settings> output_dir=<out>/<m>` "
        "with these per-method settings (same memory budget for rehearsal methods; all else default):",
        "",
        *[f"- `{m}`: `{' '.join(s)}`" for m, s in SETTINGS.items() if m in methods],
        "",
        "and then builds the table with:",
        "",
        "```sh",
        "retain compare " + " ".join(rel(d, ROOT) for d in run_dirs) + f" --sort {args.sort}",
        "```",
        "",
        table.rstrip("\n"),
        "",
        "Wall time is the sum of each run's recorded model-load, training and evaluation seconds, on "
        f"{where['cpu_count']} CPU cores (torch {where['torch']}, {where['torch_threads']} thread(s) per "
        "process); it includes any contention from other jobs on the machine during the run.",
        *(["", args.note] if args.note else []),
    ]
    checks = first.get("data_checks", {})
    if checks.get("findings") or checks.get("warnings"):
        lines += ["", "Data checks reported by the runs (the same for every method):", ""]
        lines += [f"- {w}" for w in checks.get("warnings", [])]
        lines += [f"- {f['task']}: {f['message']}" for f in checks.get("findings", [])]
    if failed:
        lines += ["", f"Failed runs (not in the table): {', '.join(failed)}."]
    with open(args.results, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print(table)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
