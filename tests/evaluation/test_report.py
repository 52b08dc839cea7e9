import json
import os

import pytest
from rich.console import Console

from retain.errors import RetainError
from retain.evaluation.report import (
    RESULTS_SCHEMA_VERSION,
    build_results,
    load_matrix_file,
    markdown_report,
    plot_matrix,
    print_report,
    render_metrics,
    render_table,
    write_report,
)
from retain.io import write_json_atomic, write_text_atomic

TASKS = ["sum", "reverse"]
MATRIX = [[0.1, 0.2], [0.8, 0.4], [0.6, 0.9]]


@pytest.fixture
def results():
    return build_results(TASKS, MATRIX, "ewc", {"total": 12.5}, extra={"seed": 0})


def _text(renderable) -> str:
    console = Console(record=True, width=200)
    console.print(renderable)
    return console.export_text()


def test_build_results_schema(results):
    assert results["schema_version"] == RESULTS_SCHEMA_VERSION == 1
    assert results["tasks"] == TASKS
    assert results["matrix"] == MATRIX
    assert results["method"] == "ewc"
    assert results["timings"] == {"total": 12.5}
    assert results["seed"] == 0
    assert results["joint"] is False
    assert results["metrics"]["bwt"] == pytest.approx(-0.2)
    json.dumps(results, allow_nan=False)  # JSON-ready as is


def test_build_results_rejects_mismatch_and_clashes():
    with pytest.raises(RetainError, match="3 task name"):
        build_results(["a", "b", "c"], MATRIX, "ewc", {})
    with pytest.raises(ValueError, match="metrics"):
        build_results(TASKS, MATRIX, "ewc", {}, extra={"metrics": {}})


def test_build_results_joint():
    results = build_results(TASKS, [[0.1, 0.2], [0.7, 0.9]], "joint", {}, joint=True)
    assert results["joint"] is True
    assert results["metrics"]["last"] == pytest.approx(0.8)
    assert results["metrics"]["bwt"] is None
    assert "after joint training" in _text(render_table(results))


def test_write_json_atomic(tmp_path):
    path = tmp_path / "sub" / "out.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": [1, None]})
    assert json.loads(path.read_text()) == {"a": [1, None]}
    assert os.listdir(path.parent) == ["out.json"]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_json_atomic(path, {"a": float("nan")})
    assert json.loads(path.read_text()) == {"a": [1, None]}  # a failed write leaves the old file
    assert os.listdir(path.parent) == ["out.json"]


def test_write_text_atomic_respects_umask(tmp_path):
    path = tmp_path / "note.md"
    write_text_atomic(path, "héllo\n")
    assert path.read_text(encoding="utf-8") == "héllo\n"
    old = os.umask(0o022)
    os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~old


def test_render_table_and_metrics(results):
    table = _text(render_table(results))
    assert "before" in table and "after task 1: sum" in table and "after task 2: reverse" in table
    assert "80.0" in table and "90.0" in table and "reverse" in table
    metrics = _text(render_metrics(results))
    assert "-20.0" in metrics  # BWT, signed
    assert "+20.0" in metrics  # FWT, signed
    assert "75.0" in metrics  # Last


def test_partial_and_undefined_values_render(tmp_path):
    results = build_results(TASKS, [MATRIX[0], MATRIX[1], None], "seq", {})
    assert "—" in _text(render_table(results))
    assert "n/a" in _text(render_metrics(results))
    assert "| after task 2: reverse | — | — |" in markdown_report(results)
    plot_matrix(results, tmp_path / "partial.png")


def test_print_report(results):
    console = Console(record=True, width=200)
    print_report(results, console=console)
    text = console.export_text()
    assert "after task 2: reverse" in text and "Forgetting" in text


def test_markdown_report(results):
    text = markdown_report(results)
    assert text.startswith("# retain report: ewc")
    assert "| model | sum | reverse |" in text
    assert "| after task 1: sum | 80.0 | 40.0 |" in text
    assert "| BWT (backward transfer) | -20.0 |" in text


def test_plot_matrix_writes_png(tmp_path, results):
    path = tmp_path / "m.png"
    plot_matrix(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_report_and_load_back(tmp_path, results):
    write_report(tmp_path / "run", results)
    assert sorted(os.listdir(tmp_path / "run")) == [
        "accuracy_matrix.png",
        "report.html",
        "report.md",
        "results.json",
    ]
    loaded = load_matrix_file(tmp_path / "run" / "results.json")
    assert loaded == results


def test_load_matrix_file_defaults_task_names(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"matrix": MATRIX}))
    assert load_matrix_file(path)["tasks"] == ["task1", "task2"]


def test_load_matrix_file_errors(tmp_path):
    with pytest.raises(RetainError, match="no such file"):
        load_matrix_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "matrix": [[0.1, 0.2],\n  oops]\n}')
    with pytest.raises(RetainError, match=r"bad\.json, line 3, column 3: invalid JSON"):
        load_matrix_file(bad)
    no_key = tmp_path / "nokey.json"
    no_key.write_text('{"rows": []}')
    with pytest.raises(RetainError, match='no "matrix" key'):
        load_matrix_file(no_key)
    out_of_range = tmp_path / "range.json"
    out_of_range.write_text(json.dumps({"matrix": [[10, 20], [80, 40], [60, 90]]}))
    with pytest.raises(RetainError, match=r"range\.json: accuracy matrix row 0, column 0"):
        load_matrix_file(out_of_range)
    wrong_tasks = tmp_path / "tasks.json"
    wrong_tasks.write_text(json.dumps({"matrix": MATRIX, "tasks": ["only one"]}))
    with pytest.raises(RetainError, match="one per matrix column"):
        load_matrix_file(wrong_tasks)
    with pytest.raises(RetainError, match="is a directory"):
        load_matrix_file(tmp_path)
