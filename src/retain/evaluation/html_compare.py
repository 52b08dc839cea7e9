"""The compare page (`retain compare RUN... --html out.html`): one self-contained HTML document.

It shows the metrics table (a group of seeds of one setting as mean ± std [95% interval], from
`retain.evaluation.compare.group_runs`), the notes on overlapping intervals, a BWT-vs-Last scatter plot
(with the intervals as error bars) and the accuracy matrices side by side (a group's mean matrix).
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from retain.evaluation import svg
from retain.evaluation.compare import (
    COLUMNS,
    LOWER_IS_BETTER,
    SIGNED,
    GroupSummary,
    format_stats,
    group_runs,
    load_runs,
    overlap_notes,
    sort_groups,
)
from retain.evaluation.html_page import page
from retain.evaluation.labels import METRIC_LABELS, metric_definition
from retain.io import write_text_atomic


def _metrics_table(groups: list[GroupSummary]) -> str:
    heads = ["setting", "method", "runs", "tasks"]
    head = "".join(f"<th>{h}</th>" for h in heads) + "".join(
        f'<th title="{escape(metric_definition(m))}">{escape(METRIC_LABELS[m])}</th>' for m in COLUMNS
    )
    rows = []
    for group in groups:
        seconds = "n/a" if group.seconds.mean is None else f"{group.seconds.mean:.0f}"
        cells = [f"<td>{escape(group.name)}</td>", f"<td>{escape(group.method)}</td>"]
        cells += [f'<td class="num">{group.n}</td>', f'<td class="num">{group.tasks}</td>']
        cells += [
            f'<td class="num">{escape(format_stats(group.metrics[m], signed=m in SIGNED))}</td>'
            for m in COLUMNS
        ]
        cells.append(f'<td class="num">{seconds}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (
        f'<table id="metrics"><thead><tr>{head}<th>wall time (s)</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _interval(stats) -> tuple[float, float] | None:
    return None if stats.low is None else (100 * stats.low, 100 * stats.high)


def _scatter(groups: list[GroupSummary]) -> str:
    points = [
        {
            "label": group.name,
            "x": 100 * group.metrics["bwt"].mean,
            "y": 100 * group.metrics["last"].mean,
            "x_err": _interval(group.metrics["bwt"]),
            "y_err": _interval(group.metrics["last"]),
        }
        for group in groups
        if group.metrics["bwt"].mean is not None and group.metrics["last"].mean is not None
    ]
    missing = len(groups) - len(points)
    note = (
        f'<p class="note">{missing} setting(s) without BWT (one task, or a joint run) are not plotted.</p>'
        if missing
        else ""
    )
    chart = svg.scatter(points, title="Last vs BWT", x_label="BWT (%)", y_label="Last (%)")
    caption = (
        '<p class="note">Up and to the right is better: a high final accuracy and little forgetting. '
        "Bars: 95% intervals over a setting's seeds.</p>"
    )
    return chart + caption + note


def mean_matrix(group: GroupSummary) -> list[list[float] | None]:
    """The element-wise mean of the members' accuracy matrices (a row is None where any member lacks
    it); the first member's matrix when their shapes differ."""
    matrices = [m.matrix for m in group.members]
    first = matrices[0]
    shape = [None if row is None else len(row) for row in first]
    if any(len(m) != len(first) or [None if r is None else len(r) for r in m] != shape for m in matrices):
        return first
    mean: list[list[float] | None] = []
    for i, row in enumerate(first):
        if row is None or any(m[i] is None for m in matrices):
            mean.append(None)
        else:
            mean.append([sum(m[i][j] for m in matrices) / len(matrices) for j in range(len(row))])
    return mean


def _matrices(groups: list[GroupSummary]) -> str:
    charts = []
    for group in groups:
        matrix = mean_matrix(group)
        labels = ["before"] + [f"after {i}" for i in range(1, len(matrix))]
        title = group.name + (f" (mean of {group.n} runs)" if group.n > 1 else "")
        charts.append(svg.heatmap(labels, group.members[0].task_names, matrix, title=title))
    return '<div class="charts">' + "".join(charts) + "</div>"


def _members(groups: list[GroupSummary], base: Path | None) -> str:
    items = []
    for group in groups:
        links = []
        for run in group.members:
            folder = Path(run.path) if os.path.isdir(run.path) else Path(run.path).parent
            report = folder / "report.html"
            text = escape(run.path or run.name) + ("" if run.seed is None else f" (seed {run.seed})")
            if base is not None and report.is_file():
                href = Path(os.path.relpath(report.resolve(), base.resolve())).as_posix()
                links.append(f'<a href="{escape(href)}">{text}</a>')
            else:
                links.append(text)
        items.append(f"<li>{escape(group.name)}: {', '.join(links)}</li>")
    return f"<ul>{''.join(items)}</ul>"


def render_compare_html(
    groups: list[GroupSummary], sort: str = "last", base: str | os.PathLike | None = None
) -> str:
    """The compare page for `groups` (from `group_runs`), best first by `sort`; with `base` (the folder
    the page is written to), each run links to its report.html."""
    groups = sort_groups(groups, sort)
    runs = sum(g.n for g in groups)
    title = f"retain compare: {runs} run(s), {len(groups)} setting(s)"
    notes = overlap_notes(groups, sort)
    order = "ascending" if sort in LOWER_IS_BETTER or sort in ("time", "name") else "descending"
    body = [
        f"<header><h1>{escape(title)}</h1></header>",
        '<section id="table"><h2>Metrics (%)</h2>',
        _metrics_table(groups),
        f'<p class="note">Sorted by {escape(sort)} ({order}). A setting is the runs whose config.yaml differ '
        "only in seed and output_dir: mean ± sample std [95% Student-t interval] over its runs; one run "
        "shows its value alone. Hover a metric's name for its definition.</p>",
    ]
    if notes:
        body.append(f"<h3>95% intervals of {escape(sort)}</h3><ul>")
        body += [f"<li>{escape(note)}</li>" for note in notes]
        body.append("</ul>")
    body += [
        "</section>",
        f'<section id="scatter"><h2>Last vs BWT</h2>{_scatter(groups)}</section>',
        f'<section id="matrices"><h2>Accuracy matrices (%)</h2>{_matrices(groups)}</section>',
        f'<section id="runs"><h2>Runs</h2>{_members(groups, None if base is None else Path(base))}</section>',
    ]
    return page(title, "\n".join(body))


def write_compare_html(run_dirs: list[str], path: str | os.PathLike, sort: str = "last") -> Path:
    """Write the compare page of `run_dirs` to `path` (atomically); returns the path."""
    path = Path(path)
    groups = group_runs(load_runs(run_dirs))
    write_text_atomic(path, render_compare_html(groups, sort, base=path.parent))
    return path
