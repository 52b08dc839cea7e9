"""train.report_to: one tracker run per stream on one global step axis (the method's losses, each
evaluation row, the CL metrics), continued by a resumed run; a missing tracker package refused at plan
time; warmup_steps and optim in TrainingArguments; the task on the progress bar."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct
import time

import pytest
import torch
from transformers import Trainer, TrainingArguments

from retain.config import config_from_dict
from retain.engine import trackers
from retain.engine.loop import run_experiment, training_arguments
from retain.engine.plan import make_plan
from retain.engine.run_dir import RunDir
from retain.engine.trainer import ContinualTrainer
from retain.errors import RetainError
from retain.methods.registry import create_method
from retain.runtime import batch_layout
from tests.helpers import crash_then_resume, tiny_config, tiny_context, train_one_task

TASKS = ["parity", "capital_letters"]
STEPS = 6  # tiny_config: max_steps per task, logging every 2 steps


def installed(module: str):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None, reason=f"{module} is not installed")


def ewc_config(tmp_path, report_to: str) -> dict:
    return tiny_config(tmp_path, "ewc", train={"report_to": report_to})


def scalars(run: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run's TensorBoard log: tag -> [(step, value)], as TensorBoard shows them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(run, "tracking", "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@installed("tensorboard")
def test_tensorboard_holds_method_losses_rows_and_metrics_on_one_step_axis(tmp_path):
    raw = ewc_config(tmp_path, "tensorboard")
    results = run_experiment(config_from_dict(raw))
    logged = scalars(raw["output_dir"])
    steps = lambda tag: [step for step, _ in logged[tag]]  # noqa: E731
    # The global step continues across tasks: task 2's steps 2, 4, 6 are the stream's 8, 10, 12.
    assert steps("train/loss") == [2, 4, 6, 8, 10, 12]
    assert steps("loss/task") == [2, 4, 6, 8, 10, 12]
    assert steps("ewc/penalty") == [8, 10, 12]  # EWC's penalty exists from task 2 on
    assert [v for s, v in logged["task"] if s in (2, 8)] == [1.0, 2.0]
    # Row k of the matrix at the step where task k ended; the CL metrics at the last step.
    for column, task in enumerate(TASKS):
        got = logged[f"eval/{task}"]
        assert [s for s, _ in got] == [0, STEPS, 2 * STEPS]
        assert [v for _, v in got] == pytest.approx([row[column] for row in results["matrix"]])
    for name, value in results["metrics"].items():
        assert logged[f"cl/{name}"] == [(2 * STEPS, pytest.approx(value))]
    assert "after_task/ewc/fisher_mean" in logged


@installed("tensorboard")
def test_the_eval_only_tasks_rows_are_logged_apart_from_the_stream_s(tmp_path):
    raw = tiny_config(
        tmp_path,
        "sequential",
        train={"report_to": "tensorboard"},
        stream={"eval_only": [{"test": "synthetic:max_number", "test_size": 4}]},
    )
    results = run_experiment(config_from_dict(raw))
    logged = scalars(raw["output_dir"])
    got = logged["general/max_number"]
    assert [s for s, _ in got] == [0, STEPS, 2 * STEPS]
    assert [v for _, v in got] == pytest.approx([row[0] for row in results["general"]["matrix"]])
    assert "eval/max_number" not in logged


@installed("tensorboard")
def test_a_run_killed_inside_a_task_resumes_on_the_same_steps(tmp_path, monkeypatch):
    """Killed after task 2's steps were logged but before its checkpoint: the resumed run retrains task 2
    at the same global steps, and TensorBoard shows each step once, with the uninterrupted run's values."""
    whole = ewc_config(tmp_path / "whole", "tensorboard")
    run_experiment(config_from_dict(whole))
    raw = ewc_config(tmp_path / "killed", "tensorboard")
    real_train = ContinualTrainer.train

    def train_then_die(self, *args, **kwargs):
        out = real_train(self, *args, **kwargs)
        if self.ctx.task_index == 2:
            raise KeyboardInterrupt("killed before task 2's checkpoint")
        return out

    monkeypatch.setattr(ContinualTrainer, "train", train_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config_from_dict(raw))
    assert [s for s, _ in scalars(raw["output_dir"])["train/loss"]] == [2, 4, 6, 8, 10, 12]
    monkeypatch.setattr(ContinualTrainer, "train", real_train)
    run_experiment(config_from_dict(raw))
    got, want = scalars(raw["output_dir"]), scalars(whole["output_dir"])
    for tag in ("train/loss", "ewc/penalty", "eval/parity", "eval/capital_letters", "cl/last"):
        assert [s for s, _ in got[tag]] == [s for s, _ in want[tag]], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in want[tag]], abs=1e-5), tag


