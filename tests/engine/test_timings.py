"""A task's recorded seconds count the work a method does before the Trainer starts (rft's rollout
filter, lamol's pseudo-samples, osft's decompositions), so report.html and `retain compare` show it."""

from __future__ import annotations

import os
import time

import pytest

from retain.config import config_from_dict
from retain.engine.loop import run_experiment
from retain.evaluation.compare import RunSummary
from retain.methods.base import ContinualMethod
from retain.methods.registry import register

from ..helpers import tiny_config

HOOK_SLEEP_S = 0.25


@register("_slow_preparation")
class SlowPreparation(ContinualMethod):
    """Sleeps in both preparation hooks, as methods that generate or decompose before training do."""

    def before_task(self, ctx, task):
        time.sleep(HOOK_SLEEP_S)
        super().before_task(ctx, task)

    def training_data(self, ctx, task, data):
        time.sleep(HOOK_SLEEP_S)
        return super().training_data(ctx, task, data)


def test_a_tasks_preparation_is_timed_and_counted_in_the_runs_wall_time(tmp_path):
    raw = tiny_config(tmp_path, "_slow_preparation", train={"max_steps": 1})
    timings = run_experiment(config_from_dict(raw))["timings"]
    for k in (1, 2):
        assert timings[f"prepare_s/{k}"] >= 2 * HOOK_SLEEP_S
        assert f"train_s/{k}" in timings
    parts = ("prepare_s/", "train_s/", "eval_s/")
    counted = timings["model_load_s"] + sum(v for key, v in timings.items() if key.startswith(parts))
    summary = RunSummary.from_dir(raw["output_dir"])
    assert summary.seconds == pytest.approx(counted)
    assert summary.seconds >= 4 * HOOK_SLEEP_S
    with open(os.path.join(raw["output_dir"], "report.html"), encoding="utf-8") as page:
        assert "prepare (s)" in page.read()
