"""`report.html`: one self-contained page per run (opens offline; inline CSS, SVG and script).

It shows the accuracy matrix as a heatmap, each task's accuracy across the stream, the metrics with their
definitions, the training loss over the whole stream with task boundaries and the method's own losses,
the run's facts (model, sizes, timings, provenance, data checks, config.yaml), and a prediction browser
(filter by row, task, correct or not, and text) over the predictions in `eval/<row>/<task>.jsonl`.

The page is written from a results dict (results.json's schema, see `retain.evaluation.report`) plus
what the run directory holds; a partial results dict (rows still null, metrics null) gives a partial
page, so the loop can rewrite it after every row. The browser's state lives in the URL hash
(`#row=2&task=parity&correct=0&q=text`), so a filtered view can be linked to.
"""

from __future__ import annotations

import os
from html import escape
from pathlib import Path

from retain.evaluation import svg
from retain.evaluation.html_page import display, json_script, key_value_table, page, table
from retain.evaluation.labels import (
    METRIC_LABELS,
    metric_definition,
    metric_value,
    percent,
    row_labels,
    signed_percent,
)
from retain.evaluation.metrics import METRIC_NAMES
from retain.evaluation.run_contents import (
    config_text,
    load_run_results,
    loss_curves,
    read_predictions,
    read_train_logs,
)
from retain.io import write_text_atomic

# A prediction counts as correct in the browser's filter at this score (exact-match scorers give 0 or 1;
# graded ones such as ROUGE-L give fractions).
CORRECT_AT = 0.5
# results.json keys the page shows in their own sections; any other key goes to "Other fields".
_SHOWN_KEYS = {
    "schema_version",
    "tasks",
    "matrix",
    "joint",
    "metrics",
    "method",
    "timings",
    "model",
    "finetuning_type",
    "method_params",
    "task_id_at_test",
    "seed",
    "num_processes",
    "batch",
    "adapters",
    "train_sizes",
    "test_sizes",
    "eval_mode",
    "data_checks",
    "benchmark",
    "provenance",
}
# ---------------------------------------------------------------- sections