@installed("tensorboard")
def test_resume_after_a_crash_between_tasks_continues_the_numbering(tmp_path, monkeypatch):
    raw = ewc_config(tmp_path, "tensorboard")
    crash_then_resume(raw, monkeypatch)
    logged = scalars(raw["output_dir"])
    # Task 2 trained in the second start, its offset read from task 1's saved training log.
    assert [s for s, _ in logged["train/loss"]] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in logged["eval/parity"]] == [0, STEPS, 2 * STEPS]


def wandb_records(path: str) -> list:
    """The records of an offline W&B file: a 7-byte header, then a LevelDB-style log of wandb Records."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks, records = open(path, "rb").read(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or its last piece
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def wandb_history(run: str) -> list[dict]:
    """The history rows of the run's offline W&B file, once wandb's service has written its exit record
    (run.finish() can return before the service has written everything)."""
    (path,) = glob.glob(os.path.join(run, "tracking", "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.monotonic() + 60
    records = wandb_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.5)
        records = wandb_records(path)
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


@installed("wandb")
def test_wandb_offline_run_holds_the_stream(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is retain's default
    raw = ewc_config(tmp_path, "wandb")
    results = run_experiment(config_from_dict(raw))
    rows = wandb_history(raw["output_dir"])
    at = lambda key: [row["global_step"] for row in rows if key in row]  # noqa: E731
    assert at("train/loss") == [2, 4, 6, 8, 10, 12]
    assert at("ewc/penalty") == [8, 10, 12]
    assert at("eval/parity") == [0, STEPS, 2 * STEPS]
    assert [row["cl/last"] for row in rows if "cl/last" in row] == [pytest.approx(results["metrics"]["last"])]
    ids = json.load(open(os.path.join(raw["output_dir"], "tracking", "runs.json")))
    (folder,) = glob.glob(os.path.join(raw["output_dir"], "tracking", "wandb", "offline-run-*"))
    assert folder.endswith("-" + ids["wandb"])  # the id a resumed run continues


@installed("mlflow")
def test_mlflow_file_store_keeps_one_run_across_a_resume(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # restored after the test
    raw = ewc_config(tmp_path, "mlflow")
    results = crash_then_resume(raw, monkeypatch)
    tracking = os.path.join(raw["output_dir"], "tracking")
    client = MlflowClient("file://" + os.path.join(tracking, "mlruns"))
    (run,) = client.search_runs([client.get_experiment_by_name("retain").experiment_id])
    assert run.info.run_id == json.load(open(os.path.join(tracking, "runs.json")))["mlflow"]
    assert run.info.status == "FINISHED"
    history = lambda key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]  # noqa: E731
    assert [s for s, _ in sorted(history("train/loss"))] == [2, 4, 6, 8, 10, 12]
    assert [s for s, _ in history("ewc/penalty")] == [8, 10, 12]
    assert history("cl/last") == [(2 * STEPS, pytest.approx(results["metrics"]["last"]))]


def test_a_missing_tracker_package_is_refused_before_the_run_starts(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    raw = tiny_config(tmp_path, train={"report_to": "tensorboard,wandb"})
    with pytest.raises(RetainError, match=r"report_to names wandb.*pip install wandb"):
        make_plan(config_from_dict(raw))
    assert not os.path.exists(raw["output_dir"])


def test_warmup_steps_and_optim_reach_the_trainer(tmp_path):
    def arguments(**train) -> TrainingArguments:
        config = config_from_dict(tiny_config(tmp_path, train=train))
        return training_arguments(config, RunDir(str(tmp_path)), 1, False, batch_layout(config.train, 1))

    assert arguments(warmup_ratio=0.5).get_warmup_steps(100) == 50
    assert arguments(warmup_ratio=0.5, warmup_steps=3).get_warmup_steps(100) == 3
    args = arguments(optim="sgd")
    assert Trainer.get_optimizer_cls_and_kwargs(args)[0] is torch.optim.SGD
    assert args.report_to in ([], "none", ["none"])  # trackers are retain's own, one run per stream


def test_the_progress_bar_names_the_task(tmp_path, capsys):
    ctx, tasks = tiny_context(tmp_path)
    train_one_task(
        ctx,
        tasks,
        create_method("sequential", {}),
        tmp_path / "out",
        examples=tasks[0].train[:8],
        progress_label="task 2/3 parity",
        per_device_train_batch_size=4,
        max_steps=2,
        disable_tqdm=False,
    )
    assert "task 2/3 parity" in capsys.readouterr().err
