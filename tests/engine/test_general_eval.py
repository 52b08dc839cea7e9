"""stream.eval_only in a run: scored in every row, never trained, their own matrix and metrics, kept
apart from the stream's; resumed runs fill the general rows they lack."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from retain.config import config_from_dict
from retain.engine import loop
from retain.engine.loop import run_experiment
from retain.evaluation.metrics import general_retention
from retain.evaluation.report import print_report

from ..helpers import assert_same, crash_then_resume, tiny_config

STREAM = ["synthetic:parity", "synthetic:capital_letters", "synthetic:reverse"]
GENERAL = ["synthetic:arithmetic", {"name": "words", "test": "synthetic:sentiment", "test_size": 3}]


def _raw(tmp_path, folder: str, eval_only=None, method: str = "replay") -> dict:
    stream = {"tasks": STREAM, **({"eval_only": eval_only} if eval_only is not None else {})}
    return tiny_config(
        tmp_path / folder, method, {"memory_size": 4} if method == "replay" else {}, stream=stream
    )


@pytest.fixture
def trained_prompts(monkeypatch):
    """The user prompts of every example the trainer was given, unit by unit."""
    seen: list[list[str]] = []
    real = loop.encode_dataset

    def recording(tokenizer, data, *args, **kwargs):
        seen.append([e.messages[-2]["content"] for e in data])
        return real(tokenizer, data, *args, **kwargs)

    monkeypatch.setattr(loop, "encode_dataset", recording)
    return seen


def test_eval_only_tasks_are_scored_every_row_and_never_trained(tmp_path, trained_prompts):
    results = run_experiment(config_from_dict(_raw(tmp_path, "with", GENERAL)))
    general = results["general"]
    assert general["tasks"] == ["arithmetic", "words"]
    assert general["test_sizes"] == {"arithmetic": 6, "words": 3}
    assert len(general["matrix"]) == 4 and all(len(row) == 2 for row in general["matrix"])
    assert general["metrics"] == general_retention(general["matrix"], general["tasks"])
    # The stream's own columns and metrics do not include them.
    assert results["tasks"] == ["parity", "capital_letters", "reverse"]
    run = tmp_path / "with" / "run"
    for row in range(4):
        for name, size in general["test_sizes"].items():
            lines = (run / "eval" / str(row) / "general" / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == size
        assert not (run / "eval" / str(row) / "arithmetic.jsonl").exists()
    state = json.loads((run / "state.json").read_text())
    assert sorted(state["general_rows"]) == ["0", "1", "2", "3"]
    assert set(state["fingerprints"]["general"]) == {"arithmetic", "words"}
    assert "General ability" in (run / "report.md").read_text()
    console = Console(record=True, width=120)
    print_report(results, console)
    text = console.export_text()
    assert "General ability" in text and "max drop" in text
    # Never trained: three units, none of whose examples is an eval-only test prompt.
    assert len(trained_prompts) == 3
    plan_general = loop.make_plan(config_from_dict(_raw(tmp_path, "plan", GENERAL))).eval_only
    general_prompts = {e.messages[-2]["content"] for task in plan_general for e in task.test}
    assert all(not set(unit) & general_prompts for unit in trained_prompts)
    # The stream's numbers are those of the same run without eval_only.
    without = run_experiment(config_from_dict(_raw(tmp_path, "without")))
    assert "general" not in without
    assert_same(results, without)
    assert trained_prompts[:3] == trained_prompts[3:]


def test_a_resumed_run_fills_the_general_rows_it_lacks(tmp_path, monkeypatch):
    expected = run_experiment(config_from_dict(_raw(tmp_path, "whole", GENERAL, "sequential")))
    raw = _raw(tmp_path, "crashed", GENERAL, "sequential")
    real_train = loop.Experiment.train_unit

    def crash_in_task_2(self, index):
        if index == 2:
            # A kill after row 1 of the stream matrix, before row 1 of the general one was saved.
            state_path = tmp_path / "crashed" / "run" / "state.json"
            state = json.loads(state_path.read_text())
            del state["general_rows"]["1"]
            state_path.write_text(json.dumps(state))
            raise RuntimeError("killed during task 2")
        return real_train(self, index)

    monkeypatch.setattr(loop.Experiment, "train_unit", crash_in_task_2)
    with pytest.raises(RuntimeError, match="killed"):
        run_experiment(config_from_dict(raw))
    monkeypatch.setattr(loop.Experiment, "train_unit", real_train)
    resumed = crash_then_resume(raw, monkeypatch, crash=False)
    assert_same(resumed, expected)
    for got, want in zip(resumed["general"]["matrix"], expected["general"]["matrix"], strict=True):
        assert got == pytest.approx(want, abs=1e-6)
    assert resumed["general"]["metrics"] == expected["general"]["metrics"]
    # The same answers, row by row: the tiny model scores near 0, so the predictions are the real check.
    for row in range(4):
        for name in ("arithmetic", "words"):
            path = f"run/eval/{row}/general/{name}.jsonl"
            assert (tmp_path / "crashed" / path).read_text() == (tmp_path / "whole" / path).read_text()
