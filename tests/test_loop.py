"""The continual loop: every method runs a 2-task stream and resumes after a crash; full fine-tuning."""

from __future__ import annotations

import os

import pytest

from retain.config import config_from_dict
from retain.engine import loop
from retain.engine.loop import run_experiment
from retain.methods.registry import available

from .helpers import tiny_config

METHODS = [name for name in available() if not name.startswith("_")]
# Generation-based methods sized down: the tiny model never stops generating, so defaults sized for real
# use would spend the test's time generating text nobody reads.
SMALL = {
    "ssr": {"candidates_per_task": 16, "memory_per_task": 8},
    "pseudo_replay": {"memory_per_task": 8},
    "lamol": {"memory_per_task": 8},
}


class Crash(RuntimeError):
    pass


def crash_then_resume(raw: dict, monkeypatch, crash: bool = True) -> dict:
    """Run `raw` with a crash at the start of task 2, then run it again; returns the final results."""
    real_train = loop.Experiment.train_unit

    def crash_in_task_2(self, index):
        if index == 2:
            raise Crash("killed during task 2")
        return real_train(self, index)

    if crash:
        monkeypatch.setattr(loop.Experiment, "train_unit", crash_in_task_2)
        with pytest.raises(Crash):
            run_experiment(config_from_dict(raw))
        assert not os.path.exists(os.path.join(raw["output_dir"], "results.json"))
        monkeypatch.setattr(loop.Experiment, "train_unit", real_train)
    return run_experiment(config_from_dict(raw))


def assert_same(got: dict, want: dict) -> None:
    assert len(got["matrix"]) == len(want["matrix"])
    for row, expected in zip(got["matrix"], want["matrix"], strict=True):
        assert row == pytest.approx(expected, abs=1e-6)
    assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_a_two_task_stream_and_resumes_after_a_crash(tmp_path, method, monkeypatch):
    params = SMALL.get(method, {})
    expected = run_experiment(config_from_dict(tiny_config(tmp_path / "whole", method, params)))
    # multitask trains a single unit, so there is no task 2 to interrupt.
    crash = method != "multitask"
    resumed = crash_then_resume(tiny_config(tmp_path / "crashed", method, params), monkeypatch, crash=crash)
    assert_same(resumed, expected)


def test_full_finetuning_checkpoints_the_model_and_resumes(tmp_path, monkeypatch):
    def raw(folder):
        return tiny_config(tmp_path / folder, "ewc", {"fisher_samples": 4}, model={"finetuning_type": "full"})

    expected = run_experiment(config_from_dict(raw("whole")))
    task_dir = tmp_path / "whole" / "run" / "tasks" / "1-parity"
    assert (task_dir / "model" / "model.safetensors").is_file()
    assert not (task_dir / "adapter").exists()
    assert_same(crash_then_resume(raw("crashed"), monkeypatch), expected)