def _section(anchor: str, title: str, content: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>\n{content}\n</section>'


def _matrix_section(results: dict) -> str:
    chart = svg.heatmap(row_labels(results), results["tasks"], results["matrix"], title="Accuracy (%)")
    note = (
        '<p class="note">Row i: the model after training task i (row 0: before any training); column j: '
        "scored on task j. Cells in percent.</p>"
    )
    return _section("matrix", "Accuracy matrix", chart + note)


def _general_section(results: dict) -> str:
    """The eval-only tasks (stream.eval_only): their matrix and their retention, apart from the stream's."""
    general = results.get("general")
    if not general or not general.get("tasks"):
        return ""
    chart = svg.heatmap(
        row_labels(results), general["tasks"], general["matrix"], title="General ability, never trained (%)"
    )
    metrics = general.get("metrics") or {}
    per_task = metrics.get("tasks") or {}
    rows = [
        (
            name,
            percent(m.get("before")),
            percent(m.get("last")),
            signed_percent(m.get("drop")),
            signed_percent(m.get("max_drop")),
        )
        for name, m in [
            ("mean", metrics.get("mean") or {}),
            *((t, per_task.get(t) or {}) for t in general["tasks"]),
        ]
    ]
    retention = table(
        ("task", "before", "last", "drop (before - last)", "max drop (before - worst)"),
        rows,
        numeric=(1, 2, 3, 4),
        element_id="general-retention",
    )
    note = (
        '<p class="note">Tasks scored in every row but never trained. Drops are positive when ability was '
        "lost; they are kept apart from Last, Avg and BWT, which describe the stream's own tasks.</p>"
    )
    return _section("general", "General ability", chart + retention + note)


def _curves_section(results: dict) -> str:
    matrix, tasks = results["matrix"], results["tasks"]
    series = [
        (name, [(i, 100 * row[j]) for i, row in enumerate(matrix) if row is not None])
        for j, name in enumerate(tasks)
    ]
    joint = bool(results.get("joint"))
    # Past eight tasks, "after k" labels would overlap: the row number alone, and no task markers.
    many = len(tasks) > 8
    ticks = [
        (i, str(i) if many else "before" if i == 0 else "after joint" if joint else f"after {i}")
        for i in range(len(matrix))
    ]
    chart = svg.line_chart(
        series,
        title="Accuracy on each task across the stream",
        x_label="model after training task k (0: before training)"
        if many
        else "model (after training task k)",
        y_label="accuracy (%)",
        y_range=(0.0, 100.0),
        x_ticks=ticks,
        x_range=(-0.2, len(matrix) - 0.8),
        width=max(720, min(1200, 60 * len(matrix))),
        # Task j trains between rows j - 1 and j.
        markers=[] if joint or many else [(j + 0.5, t) for j, t in enumerate(tasks)],
    )
    return _section("curves", "Accuracy across the stream", chart)


def _metrics_section(results: dict) -> str:
    values = results.get("metrics") or {}
    rows = [(METRIC_LABELS[n], metric_value(n, values.get(n)), metric_definition(n)) for n in METRIC_NAMES]
    html = table(
        ["metric", "value (%)", "definition"], rows, numeric=[1], classes={2: "def"}, element_id="metrics"
    )
    return _section("metrics", "Metrics", html)


def _loss_section(curves: dict) -> str:
    if not curves["main"] and not curves["method"]:
        return _section(
            "loss", "Training loss", '<p class="empty">no training log in this run directory yet</p>'
        )
    markers = curves["boundaries"]
    main = dict(curves["main"])
    if _same(main.get("loss"), main.get("loss/task")):
        del main["loss/task"]  # a method without a loss of its own: the two curves would coincide
    charts = [
        svg.line_chart(
            list(main.items()),
            title="Training loss across the stream",
            x_label="step (across all tasks)",
            y_label="loss",
            markers=markers,
            width=960,
        )
    ]
    charts += [
        svg.line_chart([(key, points)], title=key, x_label="step", y_label=key, markers=markers, width=470)
        for key, points in curves["method"].items()
    ]
    html = '<div class="charts">' + "".join(charts) + "</div>"
    if curves["after_task"]:
        html += "<h3>Logged after each task</h3>" + table(
            ["task", "statistic", "value"], [(t, k, display(v)) for t, k, v in curves["after_task"]]
        )
    return _section("loss", "Training loss", html)


def _same(a: list | None, b: list | None) -> bool:
    """True when two curves have the same points, up to 0.1% of each value."""
    if a is None or b is None or len(a) != len(b):
        return False
    return all(
        xa == xb and abs(ya - yb) <= 1e-3 * max(abs(ya), 1e-12)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def _timings_table(timings: dict, tasks: list[str]) -> str:
    # Runs recorded before preparation was timed apart have no prepare_s: their table has no such column.
    parts = [("prepare_s", "prepare (s)")] if any(k.startswith("prepare_s/") for k in timings) else []
    parts += [("train_s", "train (s)"), ("eval_s", "evaluate (s)")]
    per_task = []
    rest = dict(timings)
    for k in range(len(tasks) + 1):
        values = [rest.pop(f"{key}/{k}", None) for key, _ in parts]
        if any(v is not None for v in values):
            label = "before training" if k == 0 else f"{k}: {tasks[k - 1]}"
            per_task.append((label, *("" if v is None else v for v in values)))
    columns = ["task", *(title for _, title in parts)]
    html = table(columns, per_task, numeric=list(range(1, len(columns)))) if per_task else ""
    return html + (key_value_table(rest) if rest else "")


def _run_section(results: dict) -> str:
    tasks = results["tasks"]
    facts = {
        key: results[key]
        for key in (
            "method",
            "model",
            "finetuning_type",
            "seed",
            "num_processes",
            "batch",
            "task_id_at_test",
            "adapters",
        )
        if key in results
    }
    parts = ["<h3>Run</h3>", key_value_table(facts)]
    if results.get("benchmark"):
        bench = results["benchmark"]
        parts.append(
            f"<p>Benchmark {escape(display(bench.get('name')))} ({escape(display(bench.get('layout')))} "
            f"layout), {escape(display(bench.get('order')))}; data from "
            f"<code>{escape(display(bench.get('dir')))}</code>.</p>"
        )
    sizes, modes = results.get("train_sizes") or {}, results.get("eval_mode") or {}
    tests = results.get("test_sizes") or {}
    if sizes or tests or modes:
        rows = [(t, sizes.get(t, ""), tests.get(t, ""), modes.get(t, "")) for t in tasks]
        parts += [
            "<h3>Tasks</h3>",
            table(["task", "train examples", "test examples", "scored by"], rows, numeric=[1, 2]),
        ]
    if results.get("method_params") is not None:
        parts += ["<h3>Method settings (defaults included)</h3>", key_value_table(results["method_params"])]
    if results.get("timings"):
        parts += ["<h3>Timings</h3>", _timings_table(results["timings"], tasks)]
    if results.get("provenance"):
        parts += ["<h3>Provenance</h3>", key_value_table(results["provenance"])]
    checks = results.get("data_checks") or {}
    parts.append("<h3>Data checks</h3>")
    if checks.get("warnings") or checks.get("findings"):
        parts += [
            f'<p class="warning"><b>warning:</b> {escape(display(w))}</p>' for w in checks.get("warnings", [])
        ]
        findings = checks.get("findings", [])
        if findings:
            parts.append(
                table(
                    ["task", "check", "count", "message"],
                    [
                        (f.get("task", ""), f.get("check", ""), f.get("count", ""), f.get("message", ""))
                        for f in findings
                    ],
                    numeric=[2],
                )
            )
    else:
        parts.append('<p class="note">no findings</p>')
    other = {k: v for k, v in results.items() if k not in _SHOWN_KEYS}
    if other:
        parts += ["<h3>Other fields</h3>", key_value_table(other)]
    return _section("run", "Run", "".join(parts))


def _config_section(run_dir: Path | None) -> str:
    text = config_text(run_dir) if run_dir else None
    if text is None:
        return ""
    return _section("config", "Config as run (config.yaml)", f"<pre>{escape(text)}</pre>")


_BROWSER_HTML = """
<div class="controls">
  <label>row <select id="f-row"><option value="">all</option></select></label>
  <label>task <select id="f-task"><option value="">all</option></select></label>
  <label>answer <select id="f-correct"><option value="">all</option>
    <option value="1">correct (score &ge; {correct_at})</option>
    <option value="0">incorrect (score &lt; {correct_at})</option></select></label>
  <label>search <input type="search" id="f-q" placeholder="text in prompt, prediction, reference"></label>
  <span id="pred-count" class="note"></span>
</div>
<table id="prediction-table"><thead><tr><th>row</th><th>task</th><th>prompt</th><th>prediction</th>
<th>reference</th><th>score</th>{extra_heads}</tr></thead><tbody></tbody></table>
<button id="pred-more" hidden>show more</button>
"""

# The prediction browser. Text goes into the page with textContent only, never as markup.
_BROWSER_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("prediction-data").textContent);
  var PAGE = 100, limit = PAGE;
  function $(id) { return document.getElementById(id); }
  var form = { row: $("f-row"), task: $("f-task"), correct: $("f-correct"), q: $("f-q") };
  function addOption(select, value, text) {
    var option = document.createElement("option");
    option.value = value; option.textContent = text; select.appendChild(option);
  }
  data.rows.forEach(function (r) { addOption(form.row, String(r.id), r.id + ": " + r.label); });
  data.tasks.forEach(function (t) { addOption(form.task, t, t); });
  function readHash() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    Object.keys(form).forEach(function (key) { form[key].value = params.get(key) || ""; });
  }
  function writeHash() {
    var params = new URLSearchParams();
    Object.keys(form).forEach(function (key) { if (form[key].value) params.set(key, form[key].value); });
    var hash = "#" + params.toString();
    try { history.replaceState(null, "", hash); } catch (error) { location.hash = hash; }
  }
  function matches(rec) {
    if (form.row.value !== "" && String(rec.r) !== form.row.value) return false;
    if (form.task.value !== "" && rec.t !== form.task.value) return false;
    if (form.correct.value !== "") {
      var right = rec.s !== null && rec.s >= data.correct_at;
      if (right !== (form.correct.value === "1")) return false;
    }
    var q = form.q.value.trim().toLowerCase();
    if (q && (rec.p + "\n" + rec.y + "\n" + rec.ref).toLowerCase().indexOf(q) < 0) return false;
    return true;
  }
  function cell(tr, text, className) {
    var td = document.createElement("td"), box = td;
    if (className) td.className = className;
    if (className === "prompt") {
      box = document.createElement("div"); box.className = "clip"; td.appendChild(box);
    }
    box.textContent = text === undefined || text === null ? "" : String(text);
    tr.appendChild(td);
  }
  function render() {
    var shown = data.records.filter(matches);
    var body = $("prediction-table").tBodies[0];
    body.textContent = "";
    shown.slice(0, limit).forEach(function (rec) {
      var tr = document.createElement("tr");
      tr.className = rec.s !== null && rec.s >= data.correct_at ? "right" : "wrong";
      cell(tr, rec.r); cell(tr, rec.t); cell(tr, rec.p, "prompt"); cell(tr, rec.y); cell(tr, rec.ref);
      cell(tr, rec.s === null ? "" : rec.s.toFixed(3), "score num");
      if (data.has_route) cell(tr, rec.route);
      if (data.has_label_scores) cell(tr, rec.ls);
      body.appendChild(tr);
    });
    $("pred-count").textContent = shown.length + " of " + data.records.length + " predictions match" +
      (shown.length > limit ? " (first " + limit + " shown)" : "");
    $("pred-more").hidden = shown.length <= limit;
  }
  function changed() { limit = PAGE; writeHash(); render(); }
  Object.keys(form).forEach(function (key) {
    form[key].addEventListener(key === "q" ? "input" : "change", changed);
  });
  $("pred-more").addEventListener("click", function () { limit += PAGE; render(); });
  window.addEventListener("hashchange", function () { readHash(); limit = PAGE; render(); });
  readHash();
  render();
})();
"""


def _predictions_section(results: dict, run_dir: Path | None) -> tuple[str, str]:
    """(section html, data script) of the prediction browser; empty when the run has no predictions."""
    records, total = read_predictions(run_dir, results["tasks"]) if run_dir else ([], 0)
    if not records:
        return _section("predictions", "Predictions", '<p class="empty">no predictions yet</p>'), ""
    has_route = any("route" in r for r in records)
    has_label_scores = any("ls" in r for r in records)
    extra = ("<th>route</th>" if has_route else "") + (
        "<th>label scores (log-likelihood)</th>" if has_label_scores else ""
    )
    note = (
        f'<p class="note">The first {len(records)} of {total} predictions are in this page, in equal shares '
        f"per row and task; all of them are in <code>eval/&lt;row&gt;/&lt;task&gt;.jsonl</code>.</p>"
        if len(records) < total
        else ""
    )
    labels = row_labels(results)
    rows = sorted({r["r"] for r in records})
    data = {
        "rows": [{"id": i, "label": labels[i] if i < len(labels) else str(i)} for i in rows],
        "tasks": list(dict.fromkeys([*results["tasks"], *(r["t"] for r in records)])),
        "records": records,
        "correct_at": CORRECT_AT,
        "has_route": has_route,
        "has_label_scores": has_label_scores,
    }
    html = note + _BROWSER_HTML.format(correct_at=CORRECT_AT, extra_heads=extra)
    return _section("predictions", "Predictions", html), json_script("prediction-data", data)


# ---------------------------------------------------------------- the page


def render_report_html(results: dict, run_dir: str | os.PathLike | None = None) -> str:
    """The report page of a run as one HTML document; `run_dir` adds the training logs, predictions and
    config.yaml found there. A partial results dict (rows not evaluated yet) gives a partial page."""
    folder = Path(run_dir) if run_dir is not None else None
    matrix = results["matrix"]
    evaluated = sum(row is not None for row in matrix)
    done = evaluated == len(matrix)
    status = (
        '<span class="status">complete</span>'
        if done
        else f'<span class="status partial">in progress: {evaluated} of {len(matrix)} rows evaluated; '
        "reload to update</span>"
    )
    title = f"retain report: {results.get('method', '?')}"
    model = f" on {results['model']}" if results.get("model") else ""
    sections = [
        _matrix_section(results),
        _general_section(results),
        _curves_section(results),
        _metrics_section(results),
        _loss_section(loss_curves(read_train_logs(folder)) if folder else loss_curves([])),
        _run_section(results),
        _config_section(folder),
    ]
    browser, data = _predictions_section(results, folder)
    nav = "".join(
        f'<a href="#{a}">{t}</a>'
        for a, t in (
            ("matrix", "Matrix"),
            *((("general", "General"),) if results.get("general") else ()),
            ("curves", "Curves"),
            ("metrics", "Metrics"),
            ("loss", "Loss"),
            ("run", "Run"),
            ("config", "Config"),
            ("predictions", "Predictions"),
        )
    )
    header = (
        f'<header><h1>{escape(title)}</h1><p class="sub">{escape(results.get("method", "?"))}{escape(model)}'
        f", {len(results['tasks'])} task(s): {escape(', '.join(results['tasks']))} {status}</p>"
        f"<nav>{nav}</nav></header>"
    )
    body = header + "\n".join(s for s in sections if s) + browser + data
    return page(title, body, _BROWSER_JS if data else "")


def write_html_report(run_dir: str | os.PathLike, results: dict | None = None) -> Path:
    """Write `run_dir/report.html` (atomically) from `results`, or from the run's results.json (state.json
    for a run before its first results); returns its path."""
    results = load_run_results(run_dir) if results is None else results
    path = Path(run_dir) / "report.html"
    write_text_atomic(path, render_report_html(results, run_dir))
    return path
