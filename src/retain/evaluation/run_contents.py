"""What a run directory holds, read for the reports: the training logs as loss curves on one step axis,
the predictions (capped, for a page), config.yaml, and the results (results.json, or state.json while
the first rows are being evaluated).

A training log or prediction file that is being written or is damaged is left out rather than failing
the report: a report written while the run goes must not stop the run.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from retain.errors import RetainError
from retain.evaluation.html_page import display
from retain.evaluation.metrics import compute_metrics

# Predictions embedded in the page at most (spread evenly over the rows and tasks), and characters kept
# of each text field: enough to browse, small enough to open quickly (a few MB at most).
MAX_PREDICTIONS = 2000
MAX_TEXT = 4000
# Trainer log keys that are not a method's own loss.
_TRAINER_KEYS = {"loss", "loss/task", "grad_norm", "learning_rate", "epoch", "step"}
_TASK_DIR = re.compile(r"^(\d+)-(.+)$")


def read_train_logs(run_dir: str | os.PathLike) -> list[tuple[int, str, list[dict]]]:
    """(index, task name, log entries) of every trained task in `run_dir/tasks`, in stream order."""
    tasks_dir = Path(run_dir) / "tasks"
    logs = []
    for entry in sorted(tasks_dir.iterdir()) if tasks_dir.is_dir() else []:
        match = _TASK_DIR.match(entry.name)
        log_file = entry / "train_log.json"
        if not match or int(match.group(1)) == 0 or not log_file.is_file():
            continue
        try:
            entries = json.loads(log_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # a log being written or damaged: the page shows the others
        if isinstance(entries, list):
            logs.append((int(match.group(1)), match.group(2), [e for e in entries if isinstance(e, dict)]))
    return sorted(logs, key=lambda log: log[0])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def loss_curves(logs: list[tuple[int, str, list[dict]]]) -> dict[str, Any]:
    """The logged losses on one step axis across the stream.

    Returns {"main": {key: [(step, value)]} for loss and loss/task, "method": {key: [...]} for every
    other logged number (a method's own losses such as ewc/penalty), "boundaries": [(step, label)] where
    each task starts, "after_task": [(task, key, value)] for the statistics methods log after a task}.
    Task k's step s is at the sum of the earlier tasks' step counts plus s.
    """
    main: dict[str, list] = {}
    method: dict[str, list] = {}
    boundaries, after_task = [], []
    offset = 0
    for index, name, entries in logs:
        boundaries.append((offset, f"{index}: {name}"))
        last_step = 0
        for entry in entries:
            if isinstance(entry.get("after_task"), dict):
                after_task += [(name, k, v) for k, v in entry["after_task"].items()]
                continue
            if not _number(entry.get("step")):
                continue
            last_step = max(last_step, entry["step"])
            if "train_runtime" in entry:  # the Trainer's end-of-training summary, not a logging step
                continue
            x = offset + entry["step"]
            for key, value in entry.items():
                if not _number(value) or key in ("step", "epoch", "grad_norm", "learning_rate"):
                    continue
                target = main if key in _TRAINER_KEYS else method
                target.setdefault(key, []).append((x, float(value)))
        offset += last_step
    return {"main": main, "method": method, "boundaries": boundaries, "after_task": after_task}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + f" … ({len(text) - MAX_TEXT} more characters)"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n\n".join(
            f"{m.get('role', '?')}: {display(m.get('content', ''))}" if isinstance(m, dict) else display(m)
            for m in prompt
        )
    return display(prompt)


def _record(row: int, task: str, raw: dict) -> dict:
    record: dict[str, Any] = {
        "r": row,
        "t": task,
        "p": _clip(_prompt_text(raw.get("prompt", ""))),
        "y": _clip(display(raw.get("prediction", ""))),
        "ref": _clip(display(raw.get("reference", ""))),
        "s": float(raw["score"]) if _number(raw.get("score")) else None,
    }
    if raw.get("images"):
        record["p"] = f"[images: {display(raw['images'])}]\n\n" + record["p"]
    if "route" in raw:
        record["route"] = display(raw["route"])
    if isinstance(raw.get("label_scores"), dict):
        ranked = sorted(raw["label_scores"].items(), key=lambda kv: -kv[1] if _number(kv[1]) else 0)
        record["ls"] = "\n".join(f"{label}: {display(value)}" for label, value in ranked)
    return record


def read_predictions(
    run_dir: str | os.PathLike, tasks: list[str], limit: int = MAX_PREDICTIONS
) -> tuple[list[dict], int]:
    """(records, total): at most `limit` predictions from `run_dir/eval/<row>/<task>.jsonl`, the first
    ones of every file in equal shares (the last row first, tasks in stream order), and how many there
    are in all."""
    eval_dir = Path(run_dir) / "eval"
    order = {task: k for k, task in enumerate(tasks)}  # files of other tasks after the stream's, by name
    files: list[tuple[int, str, Path]] = []
    for row_dir in eval_dir.iterdir() if eval_dir.is_dir() else []:
        if row_dir.name.isdigit() and row_dir.is_dir():
            names = sorted(row_dir.glob("*.jsonl"), key=lambda p: (order.get(p.stem, len(tasks)), p.stem))
            files += [(int(row_dir.name), path.stem, path) for path in names]
    files.sort(key=lambda f: -f[0])  # the last row first: the finished model's answers
    lines_per_file = []
    for _, _, path in files:
        try:
            lines_per_file.append([line for line in path.read_text(encoding="utf-8").splitlines() if line])
        except (OSError, UnicodeDecodeError):
            lines_per_file.append([])
    total = sum(len(lines) for lines in lines_per_file)
    share = max(1, limit // max(len(files), 1))
    records = []
    for (row, task, _), lines in zip(files, lines_per_file, strict=True):
        for line in lines[:share]:
            try:
                raw = json.loads(line)
            except ValueError:
                continue
            if isinstance(raw, dict):
                records.append(_record(row, task, raw))
    return records[:limit], total


def load_run_results(run_dir: str | os.PathLike) -> dict:
    """The run's results.json, or for a run still in its first rows, a partial results dict built from
    state.json (tasks, the rows evaluated so far, timings)."""
    run_dir = Path(run_dir)
    for name in ("results.json", "state.json"):
        path = run_dir / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RetainError(f"{path}: cannot be read ({error}); is the run still writing it?") from None
        if name == "results.json":
            return data
        tasks = list(data.get("tasks", []))
        rows = data.get("rows", {})
        matrix = [rows.get(str(i)) for i in range(len(tasks) + 1)]
        return {
            "tasks": tasks,
            "matrix": matrix,
            "joint": False,
            "metrics": compute_metrics(matrix),
            "method": _saved_method(run_dir),
            "timings": data.get("timings", {}),
        }
    raise RetainError(f"{run_dir}: no results.json or state.json; give the directory of a retain run")


def _saved_method(run_dir: Path) -> str:
    match = re.search(r"^method:\s*\n\s+name:\s*(\S+)", config_text(run_dir) or "", re.MULTILINE)
    return match.group(1) if match else "?"


def config_text(run_dir: Path) -> str | None:
    """The text of `run_dir/config.yaml`, or None when it cannot be read."""
    try:
        return (run_dir / "config.yaml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
