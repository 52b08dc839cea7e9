"""Experiment trackers (`train.report_to`): one tracker run per stream, on one global step axis.

transformers' own integrations start a run per Trainer, i.e. per task; here each task's Trainer gets a
callback that forwards its log dict (the Trainer's `loss`, `grad_norm`, ... under `train/`, and the method's
own losses such as `loss/task`, `ewc/penalty` as named) to the stream's trackers at `offset + step`, where
the offset is the number of optimizer steps of the earlier tasks, read from their saved training logs so
that a resumed run continues the same numbering. Each evaluation row is logged as `eval/<task>` at the
step where its task ended, the CL metrics of results.json as `cl/<metric>` at the last step. Only the main
process logs. Backends write inside the run directory, offline unless the user's environment says
otherwise:

- tensorboard: `<run_dir>/tracking/tensorboard` (torch.utils.tensorboard);
- wandb: `<run_dir>/tracking/wandb`, mode `offline` unless WANDB_MODE is set;
- mlflow: the file store `<run_dir>/tracking/mlruns` unless MLFLOW_TRACKING_URI is set.

The wandb and mlflow run ids are kept in `<run_dir>/tracking/runs.json`, so a resumed run logs into the
same tracker run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import time
import uuid
from typing import Any

from transformers import TrainerCallback

from retain.config import RunConfig, config_to_dict, dump_config, report_to
from retain.errors import RetainError
from retain.io import write_json_atomic

logger = logging.getLogger(__name__)

# tracker -> (the module it needs, the pip line that installs it)
REQUIREMENTS = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}


def check_trackers(config: RunConfig) -> list[str]:
    """The trackers `train.report_to` names; one whose package is missing is refused with its pip line."""
    names = report_to(config.train)
    for name in names:
        module, install = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise RetainError(
                f"config: train.report_to names {name}, but the {module} package is not installed; "
                f"run `{install}`, or set train.report_to: none"
            )
    return names


def steps_in_log(log: list[dict]) -> int:
    """The optimizer steps a task trained, from its training log (Trainer.state.log_history); 0 if none."""
    return max((int(entry["step"]) for entry in log if "step" in entry), default=0)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


class Tracker:
    """One backend's run of the stream: scalars at a global step (the run's config is recorded when it
    starts afresh)."""

    def log(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        """Make what was logged so far durable (a killed run keeps it)."""

    def close(self, failed: bool = False) -> None:
        """End the run (marked failed when the stream stopped on an error)."""


class TensorBoardTracker(Tracker):
    def __init__(self, folder: str, config: RunConfig, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # A resumed run retrains its unfinished task: purge_step hides the points the killed start logged
        # for it, so the numbering continues without duplicates.
        fresh = not (os.path.isdir(folder) and os.listdir(folder))
        self.writer = SummaryWriter(log_dir=folder, purge_step=purge_step)
        if fresh:
            self.writer.add_text("config", "```yaml\n" + dump_config(config) + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, folder: str, config: RunConfig, run_id: str, resumed: bool) -> None:
        import wandb

        os.makedirs(folder, exist_ok=True)
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "retain"),
            name=os.path.basename(os.path.abspath(config.output_dir)),
            id=run_id,
            resume="allow",
            dir=folder,
            mode=os.environ.get("WANDB_MODE", "offline"),
            config=None if resumed else config_to_dict(config),
            settings=wandb.Settings(console="off"),
            reinit="create_new",
        )
        # wandb refuses a step below one it has seen; a resumed run retrains its unfinished task, so the
        # x axis is our own global_step, as transformers' integration does.
        self.run.define_metric("global_step")
        self.run.define_metric("*", step_metric="global_step", step_sync=True)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log({**values, "global_step": step})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# MLflow allows letters, digits and _ - . / and spaces in a metric name; task names may hold others.
_MLFLOW_UNSAFE = re.compile(r"[^\w\-. /]")


class MlflowTracker(Tracker):
    def __init__(self, folder: str, config: RunConfig, run_id: str | None) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store (no server, no database) behind an opt-in; retain's default is
            # offline, inside the run directory.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file://" + folder
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return
            except Exception:  # e.g. MLFLOW_TRACKING_URI now points elsewhere: a new run there
                logger.warning("mlflow run %s is not in %s; starting a new mlflow run", run_id, uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "retain")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        run_name = os.path.basename(os.path.abspath(config.output_dir))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        self.client.log_text(self.run_id, dump_config(config), "config.yaml")

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(_MLFLOW_UNSAFE.sub("_", k), v, now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class _StepsToTrackers(TrainerCallback):
    """Forwards one task's Trainer logs to the stream's trackers at the stream's global step."""

    def __init__(self, tracking: Tracking, index: int) -> None:
        self.tracking, self.index = tracking, index

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            values = {key if "/" in key else f"train/{key}": v for key, v in _numbers(logs).items()}
            self.tracking.log(
                {**values, "task": float(self.index)}, self.tracking.start(self.index) + state.global_step
            )


