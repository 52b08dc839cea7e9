"""The run directory: its layout, atomic writes, the resume point (state.json) and the single-writer lock.

<output_dir>/
  config.yaml            the resolved config, as run (method.params with every default)
  state.json             tasks trained, rows evaluated, timings: the resume point
  tasks/<k>-<task>/      adapter/ (PEFT format) or model/ (full fine-tuning), method_state.pt, train_log.json
  eval/<k>/<task>.jsonl  prompt, prediction, reference, score per test example
  eval/<k>/general/<task>.jsonl   the same for each eval-only task (stream.eval_only)
  results.json, report.md, accuracy_matrix.png, report.html (rewritten after every row)
  tracking/              tensorboard/, wandb/, mlruns/, runs.json (train.report_to)
  merges/<name>/, lines/<name>/   written later by `retain merge` / `retain lines` (adapter, eval, results)
  evals/<name>/          written later by `retain eval RUN eval.key=value` (eval, results)

docs/architecture.md describes the layout and the states a run goes through.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
import yaml

from retain import __version__
from retain.config import RunConfig, config_to_dict, dump_config
from retain.errors import RetainError
from retain.io import atomic_directory, try_lock, unlock, write_json_atomic, write_text_atomic
from retain.methods.registry import create_method, resolved_settings
from retain.models.adapters import load_trainable, save_trainable, weights_folder

# Settings that may change between a run and its resumption without changing its results. (Not
# eval.batch_size: under bf16 autocast the batch composition can flip a near-tie in greedy decoding.)
RESUME_MAY_CHANGE = {"train.logging_steps", "train.report_to", "output_dir"}

logger = logging.getLogger(__name__)

# Left behind by a kill: retain.io's temporary files (.<name>.<pid>.<hex>.tmp) and save_checkpoint's
# temporary folders (tasks/.<k>-*). Neither is ever read; both are removed when a run starts.
_TEMP_FILE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")
_TEMP_CHECKPOINT = re.compile(r"^\.\d+-")


def _bookkeeping(name: str) -> bool:
    """Lock files and stale temporaries: not content, so a folder holding only these is no one's run."""
    return name == ".lock" or name.startswith(".lock.") or bool(_TEMP_FILE.match(name))


