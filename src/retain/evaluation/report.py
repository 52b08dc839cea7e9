"""Results of a run: the versioned `results.json`, a terminal table, a markdown report and a heatmap.

`results.json` schema, version 1 (`RESULTS_SCHEMA_VERSION`); other tools may rely on these keys:

- `schema_version` (int): 1. Bumped when a key changes meaning or is removed; adding keys keeps it.
- `tasks` (list[str]): the T task names, in stream order; column j of the matrix is `tasks[j]`.
- `matrix` (list[list[float] | null]): the accuracy matrix R, T + 1 rows of T scores in [0, 1];
  `matrix[i][j]` is the score on `tasks[j]` after training the i-th task, row 0 is the model before any
  training, and a row not evaluated yet (a partial run) is null. For a joint run, 2 rows: before and
  after training on all tasks at once.
- `joint` (bool): true when `matrix` comes from joint (multitask) training, the upper bound.
- `metrics` (dict[str, float | null]): `last`, `avg`, `bwt`, `fwt`, `forgetting`, `plasticity` as
  defined in `retain.evaluation.metrics`, as fractions (not percentages); null where undefined (BWT with
  one task, rows not evaluated yet, or anything but last/avg for a joint run).
- `method` (str): the continual-learning method's registered name.
- `timings` (dict): wall-clock seconds, e.g. `{"train": [..per task..], "eval": [...], "total": s}`;
  free-form, written as given.
- any keys of `extra` (e.g. `config`, `versions`, `seed`), at the top level, written as given. A run
  writes `method_params` (every setting of the method as it ran, defaults included; a combination
  lists its further components under `plus`), `task_id_at_test` (bool: the method was told each test
  prompt's task), `eval_mode` (task -> "generate" | "rank"), `data_checks` ({"warnings": [str], "findings":
  [{"task", "check", "count", "message"}]}) and, for a benchmark run, `benchmark` ({"name", "layout",
  "order", "dir", "tasks"}), and `provenance` ({"retain", "git": {"commit", "dirty"} | null, "python",
  "platform", "packages", "hardware": {"cpu", "cpu_cores", "gpus", "gpu_count", "cuda", "bf16"}}: what
  produced the file).
- `general` (only with `stream.eval_only`): the eval-only tasks, scored in every row but never trained,
  kept out of `tasks`/`matrix`/`metrics` so those keep their meaning: `{"tasks": [G names], "matrix":
  [T + 1 rows of G scores, or null], "metrics": general_retention(matrix) (per task and mean: before,
  last, drop = before - last, worst, worst_row, max_drop; see retain.evaluation.metrics),
  "test_sizes": {task: n}, "eval_mode": {task: "generate" | "rank"}}`.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from retain.errors import RetainError
from retain.evaluation.html_report import write_html_report
from retain.evaluation.labels import METRIC_LABELS, metric_value, percent, row_labels, signed_percent
from retain.evaluation.metrics import METRIC_NAMES, compute_metrics, validate_matrix
from retain.io import write_bytes_atomic, write_json_atomic, write_text_atomic

RESULTS_SCHEMA_VERSION = 1
GENERAL_TITLE = "General ability (%): eval-only tasks, never trained"


def build_results(
    tasks: list[str],
    matrix: list[list[float] | None],
    method: str,
    timings: dict,
    extra: dict | None = None,
    joint: bool = False,
) -> dict:
    """The `results.json` dict (schema in this module's docstring), with metrics computed from `matrix`."""
    metrics = compute_metrics(matrix, joint=joint)
    n_columns = validate_matrix(matrix, joint=joint)
    if len(tasks) != n_columns and not (joint and all(row is None for row in matrix)):
        raise RetainError(
            f"results: {len(tasks)} task name(s) for a matrix with {n_columns} column(s); "
            "give one name per task, in stream order"
        )
    results = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "tasks": list(tasks),
        "matrix": [None if row is None else [float(v) for v in row] for row in matrix],
        "joint": joint,
        "metrics": metrics,
        "method": method,
        "timings": timings,
    }
    clash = sorted(set(results) & set(extra or {}))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the results schema's own keys")
    results.update(extra or {})
    return results


def render_table(results: dict) -> Table:
    """The accuracy matrix as a rich table: one row per evaluation, one column per task, in percent."""
    table = Table(title=f"Accuracy (%) — {results.get('method', '?')}")
    table.add_column("model", style="bold")
    for name in results["tasks"]:
        table.add_column(name, justify="right")
    for label, row in zip(row_labels(results), results["matrix"], strict=True):
        cells = [percent(None)] * len(results["tasks"]) if row is None else [percent(v) for v in row]
        table.add_row(label, *cells)
    return table


