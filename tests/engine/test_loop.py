"""The continual loop: every method runs a 2-task stream and resumes after a crash; full fine-tuning."""

from __future__ import annotations

import pytest

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.methods.registry import available

from ..helpers import assert_same, crash_then_resume, tiny_config

METHODS = [name for name in available() if not name.startswith("_")]
# Generation-based methods sized down: the tiny model never stops generating, so defaults sized for real
# use would spend the test's time generating text nobody reads.
SMALL = {
    "ssr": {"candidates_per_task": 16, "memory_per_task": 8},
    "pseudo_replay": {"memory_per_task": 8},
    "lamol": {"memory_per_task": 8},
    "rft": {"num_generations": 2, "filter_rollouts": 2},
}


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
