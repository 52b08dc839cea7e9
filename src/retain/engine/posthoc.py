"""Open a finished (or partly trained) run for the commands that work on it afterwards: merge, lines, export.

`open_run` reads the run's saved settings and state and `open_plan` its tasks, without loading a model;
`open_experiment` then builds the model, method and evaluation context exactly as `retain eval` does, so
`Experiment.restore(k)` puts them in the state the run evaluated after task k.
"""

from __future__ import annotations

import os

from retain.config import RunConfig, config_from_dict, read_yaml
from retain.engine.loop import Experiment
from retain.engine.plan import Plan, check_encoding, make_plan
from retain.engine.run_dir import RunDir, RunState
from retain.errors import RetainError
from retain.models.loading import load_encoders


def open_run(run_dir: str) -> tuple[RunConfig, RunDir, RunState]:
    """(config, RunDir, state) of a run directory that trained at least one task; a clear error otherwise."""
    config_file = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(config_file):
        raise RetainError(f"{run_dir} is not a retain run directory (no config.yaml)")
    raw = read_yaml(config_file)
    raw["output_dir"] = run_dir.replace("{", "{{").replace("}", "}}")  # a path, not a pattern
    config = config_from_dict(raw, source=config_file)
    folder = RunDir(run_dir)
    state = folder.load_state() if folder.exists() else None
    if state is None or state.trained < 1:
        raise RetainError(f"{run_dir} has no trained task yet (state.json records none); run it first")
    return config, folder, state


def open_plan(config: RunConfig) -> Plan:
    """The run's plan (method, tasks, test sets) checked against its tokenizer, without loading the model."""
    plan = make_plan(config)
    check_encoding(plan, *load_encoders(config.model.name_or_path, config.model.trust_remote_code))
    return plan


def open_experiment(config: RunConfig, folder: RunDir) -> Experiment:
    """The run's model, method and evaluation context, as `retain eval` builds them (before any restore)."""
    return Experiment(open_plan(config), folder)
