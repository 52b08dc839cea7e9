"""Built-in benchmark definitions: EasyCL's benchmark_info.json layout, O-LoRA's CL_Benchmark, TRACE and
CoIN (image-text).

`find_benchmark(name, root)` returns the definition (orders, expected files); `select_tasks` resolves an
order and a slice of it; `benchmark_tasks` checks every selected task's files and reports all missing
ones at once, before anything trains. Each layout is one module with a `make_benchmark(name, root)` that
returns None for names it does not know; a new layout is one more module in `LAYOUTS`.
"""

from __future__ import annotations

import os

from retain.data.benchmarks import coin, easycl, olora, trace
from retain.data.benchmarks.base import Benchmark, BenchmarkTask, infer_labels, options_in
from retain.errors import RetainError, did_you_mean

LAYOUTS = (easycl, olora, trace, coin)
BUILTIN = (*easycl.BUILTIN_ORDERS, "olora", "TRACE", "CoIN")
BENCHMARK_DIR_ENV = "RETAIN_BENCHMARK_DIR"

__all__ = [
    "BUILTIN",
    "Benchmark",
    "BenchmarkTask",
    "benchmark_dir",
    "benchmark_tasks",
    "builtin_benchmarks",
    "find_benchmark",
    "infer_labels",
    "options_in",
    "select_tasks",
]


def benchmark_dir(configured: str) -> str:
    """The benchmark data folder: the config's benchmark_dir, else $RETAIN_BENCHMARK_DIR, else ''."""
    return configured or os.environ.get(BENCHMARK_DIR_ENV, "")


def find_benchmark(name: str, root: str) -> Benchmark:
    """The benchmark called `name` (built in, or an EasyCL benchmark_info.json under root)."""
    for layout in LAYOUTS:
        found = layout.make_benchmark(name, root or None)
        if found is not None:
            return found
    raise RetainError(
        f"config: unknown benchmark '{name}'{did_you_mean(name, BUILTIN)}; built in: {', '.join(BUILTIN)}"
        " (`retain benchmarks` lists them), or put an EasyCL-style <name>/benchmark_info.json under "
        "benchmark_dir"
    )


def builtin_benchmarks(root: str = "") -> list[Benchmark]:
    return [find_benchmark(name, root) for name in BUILTIN]


def select_tasks(benchmark: Benchmark, order: str, names: list[str], max_tasks: int | None) -> list[str]:
    """The task names to run: `order` (default: the first), restricted to `names` when given (kept in the
    order's sequence), then cut to the first `max_tasks`."""
    order = order or next(iter(benchmark.orders))
    if order not in benchmark.orders:
        raise RetainError(
            f"config: benchmark {benchmark.name} has no order '{order}'"
            f"{did_you_mean(order, benchmark.orders)}; its orders: {', '.join(benchmark.orders)}"
        )
    sequence = benchmark.orders[order]
    if names:
        unknown = [n for n in names if n not in sequence]
        if unknown:
            raise RetainError(
                f"config: stream.tasks {unknown} not in {benchmark.name} {order}"
                f"{did_you_mean(unknown[0], sequence)}; its tasks: {', '.join(sequence)}. With a benchmark, "
                "stream.tasks picks tasks of it by name: override it (tasks=[] runs them all)"
            )
        sequence = [n for n in sequence if n in names]
    return sequence[:max_tasks] if max_tasks else list(sequence)


def benchmark_tasks(
    benchmark: Benchmark, root: str, names: list[str], allow_missing: bool, image_dir: str = ""
) -> tuple[list[BenchmarkTask], list[str]]:
    """The selected tasks whose files exist, and one warning per task dropped for missing files.

    Without allow_missing, any missing file is a RetainError listing every task and file that is missing.
    """
    if not root:
        raise RetainError(
            f"config: benchmark {benchmark.name} needs benchmark_dir (or ${BENCHMARK_DIR_ENV}): the folder "
            f"holding {benchmark.expected}"
        )
    if not os.path.isdir(root):
        raise RetainError(
            f"config: benchmark_dir {root} is not a folder; it should hold {benchmark.expected}"
        )
    located = (
        benchmark.locate(root, image_dir=image_dir or None)
        if benchmark.reads_images
        else benchmark.locate(root)
    )
    missing: dict[str, list[str]] = {}
    for name in names:
        task = located.get(name)
        missing_files = task.missing() if task else [f"no entry for '{name}' under {root}"]
        if missing_files:
            missing[name] = missing_files
    if missing and not allow_missing:
        lines = "; ".join(f"{name}: {', '.join(files)}" for name, files in missing.items())
        raise RetainError(
            f"benchmark {benchmark.name}: {len(missing)} of {len(names)} task(s) miss files: {lines}. "
            f"Each task needs {'/'.join(next(iter(located.values())).required) if located else 'its'} "
            f"files ({benchmark.expected} under {root}). Add them, choose other tasks (tasks=[...] or "
            "max_tasks=N), or set allow_missing=true to drop these tasks"
        )
    warnings = [
        f"task {name} dropped (allow_missing): missing {', '.join(files)}" for name, files in missing.items()
    ]
    kept = [located[name] for name in names if name not in missing]
    if not kept:
        raise RetainError(f"benchmark {benchmark.name}: every selected task misses files; nothing to run")
    return kept, warnings
