"""A CoIN-format folder (tests/coin_fixture.py: every task, a few records each, small images) runs through
`retain run ... benchmark=CoIN benchmark_dir=<dir>` with a tiny LLaVA saved by the test, sequentially and
with LCIA; every task is scored by its own CoIN scorer."""

from __future__ import annotations

import json

import yaml

from retain.config import config_from_dict
from retain.engine import evaluate
from retain.engine.loop import run_experiment
from retain.evaluation.scoring import score
from retain.models.tiny import tiny_vlm, tiny_vlm_processor

from ..coin_fixture import ORDER, SCORERS, TEXTVQA_ANSWERS, coin_fixture
from ..helpers import retain


def _config(tmp_path, **model) -> dict:
    vlm = tmp_path / "vlm"
    tiny_vlm().save_pretrained(vlm)
    tiny_vlm_processor().save_pretrained(vlm)
    return {
        "model": {"name_or_path": str(vlm), "lora_rank": 4, "lora_alpha": 8, **model},
        "train": {
            "learning_rate": 2e-2,
            "per_device_train_batch_size": 2,
            "max_steps": 2,
            "cutoff_len": 192,
            "logging_steps": 1,
            "bf16": "false",
        },
        "eval": {"max_new_tokens": 3, "batch_size": 2},
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
    }


def _run_cli(tmp_path, *overrides: str, **model) -> dict:
    root = coin_fixture(tmp_path / "coin", train_size=4, test_size=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, **model)))
    proc = retain("run", str(path), "benchmark=CoIN", f"benchmark_dir={root}", *overrides)
    assert proc.returncode == 0, proc.stderr
    return json.loads((tmp_path / "run" / "results.json").read_text())


def _records(tmp_path, row: int, task: str) -> list[dict]:
    lines = (tmp_path / "run" / "eval" / str(row) / f"{task}.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _check_scored_by_coin_scorers(tmp_path, tasks: list[str]) -> None:
    """Every prediction record's score is its task's CoIN scorer on (prediction, reference), and the
    references are in the form those scorers read."""
    rows = len(tasks) + 1
    for row in range(rows):
        for task in tasks:
            records = _records(tmp_path, row, task)
            assert len(records) == 2 and all(r["images"] for r in records), (row, task)
            for r in records:
                assert r["score"] == score(SCORERS[task], r["prediction"], r["reference"]), (row, task)
    last = {task: _records(tmp_path, rows - 1, task) for task in tasks}
    if "TextVQA" in last:  # vqa_soft reads the ten human answers
        assert json.loads(last["TextVQA"][0]["reference"]) == TEXTVQA_ANSWERS
    if "ScienceQA" in last:  # option_letter reads the letter
        assert [r["reference"] for r in last["ScienceQA"]] == ["B", "A"]


def test_retain_run_on_a_coin_folder_fills_the_matrix(tmp_path):
    results = _run_cli(tmp_path, "max_tasks=3")
    tasks = ORDER[:3]
    assert results["tasks"] == tasks
    assert len(results["matrix"]) == 4 and all(len(row) == 3 for row in results["matrix"])
    assert results["benchmark"]["name"] == "CoIN" and results["benchmark"]["layout"] == "coin"
    assert results["train_sizes"] == {"ScienceQA": 5, "TextVQA": 4, "ImageNet": 4}  # + the text-only one
    _check_scored_by_coin_scorers(tmp_path, tasks)


def test_lcia_runs_on_a_coin_folder_with_a_trained_projector(tmp_path):
    """TextVQA and GQA share their instruction, ImageNet has its own: GQA retrains TextVQA's group with
    DEMA (the projector too), and every test instance is answered through its own task's group."""
    tasks = ["TextVQA", "ImageNet", "GQA"]
    results = _run_cli(tmp_path, "method.name=lcia", f"tasks=[{','.join(tasks)}]", train_projector=True)
    assert results["tasks"] == tasks and results["method"] == "lcia"
    assert len(results["matrix"]) == 4 and all(len(row) == 3 for row in results["matrix"])
    assert results["adapters"] == ["default", "group2"]
    _check_scored_by_coin_scorers(tmp_path, tasks)
    book = json.loads((tmp_path / "run" / "lcia_codebook.json").read_text())
    assert [g["tasks"] for g in book["groups"]] == [["TextVQA", "GQA"], ["ImageNet"]]
    assert [t["dema"] for t in book["tasks"]] == [False, False, True]
    assert book["tasks"][2]["dema_tensors"]["base"] > 0  # the projector is in the EMA
    want = {"TextVQA": "default", "ImageNet": "group2", "GQA": "default"}
    for task, route in want.items():
        assert [r["route"] for r in _records(tmp_path, 3, task)] == [route, route], task
    assert (tmp_path / "run" / "tasks" / "3-GQA" / "adapter" / "trainable_base.safetensors").is_file()


def test_every_coin_task_trains_and_is_scored_by_its_own_scorer(tmp_path, monkeypatch):
    """All eight tasks in one run (in process, so the scoring calls can be watched)."""
    calls: dict[str, set[str]] = {}
    real_score = evaluate.score

    def spy(scorer, prediction, reference, source=None):
        calls.setdefault(reference, set()).add(scorer)
        return real_score(scorer, prediction, reference, source)

    monkeypatch.setattr(evaluate, "score", spy)
    raw = _config(tmp_path)
    raw["stream"] = {"benchmark": "CoIN", "benchmark_dir": coin_fixture(tmp_path / "coin", train_size=2)}
    raw["train"]["max_steps"] = 1
    results = run_experiment(config_from_dict(raw))
    assert results["tasks"] == ORDER and len(results["matrix"]) == 9
    for task in ORDER:
        references = [r["reference"] for r in _records(tmp_path, 8, task)]
        for reference in references:
            assert calls[reference] == {SCORERS[task]}, (task, reference)
