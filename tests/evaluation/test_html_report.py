"""report.html and the compare page as text: sections, escaping, partial runs, loss curves, the
prediction cap. tests/evaluation/test_browser.py checks what a browser shows."""

import json
import re

import pytest
import yaml

from retain.evaluation.compare import group_runs, load_runs
from retain.evaluation.html_compare import mean_matrix, render_compare_html, write_compare_html
from retain.evaluation.html_page import json_script
from retain.evaluation.html_report import render_report_html, write_html_report
from retain.evaluation.report import build_results, write_report
from retain.evaluation.run_contents import loss_curves, read_predictions, read_train_logs
from retain.evaluation.svg import heatmap, nice_ticks, viridis

TASKS = ["parity", "capital_letters"]
MATRIX = [[0.1, 0.2], [0.8, 0.4], [0.6, 0.9]]
ATTACK = "</script><script>document.title='pwned'</script><!-- & \u2028"


def make_run(folder, matrix=MATRIX, method="ewc", seed=3, predictions=3, prompt="Is 4 even?"):
    """A run directory as the loop leaves it: results.json, config.yaml, train logs, predictions."""
    folder.mkdir(parents=True, exist_ok=True)
    results = build_results(TASKS, matrix, method, {"train_s/1": 1.5, "eval_s/1": 0.5}, extra={"seed": seed})
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.yaml").write_text(
        yaml.safe_dump({"method": {"name": method}, "seed": seed, "output_dir": str(folder)})
    )
    for k, name in enumerate(TASKS, start=1):
        log = [
            {"loss": 2.0 / k, "loss/task": 1.9 / k, "ewc/penalty": 0.1 * k, "step": 2, "epoch": 0.5},
            {"loss": 1.0 / k, "loss/task": 0.9 / k, "ewc/penalty": 0.2 * k, "step": 4, "epoch": 1.0},
            {"train_runtime": 1.0, "train_loss": 1.5, "step": 4, "epoch": 1.0},
            {"after_task": {"ewc/fisher_mean": 0.01 * k}},
        ]
        (folder / "tasks" / f"{k}-{name}").mkdir(parents=True, exist_ok=True)
        (folder / "tasks" / f"{k}-{name}" / "train_log.json").write_text(json.dumps(log))
    for row, scores in enumerate(matrix):
        if scores is None:
            continue
        (folder / "eval" / str(row)).mkdir(parents=True, exist_ok=True)
        for name in TASKS:
            lines = [
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": f"{prompt} #{i}"}],
                        "prediction": "yes" if i % 2 else "no",
                        "reference": "yes",
                        "score": float(i % 2),
                        "route": f"r{i % 2}",
                        "label_scores": {"no": -2.5, "yes": -0.5},
                    }
                )
                for i in range(predictions)
            ]
            (folder / "eval" / str(row) / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return results


def embedded(page: str, element_id: str):
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_page_sections(tmp_path):
    results = make_run(tmp_path / "run")
    page = render_report_html(results, tmp_path / "run")
    for anchor in ("matrix", "curves", "metrics", "loss", "run", "config", "predictions"):
        assert f'<section id="{anchor}">' in page
    assert page.count('<g class="cell">') == 6  # 3 rows x 2 tasks, with values
    assert (
        ">80.0<" in page and "backward transfer" in page and "Lopez-Paz" in page
    )  # value, label, definition
    assert "ewc/penalty" in page and "ewc/fisher_mean" in page  # the method's own losses and statistics
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched: no CDN
    data = embedded(page, "prediction-data")
    assert len(data["records"]) == 3 * 2 * 3 and data["has_route"] and data["has_label_scores"]
    assert data["records"][0]["ls"] == "yes: -0.5\nno: -2.5"  # best label first
    assert [r["id"] for r in data["rows"]] == [0, 1, 2]


def test_timings_table_shows_preparation_only_where_the_run_recorded_it(tmp_path):
    results = make_run(tmp_path / "run")
    assert "train (s)" in render_report_html(results) and "prepare (s)" not in render_report_html(results)
    results["timings"] = {"prepare_s/1": 4.25, "train_s/1": 1.5, "eval_s/1": 0.5}
    page = render_report_html(results)
    assert "prepare (s)" in page and ">4.25<" in page


def test_embedded_json_and_text_cannot_break_the_page(tmp_path):
    results = make_run(tmp_path / "run", prompt=ATTACK)
    results["tasks"] = TASKS  # task names reach labels and options
    results["note<b>"] = "<img src=x onerror=alert(1)>"
    page = render_report_html(results, tmp_path / "run")
    # Exactly the page's own two script elements end: the data and the browser's code.
    assert page.count("</script>") == 2
    assert "<img src=x" not in page and "<b>" not in page
    data = embedded(page, "prediction-data")
    assert data["records"][0]["p"].startswith("user: " + ATTACK)  # the text comes back unchanged
    assert json.loads(json_script("x", {"a": "</script>"}).split(">", 1)[1].rsplit("<", 1)[0]) == {
        "a": "</script>"
    }


def test_partial_run_page(tmp_path):
    partial = [[0.1, 0.2], [0.8, 0.4], None]
    results = make_run(tmp_path / "run", matrix=partial)
    page = render_report_html(results, tmp_path / "run")
    assert "in progress: 2 of 3 rows evaluated" in page
    assert page.count("not evaluated yet") == 2
    assert "BWT" in page and "n/a" in page


def test_write_html_report_from_state_json(tmp_path):
    """Before results.json exists (a run in its first rows), the page comes from state.json."""
    folder = tmp_path / "run"
    make_run(folder, matrix=[[0.1, 0.2], None, None])
    (folder / "state.json").write_text(
        json.dumps({"tasks": TASKS, "trained": 1, "rows": {"0": [0.1, 0.2]}, "timings": {"eval_s/0": 2.0}})
    )
    path = write_html_report(folder)
    page = path.read_text()
    assert path == folder / "report.html"
    assert "in progress: 1 of 3 rows evaluated" in page and "retain report: ewc" in page


def test_write_report_writes_html(tmp_path):
    results = make_run(tmp_path / "run")
    write_report(tmp_path / "run", results)
    assert "retain report: ewc" in (tmp_path / "run" / "report.html").read_text()


def test_loss_curves_continue_across_tasks(tmp_path):
    make_run(tmp_path / "run")
    logs = read_train_logs(tmp_path / "run")
    assert [(k, name) for k, name, _ in logs] == [(1, "parity"), (2, "capital_letters")]
    curves = loss_curves(logs)
    assert curves["main"]["loss"] == [(2, 2.0), (4, 1.0), (6, 1.0), (8, 0.5)]  # task 2 starts at step 4
    assert curves["method"] == {"ewc/penalty": [(2, 0.1), (4, 0.2), (6, 0.2), (8, 0.4)]}
    assert curves["boundaries"] == [(0, "1: parity"), (4, "2: capital_letters")]
    assert curves["after_task"] == [
        ("parity", "ewc/fisher_mean", 0.01),
        ("capital_letters", "ewc/fisher_mean", 0.02),
    ]


def test_predictions_are_capped_in_equal_shares(tmp_path):
    make_run(tmp_path / "run", predictions=50)
    records, total = read_predictions(tmp_path / "run", TASKS, limit=60)
    assert total == 3 * 2 * 50 and len(records) == 60
    shares = {(r["r"], r["t"]) for r in records}
    assert len(shares) == 6  # every row and task is represented, 10 each
    assert records[0]["r"] == 2  # the last row first
    page = render_report_html(build_results(TASKS, MATRIX, "ewc", {}), tmp_path / "run")
    assert "The first 300 of 300" not in page  # under the default cap: no note


def test_svg_helpers():
    assert viridis(0.0) == "#440154" and viridis(1.0) == "#fde725" and viridis(2.0) == "#fde725"
    assert nice_ticks(0, 0.93) == [0, 0.5, 1.0] and nice_ticks(-34, -2) == [-40, -30, -20, -10, 0]
    svg = heatmap(["a<"], ["t&"], [[0.5]])
    assert "a&lt;" in svg and "t&amp;" in svg and ">50.0<" in svg


def _seed_runs(tmp_path):
    for name, method, seed, matrix in (
        ("ewc1", "ewc", 1, MATRIX),
        ("ewc2", "ewc", 2, [[0.1, 0.2], [0.6, 0.4], [0.4, 0.7]]),
        ("seq", "sequential", 1, [[0.1, 0.2], [0.9, 0.1], [0.2, 0.9]]),
    ):
        make_run(tmp_path / name, matrix=matrix, method=method, seed=seed)
    return [str(tmp_path / n) for n in ("ewc1", "ewc2", "seq")]


def test_compare_page(tmp_path):
    runs = _seed_runs(tmp_path)
    groups = group_runs(load_runs(runs))
    page = render_compare_html(groups)
    assert [g.n for g in groups] == [2, 1]
    table = page.split('<table id="metrics">')[1].split("</table>")[0]
    assert table.count("<tr>") == 3 and "±" in table  # header + 2 settings; seeds as mean ± std
    assert page.count('<g class="point">') == 2  # BWT vs Last: one point per setting
    assert page.count('class="chart heatmap"') == 2
    assert [pytest.approx(row) for row in [[0.1, 0.2], [0.7, 0.4], [0.5, 0.8]]] == mean_matrix(groups[0])
    out = write_compare_html(runs, tmp_path / "compare.html")
    assert "retain compare: 3 run(s), 2 setting(s)" in out.read_text()


def test_the_general_section_shows_the_eval_only_matrix_and_its_drops(tmp_path):
    from retain.evaluation.metrics import general_retention

    general_matrix = [[0.5, 0.25], [0.4, 0.25], [0.25, 0.5]]
    extra = {
        "general": {
            "tasks": ["instruct", "parity"],
            "matrix": general_matrix,
            "metrics": general_retention(general_matrix, ["instruct", "parity"]),
        }
    }
    results = build_results(["a", "b"], [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]], "ewc", {}, extra=extra)
    html = render_report_html(results)
    assert '<section id="general">' in html and 'href="#general"' in html
    retention = html.split('id="general-retention"', 1)[1].split("</table>", 1)[0]
    # instruct: 50.0 before, 25.0 last, a drop of +25.0; parity gained 25 points (-25.0).
    assert "instruct" in retention and "+25.0" in retention and "-25.0" in retention
    assert '<section id="general">' not in render_report_html(build_results(["a"], [[0.0], [1.0]], "ewc", {}))
