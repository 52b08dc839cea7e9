"""`retain sweep`: methods x orders x seeds as ordinary run directories under one parent, run one or N at a
time in their own processes; a failed run is reported and the others finish; a rerun skips finished runs;
summary.md / summary.json group the seeds with their intervals."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from retain.engine import sweep
from retain.engine.sweep import describe, parse_seeds, plan_sweep, run_sweep
from retain.errors import RetainError
from tests.helpers import tiny_config


def sweep_config(tmp_path, section: dict | None = None, **sections) -> str:
    """The tiny 2-task config (2 steps a task, 8 examples) with an optional `sweep:` section."""
    raw = tiny_config(tmp_path, **sections)
    raw["train"]["max_steps"] = 2
    raw["stream"].update(train_size=8, test_size=4)
    raw["eval"]["before_training"] = False
    raw.pop("output_dir")
    if section is not None:
        raw["sweep"] = section
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_seeds_are_a_count_from_the_config_seed_or_a_list():
    assert parse_seeds(3, 42) == [42, 43, 44] and parse_seeds("2", 7) == [7, 8]
    assert parse_seeds("1,5,9", 42) == [1, 5, 9] and parse_seeds([4, 2], 0) == [4, 2]
    assert parse_seeds(None, 42) == [42]
    for bad in (0, "1,x", "1,1"):
        with pytest.raises(RetainError, match="seed"):
            parse_seeds(bad, 42)


def test_plan_lays_out_methods_orders_and_seeds_under_one_parent(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = sweep_config(tmp_path)
    overrides = ["train.learning_rate=1e-3"]
    plan = plan_sweep(config, overrides, seeds=2, orders="1-0,0-1", methods="sequential,lwf")
    assert plan.parent == os.path.join("runs", "tiny-sweep") and len(plan.runs) == 8
    first = plan.runs[0]
    assert first.label == "sequential/1-0/seed3"
    assert first.output_dir == os.path.join("runs", "tiny-sweep", "sequential", "1-0", "seed3")
    assert [t.name for t in first.config.stream.tasks] == ["capital_letters", "parity"]
    assert first.config.train.learning_rate == 1e-3 and first.config.seed == 3
    assert first.log_path == first.output_dir + ".log"
    assert {(r.method, r.order, r.seed) for r in plan.runs} == {
        (m, o, s) for m in ("sequential", "lwf") for o in ("1-0", "0-1") for s in (3, 4)
    }
    listing = describe(plan)
    assert "8 runs under runs/tiny-sweep" in listing and listing.count("to run") == 8
    assert not os.path.exists(plan.parent)  # a dry run writes nothing


def test_sweep_section_is_read_and_the_command_line_wins(tmp_path):
    section = {"seeds": [5, 6], "methods": ["lwf", {"name": "lwf", "label": "lwf-t1", "temperature": 1.0}]}
    config = sweep_config(tmp_path, section)
    plan = plan_sweep(config, parent=str(tmp_path / "p"))
    assert [r.label for r in plan.runs] == ["lwf/seed5", "lwf/seed6", "lwf-t1/seed5", "lwf-t1/seed6"]
    assert plan.runs[2].config.method.params == {"temperature": 1.0}
    assert [r.label for r in plan_sweep(config, seeds=1, methods="ewc").runs] == ["ewc/seed3"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"orders": "0-0"}, "not a permutation of the 2 tasks"),
        ({"orders": "order1"}, "names a benchmark order, but the stream is a task list"),
        ({"methods": "lwff"}, "unknown method 'lwff'.*did you mean: lwf"),
        ({"methods": "lwf,lwf"}, "two runs would share"),
        ({"parallel": -1}, "parallel must be at least 1"),
    ],
)
def test_plan_refuses_mistakes_before_anything_runs(tmp_path, kwargs, message):
    with pytest.raises(RetainError, match=message):
        plan_sweep(sweep_config(tmp_path), **kwargs)


def test_unknown_sweep_key_is_refused(tmp_path):
    with pytest.raises(RetainError, match="unknown key 'sweep.seed'"):
        plan_sweep(sweep_config(tmp_path, {"seed": 3}))


def test_sweep_runs_in_parallel_reports_a_failure_and_resumes(tmp_path, monkeypatch):
    """A method x 2 seeds plus a method whose settings fail at run time, 2 at a time: 2 run dirs, a
    summary of 1 group of n=2 and the failures' output; a rerun starts no process. (Each run is its own
    process, mostly imports: kept to 4 processes.)"""
    bad = {"name": "lwf", "label": "lwf-bad", "temperature": -1.0}
    config = sweep_config(tmp_path, {"seeds": 2, "methods": ["sequential", bad], "parallel": 2})
    parent = tmp_path / "sweep"
    plan = plan_sweep(config, parent=str(parent))
    said: list[str] = []
    outcomes = run_sweep(plan, echo=said.append)
    assert [o.status for o in outcomes] == ["done"] * 2 + ["failed"] * 2, said
    # Two at a time: the second run starts before the first one ends.
    assert said[0].endswith(f"started (log: {plan.runs[0].log_path})") and "started" in said[1], said
    for run in plan.runs[:2]:
        assert os.path.isfile(os.path.join(run.output_dir, "results.json"))
    failure = outcomes[2]
    assert failure.returncode == 2 and "lwf needs lwf_alpha >= 0 and temperature > 0" in failure.tail
    summary = json.loads((parent / "summary.json").read_text())
    assert [(g["name"], g["n"]) for g in summary["groups"]] == [("sequential", 2)]
    assert summary["groups"][0]["metrics"]["last"]["n"] == 2
    assert [r["status"] for r in summary["runs"]].count("failed") == 2
    markdown = (parent / "summary.md").read_text()
    assert "2 ran now, 0 finished before, 2 failed" in markdown
    assert "### lwf-bad/seed3 (exit code 2)" in markdown
    page = (parent / "summary.html").read_text()
    assert "retain compare: 2 run(s), 1 setting(s)" in page and "sequential/seed3/report.html" in page

    def no_process(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    again = plan_sweep(config, methods="sequential", parent=str(parent))
    assert [o.status for o in run_sweep(again, echo=said.append)] == ["finished"] * 2
    assert "0 ran now, 2 finished before, 0 failed" in (parent / "summary.md").read_text()
    assert describe(again).count("finished (skipped)") == 2


def test_threads_split_the_cores_between_parallel_runs(monkeypatch):
    monkeypatch.setattr(sweep.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert sweep._threads(1) == 16 and sweep._threads(4) == 4 and sweep._threads(32) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert sweep._threads(4) == 2


def test_benchmark_orders_are_checked_against_the_benchmark(tmp_path):
    config = sweep_config(tmp_path, stream={"benchmark": "LNT", "tasks": []})
    plan = plan_sweep(config, orders="order1,order2", parent="p")
    assert [r.label for r in plan.runs] == ["sequential/order1/seed3", "sequential/order2/seed3"]
    assert plan.runs[1].config.stream.benchmark_order == "order2"
    with pytest.raises(RetainError, match="LNT has no order 'order9'"):
        plan_sweep(config, orders="order9")
    with pytest.raises(RetainError, match="is a permutation, but the stream is benchmark LNT"):
        plan_sweep(config, orders="1-0")
