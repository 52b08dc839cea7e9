"""End-to-end tests of the `retain` command on the tiny random model: workflow, errors, resume, locking."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import time

import pytest

from retain import cli
from retain.config import config_from_dict, load_config
from retain.engine.loop import run_experiment

from .helpers import ENV, RETAIN, assert_same, retain, retain_in_process, tiny_config, write_config


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def predictions(run) -> dict[str, list[str]]:
    """Every prediction of a run, by eval file."""
    out = {}
    for root, _, files in os.walk(os.path.join(run, "eval")):
        for name in files:
            with open(os.path.join(root, name)) as handle:
                rel = os.path.relpath(os.path.join(root, name), run)
                out[rel] = [json.loads(line)["prediction"] for line in handle if line.strip()]
    return out


def test_run_writes_the_run_directory_and_metrics_reads_it(tmp_path, capsys):
    config = write_config(tmp_path)
    proc = retain("run", config)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    for name in ("config.yaml", "state.json", "results.json", "report.md", "accuracy_matrix.png"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["tasks"] == ["parity", "capital_letters"]
    assert len(results["matrix"]) == 3
    assert set(results["metrics"]) >= {"last", "avg", "bwt", "fwt", "forgetting", "plasticity"}
    lines = (run / "eval" / "2" / "parity.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"prompt", "prediction", "reference", "score"}
    assert (run / "tasks" / "1-parity" / "adapter" / "adapter_model.safetensors").is_file()

    proc = retain_in_process("metrics", str(run / "results.json"), "--json", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == pytest.approx(results["metrics"])


def test_metrics_of_any_json_holding_a_matrix(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"matrix": [[0.0, 0.0], [0.8, 0.1], [0.5, 0.9]]}))
    proc = retain("metrics", str(path), "--json")
    metrics = json.loads(proc.stdout)
    assert metrics["bwt"] == pytest.approx(-0.3)
    assert metrics["fwt"] == pytest.approx(0.1)
    assert metrics["last"] == pytest.approx(0.7)


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    config = write_config(tmp_path)
    proc = retain_in_process(
        "run", config, "--dry-run", "method.name=replay", "train.learning_rate=1e-4", capsys=capsys
    )
    assert proc.returncode == 0, proc.stderr
    for needle in ("replay", "parity", "capital_letters", "dry run", str(tmp_path / "run")):
        assert needle in proc.stdout
    assert not (tmp_path / "run").exists()


def test_dry_run_shows_the_global_batch_for_the_launched_processes(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path)  # 4 per device
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun --nproc_per_node 2 sets

    def dry(*overrides: str) -> str:
        proc = retain_in_process("run", config, "--dry-run", *overrides, capsys=capsys)
        assert proc.returncode == 0, proc.stderr
        return " ".join(proc.stdout.split())

    out = dry()
    assert "8 examples per step = 4 per device x 2 process(es) x 1 accumulation step(s)" in out
    assert "set train.global_batch_size" in out
    out = dry("train.global_batch_size=4")
    assert "4 examples per step = 2 per device x 2 process(es) x 1 accumulation step(s)" in out
    assert "set train.global_batch_size" not in out


def test_dry_run_shows_the_strategy_and_the_memory_per_process(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path, method="lwf")
    monkeypatch.setenv("WORLD_SIZE", "2")
    proc = retain_in_process("run", config, "--dry-run", capsys=capsys)
    assert proc.returncode == 0, proc.stderr
    out = " ".join(proc.stdout.split())
    assert "strategy DDP on 2 process(es)" in out
    for needle in ("memory per process under DDP", "adapter (4,096 parameters)", "lwf: teacher", "total:"):
        assert needle in out
    refused = retain_in_process("run", config, "--dry-run", "train.fsdp=full_shard", capsys=capsys)
    assert refused.returncode != 0 and "method 'lwf' is refused under FSDP" in refused.stderr


def test_methods_strategies_prints_the_compatibility_table(capsys):
    proc = retain_in_process("methods", "--strategies", capsys=capsys)
    assert proc.returncode == 0
    assert proc.stdout.startswith("| method | single | DDP | FSDP | ZeRO-0")
    assert "| `sequential` |" in proc.stdout


def test_dry_run_of_a_combination_shows_every_component(tmp_path, capsys):
    config = write_config(tmp_path)
    proc = retain_in_process(
        "run", config, "--dry-run", "method.name=replay", "method.plus=[ewc]", capsys=capsys
    )
    assert proc.returncode == 0, proc.stderr
    assert "replay ReplayConfig" in proc.stdout and "ewc EWCConfig" in proc.stdout


def test_methods_lists_names_and_hyper_parameters(capsys):
    proc = retain_in_process("methods", capsys=capsys)
    assert proc.returncode == 0
    for needle in (
        "sequential",
        "multitask",
        "replay",
        "ewc",
        "lwf",
        "ewc_lambda",
        "replay_ratio",
        "temperature",
    ):
        assert needle in proc.stdout


def test_train_then_eval_fills_the_same_matrix_as_run(tmp_path):
    config = write_config(tmp_path)
    expected = run_experiment(load_config(config))  # the reference: `retain run`'s own loop, in process

    other = tmp_path / "second"
    other.mkdir()
    config2 = write_config(other)
    proc = retain("train", config2)
    assert proc.returncode == 0, proc.stderr
    assert not (other / "run" / "results.json").exists()
    proc = retain("eval", str(other / "run"))
    assert proc.returncode == 0, proc.stderr
    got = json.loads((other / "run" / "results.json").read_text())
    assert_same(got, expected)
    assert predictions(other / "run") == predictions(tmp_path / "run")


# Bad input of every kind (config values, data files, paths, usage): tests/test_user_errors.py.


def test_a_path_error_from_deep_inside_is_one_error_line(monkeypatch, capsys):
    def unwritable(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/runs/x/state.json")

    monkeypatch.setattr(cli, "cmd_metrics", unwritable)
    assert cli.main(["metrics", "whatever.json"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: /srv/runs/x/state.json: Permission denied")
    assert "output_dir" in lines[0]


def test_an_oserror_that_is_no_path_mistake_keeps_its_traceback(monkeypatch):
    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "cmd_metrics", broken)
    with pytest.raises(OSError, match="Input/output"):
        cli.main(["metrics", "whatever.json"])


def test_heatmap_colour_bar_is_in_percent_like_its_cells(tmp_path):
    from retain.evaluation.report import matrix_figure

    figure = matrix_figure({"tasks": ["a", "b"], "matrix": [[0.1, 0.2], [0.9, 0.5], None], "method": "x"})
    (image,) = figure.axes[0].get_images()
    assert image.get_clim() == (0.0, 100.0)
    cells = sorted(text.get_text() for text in figure.axes[0].texts)
    assert cells == ["10.0", "20.0", "50.0", "90.0"]
    assert "%" in figure.axes[1].get_ylabel()


def _start(config: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*RETAIN, "run", config],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def _trained(run) -> int:
    try:
        return json.loads((run / "state.json").read_text())["trained"]
    except (OSError, ValueError, KeyError):
        return -1


def test_a_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path):
    slow = {
        "train": {"max_steps": 60},
        "stream": {
            "train_size": 64,
            "test_size": 6,
            "tasks": ["synthetic:parity", "synthetic:capital_letters", "synthetic:reverse"],
        },
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = tiny_config(tmp_path / "a", method="ewc", params={"fisher_samples": 8}, **slow)
    expected = run_experiment(config_from_dict(whole))  # the uninterrupted run, in this process

    config = write_config(tmp_path / "b", method="ewc", params={"fisher_samples": 8}, **slow)
    run = tmp_path / "b" / "run"
    proc = _start(config)
    _wait_for(lambda: _trained(run) >= 1)
    time.sleep(0.5)  # into task 2's training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "results.json").exists()
    resumed = retain("run", config)
    assert resumed.returncode == 0, resumed.stderr
    got = json.loads((run / "results.json").read_text())
    assert_same(got, expected)
    assert predictions(run) == predictions(tmp_path / "a" / "run")


def test_resuming_with_other_settings_is_refused(tmp_path, capsys):
    config = write_config(tmp_path)
    assert retain("train", config).returncode == 0
    refused = retain_in_process("run", config, "train.learning_rate=0.1", capsys=capsys)  # refused unread
    assert_user_error(refused, "learning_rate", "another output_dir")
