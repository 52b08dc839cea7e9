"""The run state (state.json) and the resolved method settings: what ran is recorded and guards a resume."""

from __future__ import annotations

import json

import pytest
import yaml

from retain.config import config_from_dict, config_to_dict, dump_config
from retain.engine.loop import run_experiment
from retain.engine.plan import make_plan
from retain.engine.run_dir import RunDir, RunState
from retain.errors import RetainError
from retain.io import write_text_atomic
from retain.methods.registry import create_method, resolved_settings

from ..helpers import tiny_config


def test_run_state_round_trips_through_state_json_with_its_documented_keys(tmp_path):
    run_dir = RunDir(str(tmp_path / "run"))
    state = RunState(tasks=["parity", "capital_letters"])
    state.trained = 1
    state.set_row(0, [0.25, 0.5])
    state.timings["train_s/1"] = 1.5
    run_dir.save_state(state)
    with open(run_dir.state_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    keys = {"tasks", "trained", "rows", "timings", "num_processes", "adapters", "retain_version"}
    keys.add("fingerprints")
    keys.add("general_rows")  # stream.eval_only's rows, apart from the matrix's
    keys.add("strategy")  # the training strategy of the last unit, and whether it left parameters sharded
    assert set(saved) == keys
    assert saved["rows"] == {"0": [0.25, 0.5]}
    loaded = run_dir.load_state()
    assert loaded == state
    assert loaded.has_row(0) and not loaded.has_row(1)
    assert loaded.matrix(3) == [[0.25, 0.5], None, None]


def test_run_state_reads_a_state_file_with_keys_it_does_not_know():
    state = RunState.from_dict({"tasks": ["a"], "trained": 0, "rows": {}, "timings": {}, "later_key": 1})
    assert state.tasks == ["a"] and state.trained == 0 and state.num_processes == 1


def test_config_yaml_and_results_record_every_method_setting_of_every_component(tmp_path):
    params = {"memory_size": 4, "plus": [{"name": "ewc", "ewc_lambda": 7.0, "fisher_samples": 4}]}
    results = run_experiment(config_from_dict(tiny_config(tmp_path, "replay", params)))
    replay = resolved_settings(create_method("replay", {"memory_size": 4}))
    ewc = resolved_settings(create_method("ewc", {"ewc_lambda": 7.0, "fisher_samples": 4}))
    expected = {**replay, "plus": [{"name": "ewc", **ewc}]}
    assert replay["replay_ratio"] == 0.2 and ewc["gamma"] == 1.0  # defaults nobody wrote are recorded
    assert results["method_params"] == expected
    with open(tmp_path / "run" / "config.yaml", encoding="utf-8") as handle:
        assert yaml.safe_load(handle)["method"]["params"] == expected
    assert results["task_id_at_test"] is False


def test_results_say_when_a_method_is_told_the_task_at_test_time(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, "clmoe"))
    plan = make_plan(config)
    assert plan.method.needs_task_id_at_test
    assert not make_plan(config_from_dict(tiny_config(tmp_path, "moelora"))).method.needs_task_id_at_test


def _saved_run(tmp_path, params: dict) -> RunDir:
    """A run directory whose config.yaml holds only the method settings the user wrote (as retain 0.1 did)."""
    config = config_from_dict(tiny_config(tmp_path, "ewc", params))
    run_dir = RunDir(config.output_dir)
    # trained >= 0: a start that never trained (trained = -1) is taken over whatever its settings.
    run_dir.save_state(RunState(tasks=["parity", "capital_letters"], trained=1))
    write_text_atomic(run_dir.config_path, dump_config(config))
    assert yaml.safe_load(dump_config(config))["method"]["params"] == params
    return run_dir


def test_a_run_saved_with_only_the_changed_settings_resumes_and_a_changed_setting_is_refused(tmp_path):
    run_dir = _saved_run(tmp_path, {"ewc_lambda": 7.0})

    def planned(params: dict):
        config = config_from_dict(tiny_config(tmp_path, "ewc", params))
        make_plan(config)  # resolves method.params, as `retain run` does
        return config

    same = planned({"ewc_lambda": 7.0})
    assert config_to_dict(same)["method"]["params"]["gamma"] == 1.0
    run_dir.check_resumable(same)
    run_dir.check_resumable(planned({"ewc_lambda": 7.0, "gamma": 1.0}))  # a default written out: same run
    with pytest.raises(RetainError, match=r"method\.params"):
        run_dir.check_resumable(planned({"ewc_lambda": 8.0}))
    with pytest.raises(RetainError, match=r"method\.params"):
        run_dir.check_resumable(planned({"ewc_lambda": 7.0, "gamma": 0.5}))


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default_and_not_at_another_value(tmp_path):
    config = config_from_dict(tiny_config(tmp_path, "sequential"))
    run_dir = RunDir(config.output_dir)
    run_dir.save_state(RunState(tasks=["parity", "capital_letters"], trained=1))
    saved = yaml.safe_load(dump_config(config))
    del saved["model"]["dtype"], saved["train"]["optim"]  # as a version without these settings wrote it
    write_text_atomic(run_dir.config_path, yaml.safe_dump(saved))
    run_dir.check_resumable(config)
    other = config_from_dict(tiny_config(tmp_path, "sequential", model={"dtype": "bfloat16"}))
    with pytest.raises(RetainError, match=r"model\.dtype: 'float32' -> 'bfloat16'"):
        run_dir.check_resumable(other)


def test_checkpoints_follow_the_umask_and_a_resume_after_row_0_says_so(tmp_path, caplog):
    import os
    import stat

    raw = tiny_config(tmp_path, "sequential")
    config = config_from_dict(raw)
    old = os.umask(0o022)
    try:
        run_experiment(config, train=False, evaluate=True)  # checkpoint 0 and row 0 only
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "run" / "tasks" / "0-init").st_mode)
    assert mode == 0o755, oct(mode)  # mkdtemp alone gives 0700
    with caplog.at_level("INFO", logger="retain"):
        run_experiment(config_from_dict(raw))
    assert "resuming" in caplog.text and "0 task(s) trained, rows evaluated: 0" in caplog.text
