"""Faults around the run directory: a start that fails or is killed never blocks the same command, stale
temporaries are removed, two starts at once get the lock message, and results are tied to their data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from retain.cli import main
from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.engine.run_dir import RunDir
from retain.errors import RetainError

from ..helpers import ENV, assert_same, retain, tiny_config, write_config

# Runs `retain run CONFIG` and kills itself with SIGKILL at POINT: while the model loads, while the initial
# checkpoint is being written, or while checkpoint 1 is being written (its temporary folder half full).
KILLER = r"""
import os, signal, sys
from retain.engine import loop, run_dir

point, config = sys.argv[1], sys.argv[2]


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "load":
    loop.load_model = lambda *args, **kwargs: die()
else:
    prefix = ".0-" if point == "first_checkpoint" else ".1-"
    real = run_dir.save_trainable

    def save_trainable(model, folder):
        real(model, folder)
        if os.path.basename(os.path.dirname(folder)).startswith(prefix):
            die()

    run_dir.save_trainable = save_trainable
from retain.cli import main

sys.exit(main(["run", config]))
"""


def _killed_at(point: str, config: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, point, config], capture_output=True, text=True, env=ENV, timeout=300
    )
    assert proc.returncode == -9, proc.stderr


def _temporaries(run) -> list[str]:
    tasks = run / "tasks"
    return (
        [name for name in os.listdir(tasks) if name.startswith(".") and name != ".trainer"]
        if tasks.is_dir()
        else []
    )


@pytest.mark.parametrize("point", ["load", "first_checkpoint", "checkpoint"])
def test_a_killed_start_reruns_with_the_same_command_to_the_uninterrupted_result(tmp_path, point):
    expected = run_experiment(config_from_dict(tiny_config(tmp_path / "whole")))
    (tmp_path / "killed").mkdir()
    config = write_config(tmp_path / "killed")
    run = tmp_path / "killed" / "run"
    _killed_at(point, config)
    assert not (run / "results.json").exists()
    if point == "load":
        assert sorted(os.listdir(run)) == [".lock"]
    else:
        assert _temporaries(run), os.listdir(run / "tasks")
    assert main(["run", config]) == 0  # the same command, in this process (the kill was in another)
    assert_same(json.loads((run / "results.json").read_text()), expected)
    assert _temporaries(run) == []


def test_a_folder_holding_only_lock_files_and_temporaries_is_taken_over(tmp_path):
    raw = tiny_config(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("12345")
    (run / ".lock.1").write_text("12346")
    (run / ".state.json.12345.0123abcd.tmp").write_text("{")
    results = run_experiment(config_from_dict(raw))
    assert results["matrix"]
    assert not (run / ".state.json.12345.0123abcd.tmp").exists()


def test_a_start_that_never_trained_is_taken_over_even_with_other_settings(tmp_path):
    first = config_from_dict(tiny_config(tmp_path, train={"learning_rate": 0.1}))
    RunDir(first.output_dir).initialise(first, ["parity", "capital_letters"])  # stopped before checkpoint 0
    results = run_experiment(config_from_dict(tiny_config(tmp_path)))
    assert results["matrix"]
    assert "learning_rate: 0.02" in (tmp_path / "run" / "config.yaml").read_text()


def test_stale_checkpoint_temporaries_are_removed_on_the_next_start(tmp_path):
    raw = tiny_config(tmp_path)
    expected = run_experiment(config_from_dict(raw))
    stale = tmp_path / "run" / "tasks" / ".2-k3j4h5"
    (stale / "adapter").mkdir(parents=True)
    (stale / "adapter" / "adapter_model.safetensors").write_bytes(b"half")
    assert_same(run_experiment(config_from_dict(raw)), expected)
    assert not stale.exists()


def test_two_starts_at_once_the_loser_is_told_another_process_holds_the_folder(tmp_path):
    config = write_config(tmp_path)
    with RunDir(str(tmp_path / "run")).lock():
        proc = retain("run", config)
    assert proc.returncode != 0
    assert f"another retain process (pid {os.getpid()}) is using run directory" in proc.stderr, proc.stderr


def test_a_refused_start_leaves_the_lock_file_as_it_was(tmp_path):
    raw = tiny_config(tmp_path)
    run_experiment(config_from_dict(raw))
    lock = tmp_path / "run" / ".lock"
    lock.write_text("99999")  # as a run started by another process leaves it
    before = lock.read_bytes()
    with pytest.raises(RetainError, match="other settings"):
        run_experiment(config_from_dict(raw, overrides=["train.learning_rate=0.5"]))
    assert lock.read_bytes() == before


def test_a_resume_under_another_process_count_is_refused_without_a_global_batch(tmp_path):
    raw = tiny_config(tmp_path)
    run_experiment(config_from_dict(raw), evaluate=False)
    state_path = tmp_path / "run" / "state.json"
    state = json.loads(state_path.read_text())
    state.update(trained=1, num_processes=2)  # as a 2-process run stopped after its first task leaves it
    state_path.write_text(json.dumps(state))
    with pytest.raises(RetainError, match="trained with 2 process"):
        run_experiment(config_from_dict(raw), evaluate=False)


def _facts(n: int, offset: int = 0) -> list[dict]:
    return [
        {"instruction": f"fact {i}", "input": "", "output": f"v{i % 3}"} for i in range(offset, offset + n)
    ]


def _data_run(tmp_path):
    train, test = tmp_path / "facts.json", tmp_path / "facts_test.json"
    train.write_text(json.dumps(_facts(16)))
    test.write_text(json.dumps(_facts(4, offset=100)))
    tasks = [
        {"name": "facts", "train": str(train), "test": str(test)},
        {"name": "parity", "train": "synthetic:parity"},
    ]
    raw = tiny_config(
        tmp_path, stream={"tasks": tasks, "train_size": 8, "test_size": 4}, train={"max_steps": 2}
    )
    run_experiment(config_from_dict(raw), evaluate=False)
    return raw, train, test


def test_a_rerun_whose_data_changed_is_refused_naming_the_task_and_file(tmp_path):
    raw, train, test = _data_run(tmp_path)
    original = train.read_text()
    train.write_text(json.dumps([{**r, "output": "changed"} for r in _facts(16)]))
    with pytest.raises(RetainError, match=rf"task 'facts': its training data changed .*{train.name}"):
        run_experiment(config_from_dict(raw), evaluate=False)
    train.write_text(original)
    test.write_text(json.dumps(_facts(4, offset=200)))
    with pytest.raises(RetainError, match=rf"task 'facts': its test data changed .*{test.name}"):
        run_experiment(config_from_dict(raw))


def test_fingerprints_are_recorded_and_a_state_file_without_them_is_accepted(tmp_path):
    raw, _, _ = _data_run(tmp_path)
    state_path = RunDir(raw["output_dir"]).state_path
    saved = json.loads(open(state_path, encoding="utf-8").read())
    fingerprints = saved["fingerprints"]
    assert set(fingerprints["data"]) == {"facts", "parity"}
    assert set(fingerprints["data"]["facts"]) == {"train", "test"}
    assert fingerprints["method"]
    del saved["fingerprints"]  # a state file written before fingerprints were recorded
    with open(state_path, "w", encoding="utf-8") as handle:
        json.dump(saved, handle)
    assert run_experiment(config_from_dict(raw))["matrix"]
    assert json.loads(open(state_path, encoding="utf-8").read())["fingerprints"] == fingerprints


def test_a_rerun_whose_resolved_method_settings_changed_is_refused(tmp_path):
    raw, _, _ = _data_run(tmp_path)
    run_dir = RunDir(raw["output_dir"])
    state = run_dir.load_state()
    state.fingerprints["method"] = "0" * 64  # as if a default of the method changed since the run started
    run_dir.save_state(state)
    with pytest.raises(RetainError, match="method 'sequential'.*settings changed"):
        run_experiment(config_from_dict(raw))
