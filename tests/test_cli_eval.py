"""`retain eval RUN_DIR eval.key=value`: every trained row again under other evaluation settings, into
evals/<name>/, while the run's recorded rows, predictions and results stay byte for byte as they were."""

from __future__ import annotations

import hashlib
import json
import os

from retain.config import config_from_dict
from retain.engine.loop import run_experiment

from .helpers import retain_in_process, tiny_config


def _hashes(folder) -> dict[str, str]:
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != "evals"]
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def _predictions(folder) -> list[str]:
    with open(folder, encoding="utf-8") as handle:
        return [json.loads(line)["prediction"] for line in handle]


def test_eval_overrides_write_a_new_row_set_and_leave_the_recorded_one(tmp_path, capsys):
    raw = tiny_config(tmp_path, eval={"max_new_tokens": 6})
    run_experiment(config_from_dict(raw))
    run = raw["output_dir"]
    before = _hashes(run)
    proc = retain_in_process("eval", run, "eval.max_new_tokens=1", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert _hashes(run) == before
    out = os.path.join(run, "evals", "max_new_tokens=1")
    results = json.loads(open(os.path.join(out, "results.json")).read())
    assert len(results["matrix"]) == 3 and all(row is not None for row in results["matrix"])
    assert results["eval"]["max_new_tokens"] == 1
    recorded = json.loads(open(os.path.join(run, "results.json")).read())
    assert results["tasks"] == recorded["tasks"]
    for row in range(3):
        for task in results["tasks"]:
            short = _predictions(os.path.join(out, "eval", str(row), f"{task}.jsonl"))
            full = _predictions(os.path.join(run, "eval", str(row), f"{task}.jsonl"))
            assert len(short) == len(full)
            # One new token is a prefix of the six the recorded row generated.
            assert all(f.startswith(s.strip()) for s, f in zip(short, full, strict=True))
    assert any(
        _predictions(os.path.join(out, "eval", "2", f"{t}.jsonl"))
        != _predictions(os.path.join(run, "eval", "2", f"{t}.jsonl"))
        for t in results["tasks"]
    )


def test_eval_overrides_rescore_the_eval_only_tasks_too(tmp_path, capsys):
    stream = {"tasks": ["synthetic:parity", "synthetic:reverse"], "eval_only": ["synthetic:arithmetic"]}
    raw = tiny_config(tmp_path, eval={"max_new_tokens": 6}, stream=stream)
    recorded = run_experiment(config_from_dict(raw))
    run = raw["output_dir"]
    proc = retain_in_process("eval", run, "eval.max_new_tokens=1", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    out = os.path.join(run, "evals", "max_new_tokens=1")
    results = json.loads(open(os.path.join(out, "results.json")).read())
    general = results["general"]
    assert general["tasks"] == ["arithmetic"] and len(general["matrix"]) == 3
    assert all(row is not None and len(row) == 1 for row in general["matrix"])
    assert set(general["metrics"]) == set(recorded["general"]["metrics"])
    for row in range(3):
        short = _predictions(os.path.join(out, "eval", str(row), "general", "arithmetic.jsonl"))
        full = _predictions(os.path.join(run, "eval", str(row), "general", "arithmetic.jsonl"))
        assert len(short) == len(full)
        assert all(f.startswith(s.strip()) for s, f in zip(short, full, strict=True))
    # The stream's own columns stay the stream's.
    assert results["tasks"] == ["parity", "reverse"]
    assert not os.path.exists(os.path.join(out, "eval", "1", "arithmetic.jsonl"))


def test_eval_refuses_overrides_of_training_settings(tmp_path, capsys):
    raw = tiny_config(tmp_path, train={"max_steps": 1}, stream={"tasks": ["synthetic:parity"]})
    run_experiment(config_from_dict(raw))
    proc = retain_in_process("eval", raw["output_dir"], "train.learning_rate=1", capsys=capsys)
    assert proc.returncode == 2
    assert "takes only eval.* settings" in proc.stderr and "train" in proc.stderr
    assert not os.path.exists(os.path.join(raw["output_dir"], "evals"))


def test_verbose_is_accepted_after_the_subcommand(capsys):
    assert retain_in_process("methods", "-v", capsys=capsys).returncode == 0
    assert retain_in_process("-v", "methods", capsys=capsys).returncode == 0