def render_metrics(results: dict) -> Table:
    """The continual-learning metrics as a rich table, in percent (n/a where undefined)."""
    table = Table(title="Metrics (%)")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for name in METRIC_NAMES:
        table.add_row(METRIC_LABELS[name], metric_value(name, results["metrics"].get(name)))
    return table


def general_rows(results: dict) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """The eval-only tasks' table as text: the header (mean first) and (label, cells) per row, the scores
    per row of the general matrix and then its drops, in percent."""
    general = results["general"]
    names = ["mean", *general["tasks"]]
    rows = []
    for label, row in zip(row_labels(results), general["matrix"], strict=True):
        scores = [None] * len(names) if row is None else [sum(row) / len(row) if row else None, *row]
        rows.append((label, [percent(v) for v in scores]))
    metrics = [general["metrics"]["mean"], *(general["metrics"]["tasks"][t] for t in general["tasks"])]
    rows.append(("drop (before - last)", [signed_percent(m["drop"]) for m in metrics]))
    rows.append(("max drop (before - worst)", [signed_percent(m["max_drop"]) for m in metrics]))
    return names, rows


def render_general(results: dict) -> Table:
    """The eval-only tasks' retention as a rich table in percent, one row per task after their mean (the
    whole general matrix is in report.md: a column per task would not fit a terminal)."""
    general = results["general"]
    table = Table(title=GENERAL_TITLE)
    for column in ("task", "before", "last", "drop", "worst (row)", "max drop"):
        left = column == "task"
        table.add_column(column, style="bold" if left else None, justify="left" if left else "right")
    metrics = general["metrics"]
    for name, m in [("mean", metrics["mean"]), *((t, metrics["tasks"][t]) for t in general["tasks"])]:
        worst = percent(m["worst"]) + ("" if m["worst_row"] is None else f" ({m['worst_row']})")
        drops = signed_percent(m["drop"]), signed_percent(m["max_drop"])
        table.add_row(name, percent(m["before"]), percent(m["last"]), drops[0], worst, drops[1])
    return table


def print_report(results: dict, console: Console | None = None) -> None:
    """Print the matrix and metrics tables (and the eval-only tasks' table, if any) to `console` (a new
    stdout console by default)."""
    console = console or Console()
    console.print(render_table(results))
    console.print(render_metrics(results))
    if results.get("general"):
        console.print(render_general(results))


