"""evaluate_row: one JSONL per task, scores in [0, 1], per-instance routes when a method routes."""

from __future__ import annotations

import json

from retain.engine.evaluate import evaluate_row
from retain.methods.base import ContinualMethod

from ..helpers import AlternatingRoutes, tiny_context


def test_rows_write_predictions_and_routes(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    method = AlternatingRoutes()
    files = [str(tmp_path / "eval" / f"{t.name}.jsonl") for t in tasks]
    row = evaluate_row(method, ctx, 1, files, max_new_tokens=4, batch_size=4)
    assert len(row) == len(tasks) and all(0.0 <= s <= 1.0 for s in row)
    records = [json.loads(line) for line in open(files[0])]
    assert len(records) == len(tasks[0].test)
    assert [r["route"] for r in records] == ["a" if i % 2 == 0 else "b" for i in range(len(records))]
    assert method.activated == ["a", "b", "a", "b"]  # each route activated once per task
    assert set(records[0]) == {"prompt", "prediction", "reference", "score", "route"}


def test_rows_without_routes_have_no_route_field(tmp_path):
    ctx, tasks = tiny_context(tmp_path)
    files = [str(tmp_path / f"{t.name}.jsonl") for t in tasks]
    evaluate_row(ContinualMethod(), ctx, 0, files, max_new_tokens=4, batch_size=8)
    assert "route" not in json.loads(open(files[0]).readline())
