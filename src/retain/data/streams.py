"""Task streams: turn the config's task list into Task records holding their train and test examples.

A task's data is a dataset_info.json name, a file path, or `synthetic:<name>` (built-in generated data).
Everything is loaded and checked here, before a run directory is touched, so bad input costs nothing.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass, field

from retain.config import RunConfig, TaskConfig
from retain.data.dataset_info import load_examples
from retain.data.formats import Example
from retain.data.synthetic import SYNTHETIC_TASKS, load_synthetic
from retain.errors import RetainError

logger = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
DEFAULT_SYNTHETIC_TRAIN = 256
DEFAULT_SYNTHETIC_TEST = 50
HELD_OUT_FRACTION = 0.1


@dataclass
class Task:
    """One task of the stream: its name, data and how its answers are scored."""

    name: str
    train: list[Example]
    test: list[Example]
    scorer: str
    notes: list[str] = field(default_factory=list)
    # The closed set of answer strings of a classification task (None: open-ended answers).
    labels: list[str] | None = None


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def subsample(examples: list[Example], n: int | None, seed: int, what: str) -> list[Example]:
    """A deterministic random subset of n examples, in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(_seed_for(seed, what, n)).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _load_spec(spec: str, dataset_dir: str | None, n: int | None, seed: int, split: str) -> list[Example]:
    if spec.startswith(SYNTHETIC_PREFIX):
        default = DEFAULT_SYNTHETIC_TRAIN if split == "train" else DEFAULT_SYNTHETIC_TEST
        return load_synthetic(spec, n or default, seed, split)
    return load_examples(spec, dataset_dir or None)


def build_task(cfg: TaskConfig, run: RunConfig) -> Task:
    """Load, split and subsample one task's data."""
    dataset_dir = run.stream.dataset_dir or None
    train = _load_spec(cfg.train, dataset_dir, cfg.train_size, run.seed, "train")
    notes: list[str] = []
    if cfg.test:
        test = _load_spec(cfg.test, dataset_dir, cfg.test_size, run.seed, "test")
    elif cfg.train.startswith(SYNTHETIC_PREFIX):
        test = _load_spec(cfg.train, dataset_dir, cfg.test_size, run.seed, "test")
    else:
        # No test set named: hold out a deterministic slice of the training data.
        order = list(range(len(train)))
        random.Random(_seed_for(run.seed, cfg.name, "holdout")).shuffle(order)
        n_test = max(1, round(HELD_OUT_FRACTION * len(train)))
        held = set(order[:n_test])
        test = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
        notes.append(f"no test set given: {n_test} training examples held out for testing")
        if not train:
            raise RetainError(f"task '{cfg.name}': {cfg.train} has too few examples to hold out a test set")
    train = subsample(train, cfg.train_size, run.seed, f"{cfg.name}/train")
    test = subsample(test, cfg.test_size, run.seed, f"{cfg.name}/test")
    if run.stream.system:
        train, test = (
            [e if e.system else Example(e.messages, run.stream.system, e.meta) for e in split]
            for split in (train, test)
        )
    scorer = cfg.scorer
    if not scorer:
        name = cfg.train[len(SYNTHETIC_PREFIX) :] if cfg.train.startswith(SYNTHETIC_PREFIX) else ""
        scorer = SYNTHETIC_TASKS[name].scorer if name in SYNTHETIC_TASKS else "normalized"
    return Task(name=cfg.name, train=train, test=test, scorer=scorer, notes=notes)


def build_stream(run: RunConfig) -> list[Task]:
    """All tasks of the run, loaded and checked."""
    from retain.evaluation.scoring import get_scorer

    tasks = [build_task(cfg, run) for cfg in run.stream.tasks]
    for task in tasks:
        get_scorer(task.scorer)  # unknown scorer names fail here, before training
        for note in task.notes:
            logger.warning("task %s: %s", task.name, note)
    return tasks