def matrix_figure(results: dict):
    """The accuracy matrix as an annotated heatmap in percent (rows: after which task; columns: tasks)."""
    # The object-oriented Agg API draws without pyplot's global state and without a display; imported
    # here so that commands which never plot do not pay for matplotlib.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = results["tasks"]
    labels = row_labels(results)
    # Cells, colours and colour bar all in percent (scores are fractions in results.json).
    values = [[math.nan] * len(tasks) if row is None else [100 * v for v in row] for row in results["matrix"]]
    figure = Figure(figsize=(3.5 + 1.1 * len(tasks), 2.0 + 0.55 * len(labels)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="viridis", vmin=0.0, vmax=100.0, aspect="auto")
    axes.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("evaluated on task")
    axes.set_ylabel("model")
    axes.set_title(f"Accuracy matrix — {results.get('method', '?')}")
    for i, row in enumerate(values):
        for j, value in enumerate(row):
            if not math.isnan(value):
                # Dark text on the bright end of viridis, light text on the dark end.
                axes.text(
                    j,
                    i,
                    f"{value:.1f}",
                    ha="center",
                    va="center",
                    color="black" if value > 60 else "white",
                    fontsize=9,
                )
    figure.colorbar(image, ax=axes, label="accuracy (%)")
    return figure


def plot_matrix(results: dict, path: str | os.PathLike) -> None:
    """Write the accuracy matrix as an annotated PNG heatmap (rows: after which task; columns: tasks)."""
    figure = matrix_figure(results)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_bytes_atomic(path, buffer.getvalue())


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_report(results: dict) -> str:
    """The report as markdown: the accuracy matrix and the metrics, both in percent."""
    tasks = results["tasks"]
    lines = [f"# retain report: {results.get('method', '?')}", "", "## Accuracy (%)", ""]
    lines.append("| model | " + " | ".join(_md_cell(t) for t in tasks) + " |")
    lines.append("| --- |" + " ---: |" * len(tasks))
    for label, row in zip(row_labels(results), results["matrix"], strict=True):
        cells = [percent(None)] * len(tasks) if row is None else [percent(v) for v in row]
        lines.append(f"| {_md_cell(label)} | " + " | ".join(cells) + " |")
    lines += ["", "## Metrics (%)", "", "| metric | value |", "| --- | ---: |"]
    for name in METRIC_NAMES:
        lines.append(f"| {METRIC_LABELS[name]} | {metric_value(name, results['metrics'].get(name))} |")
    lines += _general_section(results)
    lines += _run_notes(results)
    return "\n".join(lines) + "\n"


def _general_section(results: dict) -> list[str]:
    """The eval-only tasks' table as markdown (nothing without stream.eval_only)."""
    if not results.get("general"):
        return []
    names, rows = general_rows(results)
    lines = ["", f"## {GENERAL_TITLE}", ""]
    lines.append("| model | " + " | ".join(_md_cell(t) for t in names) + " |")
    lines.append("| --- |" + " ---: |" * len(names))
    lines += [f"| {_md_cell(label)} | " + " | ".join(cells) + " |" for label, cells in rows]
    return lines


def _run_notes(results: dict) -> list[str]:
    """Markdown sections on how the numbers were obtained: benchmark, scoring mode, data checks."""
    lines: list[str] = []
    benchmark = results.get("benchmark")
    if benchmark:
        lines += [
            "",
            "## Benchmark",
            "",
            f"{benchmark['name']} ({benchmark['layout']} layout), {benchmark['order']}: "
            f"{', '.join(benchmark['tasks'])}; data from `{benchmark['dir']}`.",
        ]
    ranked = [task for task, mode in (results.get("eval_mode") or {}).items() if mode == "rank"]
    if ranked:
        lines += [
            "",
            f"Scored by ranking the label set by log-likelihood (eval.mode: rank), not by generation: "
            f"{', '.join(ranked)}.",
        ]
    checks = results.get("data_checks") or {}
    if checks.get("warnings") or checks.get("findings"):
        lines += ["", "## Data checks", ""]
        lines += [f"- **warning:** {_md_cell(w)}" for w in checks.get("warnings", [])]
        lines += [f"- {_md_cell(f['task'])}: {_md_cell(f['message'])}" for f in checks.get("findings", [])]
    return lines


def write_report(run_dir: str | os.PathLike, results: dict) -> None:
    """Write results.json, report.md, accuracy_matrix.png and report.html into `run_dir`, each atomically."""
    run_dir = Path(run_dir)
    write_json_atomic(run_dir / "results.json", results)
    write_text_atomic(run_dir / "report.md", markdown_report(results))
    plot_matrix(results, run_dir / "accuracy_matrix.png")
    write_html_report(run_dir, results)


def load_matrix_file(path: str | os.PathLike) -> dict:
    """Read a results.json, or any JSON object with a "matrix" key; "tasks" defaults to task1..taskT.

    The matrix is validated as in `retain.evaluation.metrics`; every problem is a RetainError naming
    the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RetainError(f"{path}: no such file; give the path of a results.json or a JSON matrix") from None
    except IsADirectoryError:
        raise RetainError(f"{path}: is a directory; give the results.json file inside it") from None
    except (OSError, UnicodeDecodeError) as error:
        raise RetainError(f"{path}: cannot be read ({error})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise RetainError(
            f"{path}, line {error.lineno}, column {error.colno}: invalid JSON ({error.msg}); fix the file"
        ) from None
    if not isinstance(data, dict) or "matrix" not in data:
        raise RetainError(
            f'{path}: no "matrix" key; expected a JSON object like '
            '{"matrix": [[...before...], [...after task 1...], ...], "tasks": [...]}'
        )
    joint = bool(data.get("joint", False))
    try:
        n_tasks = validate_matrix(data["matrix"], joint=joint)
    except RetainError as error:
        raise RetainError(f"{path}: {error}") from None
    tasks = data.get("tasks")
    if tasks is None:
        data["tasks"] = [f"task{j}" for j in range(1, n_tasks + 1)]
    elif not isinstance(tasks, list) or len(tasks) != n_tasks:
        raise RetainError(f'{path}: "tasks" must be a list of {n_tasks} name(s), one per matrix column')
    else:
        data["tasks"] = [str(t) for t in tasks]
    return data