class Tracking:
    """The stream's tracker runs and its step clock: `ends[k]` is the global step at which unit k ended."""

    def __init__(self, trackers: list[Tracker] | None = None, ends: list[int] | None = None) -> None:
        self.trackers, self.ends = list(trackers or []), list(ends or [0])

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def start(self, index: int) -> int:
        """The global step before unit `index` (1-based) trains."""
        return self.ends[index - 1]

    def callback(self, index: int) -> TrainerCallback:
        """The callback that logs unit `index`'s training into the stream's runs."""
        return _StepsToTrackers(self, index)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def trained(self, index: int, log: list[dict]) -> None:
        """Unit `index` finished with training log `log`: its end step, and what the method logged after."""
        if not self.active:
            return
        del self.ends[index:]
        self.ends.append(self.ends[index - 1] + steps_in_log(log))
        after = {
            f"after_task/{k}": v for entry in log for k, v in _numbers(entry.get("after_task", {})).items()
        }
        if after:
            self.log(after, self.ends[index])
        self.flush()

    def row(self, row: int, tasks: list[str], scores: list[float] | None, general: bool = False) -> None:
        """Row `row` of the accuracy matrix (`eval/<task>`), or with `general` of the eval-only tasks'
        matrix (`general/<task>`), at the step where unit `row` ended."""
        if scores is None or not self.active:
            return
        prefix = "general" if general else "eval"
        values = {f"{prefix}/{task}": float(score) for task, score in zip(tasks, scores, strict=True)}
        self.log({**values, f"{prefix}/row": float(row)}, self.ends[row])
        self.flush()

    def metrics(self, metrics: dict[str, float | None]) -> None:
        """results.json's CL metrics, at the last step."""
        values = {f"cl/{name}": float(v) for name, v in metrics.items() if v is not None}
        if values and self.active:
            self.log(values, self.ends[-1])
        self.flush()

    def flush(self) -> None:
        for tracker in self.trackers:
            tracker.flush()

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception:  # a tracker that cannot finish must not hide the run's own outcome
                logger.exception("closing a tracker failed")
        self.trackers = []


def open_tracking(config: RunConfig, run_path: str, logs: list[list[dict]], resumed: bool) -> Tracking:
    """The stream's trackers, on the main process: `logs` are the saved training logs of the units
    trained so far (unit 1 first), which fix the step numbering; `resumed` when the run started before."""
    ends = [0]
    for log in logs:
        ends.append(ends[-1] + steps_in_log(log))
    names = check_trackers(config)
    if not names:
        return Tracking([], ends)
    folder = os.path.join(run_path, "tracking")
    os.makedirs(folder, exist_ok=True)
    ids_path = os.path.join(folder, "runs.json")
    ids = _read_ids(ids_path)
    tracking = Tracking([], ends)
    # Training resumes after the last saved task: what a killed start logged beyond it is replaced.
    purge = ends[-1] + 1 if resumed else None
    try:
        for name in names:
            if name == "tensorboard":
                tracking.trackers.append(
                    TensorBoardTracker(os.path.join(folder, "tensorboard"), config, purge)
                )
            elif name == "wandb":
                known = "wandb" in ids
                ids.setdefault("wandb", uuid.uuid4().hex[:12])
                write_json_atomic(ids_path, ids)
                tracking.trackers.append(WandbTracker(folder, config, ids["wandb"], known))
            elif name == "mlflow":
                tracker = MlflowTracker(os.path.join(folder, "mlruns"), config, ids.get("mlflow"))
                ids["mlflow"] = tracker.run_id
                write_json_atomic(ids_path, ids)
                tracking.trackers.append(tracker)
    except BaseException:
        tracking.close(failed=True)  # the ones already started
        raise
    logger.info("tracking with %s in %s", ", ".join(names), folder)
    return tracking


def _read_ids(path: str) -> dict[str, str]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return dict(json.load(handle))
    except (OSError, ValueError):
        logger.warning("%s is unreadable; the trackers start new runs", path)
        return {}
