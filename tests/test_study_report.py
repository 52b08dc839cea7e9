"""benchmarks/study.py's generated sections: two methods' matrices side by side (RFT next to SFT)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from retain.evaluation.compare import RunSummary, compute_metrics, group_runs

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(method: str, seed: int, matrix: list) -> RunSummary:
    return RunSummary(
        name=f"seed{seed}",
        method=method,
        metrics=compute_metrics(matrix),
        seconds=1.0,
        tasks=2,
        seed=seed,
        setting={"method.name": method},
        matrix=matrix,
        task_names=["a", "b"],
    )


def test_rft_and_sft_matrices_are_averaged_over_seeds_and_shown_row_by_row(study):
    groups = group_runs(
        [
            _run("sequential", 42, [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]),
            _run("sequential", 43, [[0.0, 0.5], [0.5, 0.0], [0.0, 1.0]]),
            _run("rft", 42, [[0.0, 0.0], [0.25, 0.0], [0.25, 0.75]]),
        ]
    )
    lines = study.side_by_side_lines(groups, "RFT next to SFT", "sequential", "rft")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert rows["0"] == "| 0 | 0.0 / 25.0 | 0.0 / 0.0 |"
    assert rows["1"] == "| 1 | 75.0 / 0.0 | 25.0 / 0.0 |"
    assert rows["2"] == "| 2 | 25.0 / 100.0 | 25.0 / 75.0 |"
    # BWT: sequential (0.5-1)=-50 and (0-0.5)=-50 -> -50 ± 0; rft 0
    assert rows["bwt"] == "| bwt | -50.0 ± 0.0 | +0.0 |"
    assert "over 2 and 1 seed(s)" in "\n".join(lines)


def test_nothing_is_shown_until_both_methods_have_runs(study):
    groups = group_runs([_run("sequential", 42, [[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]])])
    assert study.side_by_side_lines(groups, "RFT next to SFT", "sequential", "rft") == []


def test_runs_without_preparation_timings_are_named_in_the_wall_time_note(study, tmp_path):
    old = {"model_load_s": 1.0, "train_s/1": 2.0, "eval_s/1": 1.0}
    new = {**old, "prepare_s/1": 5.0}

    def kept(*runs):
        folders = []
        for i, (method, timings) in enumerate(runs):
            folder = tmp_path / f"{method}-{i}-{len(runs)}"
            folder.mkdir(exist_ok=True)
            (folder / "results.json").write_text(json.dumps({"method": method, "timings": timings}))
            folders.append(str(folder))
        return folders

    (note,) = study.untimed_preparation_note(kept(("rft", old), ("coso", new), ("merge", new)))
    assert note.startswith("Runs of rft were recorded before") and "coso" not in note
    (note,) = study.untimed_preparation_note(kept(("rft", old), ("lamol", old), ("coso", new)))
    assert note.startswith("Only the runs of coso count a task's preparation")
    (note,) = study.untimed_preparation_note(kept(("rft", old)))
    assert note.startswith("These runs were recorded before")
    assert study.untimed_preparation_note(kept(("coso", new))) == []