@dataclass
class RunState:
    """Where a run stands (state.json): what is trained, which rows are evaluated, how long each took.

    `trained` is -1 before the initial checkpoint, then the number of units trained; `rows` maps a row
    index (as a string, the JSON key) to that row of the accuracy matrix, and `general_rows` to that row
    of the eval-only tasks' scores (stream.eval_only), kept apart so that `rows` keeps its meaning.
    """

    tasks: list[str]
    trained: int = -1
    rows: dict[str, list[float] | None] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    num_processes: int = 1
    adapters: list[str] = field(default_factory=list)
    retain_version: str = __version__
    # Content hashes of what the results depend on besides config.yaml (Plan.fingerprints): "method" (the
    # resolved settings) and "data" (task -> {"train", "test"}). Empty in a state file from before 0.3.
    fingerprints: dict[str, Any] = field(default_factory=dict)
    general_rows: dict[str, list[float] | None] = field(default_factory=dict)
    # The strategy the last trained unit ran under (retain.runtime.Strategy's name, label, processes,
    # offload) and whether its parameters were found sharded after training ("sharded_parameters").
    strategy: dict[str, Any] = field(default_factory=dict)

    def has_row(self, row: int) -> bool:
        return str(row) in self.rows

    def set_row(self, row: int, scores: list[float] | None) -> None:
        self.rows[str(row)] = scores

    def matrix(self, num_rows: int) -> list[list[float] | None]:
        """Rows 0..num_rows-1; None for a row not evaluated."""
        return [self.rows.get(str(i)) for i in range(num_rows)]

    def general_matrix(self, num_rows: int) -> list[list[float] | None]:
        """Rows 0..num_rows-1 of the eval-only tasks' scores; None for a row not evaluated."""
        return [self.general_rows.get(str(i)) for i in range(num_rows)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunState:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def resolved_params(method: dict[str, Any]) -> Any:
    """A saved `method` section's params with every default filled in (what config.yaml records now), so
    that a run saved with only the settings it changed resumes under the same settings."""
    try:
        return resolved_settings(create_method(method.get("name", ""), dict(method.get("params") or {})))
    except RetainError:
        return method.get("params")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and key != "params":
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class RunDir:
    """One experiment's folder on disk."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)

    @property
    def state_path(self) -> str:
        return os.path.join(self.path, "state.json")

    @property
    def config_path(self) -> str:
        return os.path.join(self.path, "config.yaml")

    def task_dir(self, index: int, name: str) -> str:
        return os.path.join(self.path, "tasks", f"{index}-{name}")

    def eval_file(self, row: int, task: str, general: bool = False) -> str:
        """Row `row`'s predictions on `task`; an eval-only task's (`general`) in the row's general/."""
        return os.path.join(self.path, "eval", str(row), *(["general"] if general else []), f"{task}.jsonl")

    def exists(self) -> bool:
        return os.path.isfile(self.state_path)

    def saved_config(self) -> dict:
        with open(self.config_path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)

    def check_not_foreign(self) -> None:
        """Refuse a folder that holds something other than a retain run (before a lock file is put in it).

        Lock files and stale temporaries do not count: a start killed while the model loaded leaves only
        `.lock`, and the rerun takes that folder over."""
        if self.exists() or not os.path.isdir(self.path) or os.path.isfile(self.config_path):
            return
        if any(not _bookkeeping(name) for name in os.listdir(self.path)):
            raise RetainError(
                f"output_dir {self.path} exists and is not a retain run directory; choose another output_dir"
            )

    def is_stub(self) -> bool:
        """A start that never recorded its initial checkpoint: nothing was trained or evaluated."""
        return not self.exists() or self.load_state().trained < 0

    def check_resumable(
        self,
        config: RunConfig,
        fingerprints: dict[str, Any] | None = None,
        source: Callable[[str, str], str] | None = None,
    ) -> None:
        """Refuse to resume into a folder that holds a run with different settings or data.

        A stub (see `is_stub`) is accepted whatever its settings, since nothing was trained: `take_over`
        starts it afresh. `fingerprints` (Plan.fingerprints) are compared with those state.json recorded,
        when it recorded any; `source(task, split)` names a task's data in the message."""
        self.check_not_foreign()
        if self.is_stub():
            return
        saved = self.saved_config()
        if isinstance(saved.get("method"), dict):
            saved["method"]["params"] = resolved_params(saved["method"])
        old, new = _flatten(saved), _flatten(config_to_dict(config))
        # A setting added after this run was saved: the run used what is now its default.
        defaults = _flatten(config_to_dict(RunConfig()))
        old.update({k: defaults[k] for k in set(new) - set(old) if k in defaults})
        changed = sorted(
            k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE
        )
        if changed:
            diffs = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:5])
            raise RetainError(
                f"run directory {self.path} holds a run with other settings ({diffs}); "
                "use another output_dir, or delete the folder to start over"
            )
        if fingerprints:
            self._check_fingerprints(config, fingerprints, source)

    def _check_fingerprints(
        self, config: RunConfig, new: dict[str, Any], source: Callable[[str, str], str] | None
    ) -> None:
        old = self.load_state().fingerprints
        if not old:
            return  # a state file from before fingerprints: they are recorded from now on
        advice = "use another output_dir, or delete the folder to start over"
        if old.get("method") and old["method"] != new.get("method"):
            raise RetainError(
                f"method '{config.method.name}': its resolved settings changed since this run started "
                "(method.params resolve to other values, e.g. a default changed in this version of retain); "
                f"run directory {self.path}; {advice}"
            )
        old_data, new_data = old.get("data") or {}, new.get("data") or {}
        if old_data and set(old_data) != set(new_data):
            raise RetainError(
                f"run directory {self.path}: the tasks changed since this run started "
                f"({', '.join(old_data)} -> {', '.join(new_data)}); {advice}"
            )
        for task, hashes in new_data.items():
            for split, words in (("train", "training data"), ("test", "test data")):
                recorded = (old_data.get(task) or {}).get(split)
                if recorded and recorded != hashes.get(split):
                    where = source(task, split) if source else "its data source"
                    raise RetainError(
                        f"task '{task}': its {words} changed since this run started ({where}); "
                        f"run directory {self.path} holds results of the old data; {advice}"
                    )
        for task, hashes in (new.get("general") or {}).items():
            recorded = ((old.get("general") or {}).get(task) or {}).get("test")
            if recorded and recorded != hashes.get("test"):
                where = source(task, "test") if source else "its data source"
                raise RetainError(
                    f"eval-only task '{task}': its test data changed since this run started ({where}); "
                    f"run directory {self.path} holds results of the old data; {advice}"
                )

    def take_over(self) -> None:
        """On the main process, under the lock, before anything is written: remove the temporaries a kill
        left behind, and start a stub (a start that never recorded its initial checkpoint) afresh."""
        if not os.path.isdir(self.path):
            return
        for name in os.listdir(self.path):
            if _TEMP_FILE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.path, name))
        tasks = os.path.join(self.path, "tasks")
        if os.path.isdir(tasks):
            for name in os.listdir(tasks):
                if _TEMP_CHECKPOINT.match(name) or _TEMP_FILE.match(name):
                    logger.info("removing %s, left by an interrupted checkpoint write", name)
                    path = os.path.join(tasks, name)
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if self.exists() and self.is_stub():
            logger.info("taking over %s: its start never reached the initial checkpoint", self.path)
            os.remove(self.state_path)

    @contextlib.contextmanager
    def lock(self, rank: int = 0) -> Iterator[None]:
        """Hold an exclusive lock for the run; a second process on the same folder is refused at once."""
        os.makedirs(self.path, exist_ok=True)
        path = os.path.join(self.path, f".lock{'' if rank == 0 else f'.{rank}'}")
        handle = open(path, "a+")
        if not try_lock(handle):
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise RetainError(
                f"another retain process (pid {owner}) is using run directory {self.path}; "
                "wait for it to finish or choose another output_dir"
            ) from None
        handle.seek(0)
        previous = handle.read()
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        except BaseException:
            # A refused or failed start leaves the lock file as it found it (a run's files stay unchanged).
            handle.seek(0)
            handle.truncate()
            handle.write(previous)
            handle.flush()
            raise
        finally:
            unlock(handle)
            handle.close()

    def initialise(
        self, config: RunConfig, tasks: list[str], fingerprints: dict[str, Any] | None = None
    ) -> RunState:
        """Write config.yaml and a fresh state.json unless resuming; return the state."""
        if self.exists():
            return self.load_state()
        write_text_atomic(self.config_path, dump_config(config))
        state = RunState(tasks=tasks, fingerprints=dict(fingerprints or {}))
        self.save_state(state)
        return state

    def load_state(self) -> RunState:
        try:
            with open(self.state_path, encoding="utf-8") as handle:
                return RunState.from_dict(json.load(handle))
        except json.JSONDecodeError as exc:
            raise RetainError(
                f"{self.state_path} is corrupt (line {exc.lineno}, column {exc.colno})"
            ) from None

    def save_state(self, state: RunState) -> None:
        write_json_atomic(self.state_path, state.to_dict())

    def save_checkpoint(self, index: int, name: str, model, method_state: dict, log: list[dict]) -> str:
        """Write tasks/<index>-<name>/ atomically: trainable weights, method state and training log."""
        target = self.task_dir(index, name)
        with atomic_directory(target, prefix=f".{index}-") as tmp:
            save_trainable(model, os.path.join(tmp, weights_folder(model)))
            torch.save(method_state, os.path.join(tmp, "method_state.pt"))
            with open(os.path.join(tmp, "train_log.json"), "w", encoding="utf-8") as handle:
                json.dump(log, handle, indent=1)
        return target

    def load_checkpoint(self, index: int, name: str, model) -> dict:
        """Load tasks/<index>-<name>/ into the model; returns the method state saved with it."""
        folder = self.task_dir(index, name)
        if not os.path.isdir(folder):
            raise RetainError(f"run directory {self.path} has no checkpoint for task {index} ({folder})")
        load_trainable(model, os.path.join(folder, weights_folder(model)))
        return torch.load(os.path.join(folder, "method_state.pt"), weights_only=True)
