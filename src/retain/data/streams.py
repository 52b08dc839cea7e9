"""Task streams: turn the config's task list (or benchmark) into Task records holding their examples.

A task's data is a dataset_info.json name, a file path, or `synthetic:<name>` (built-in generated data);
with `stream.benchmark`, the tasks are a named benchmark's order (see `retain.data.benchmarks`).
Everything is loaded and checked here, before a run directory is touched, so bad input costs nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import random
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from retain.config import RunConfig, TaskConfig
from retain.data.answer_styles import diversify
from retain.data.benchmarks import benchmark_dir, benchmark_tasks, find_benchmark, infer_labels, select_tasks
from retain.data.dataset_info import load_examples
from retain.data.formats import Example
from retain.data.general import (
    BENCHMARK_PREFIX,
    INSTRUCT_SCORER,
    INSTRUCT_SPEC,
    expand_builtin,
    instruct_file,
    overlap_findings,
)
from retain.data.hygiene import Finding, check_task
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
    hygiene: list[Finding] = field(default_factory=list)  # data problems found before subsampling


def _seed_for(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big")


def subsample(examples: list[Example], n: int | None, seed: int, what: str) -> list[Example]:
    """A deterministic random subset of n examples, in their original order (all when n is None)."""
    if n is None or n >= len(examples):
        return examples
    keep = sorted(random.Random(_seed_for(seed, what, n)).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def _load_spec(
    spec: str, dataset_dir: str | None, n: int | None, seed: int, split: str, image_dir: str | None = None
) -> list[Example]:
    if spec.startswith(SYNTHETIC_PREFIX):
        default = DEFAULT_SYNTHETIC_TRAIN if split == "train" else DEFAULT_SYNTHETIC_TEST
        return load_synthetic(spec, n or default, seed, split)
    return load_examples(spec, dataset_dir or None, image_dir or None)


def _with_system(examples: list[Example], system: str) -> list[Example]:
    return [e if e.system or not system else replace(e, system=system) for e in examples]


def finish_task(
    cfg: TaskConfig,
    run: RunConfig,
    train: list[Example],
    test: list[Example],
    scorer: str,
    dev: list[Example] | None = None,
    labels: list[str] | None = None,
    labels_declared: bool = False,
    notes: list[str] | None = None,
) -> Task:
    """Check (hygiene, on the full splits), drop test examples without an answer, subsample, rewrite the
    training answers into `stream.answer_styles` and add the default system prompt."""
    findings = check_task(cfg.name, train, test, dev, labels, labels_declared) if run.stream.hygiene else []
    notes = list(notes or [])
    for split, examples, spec in (("train", train, cfg.train), ("test", test, cfg.test or cfg.train)):
        if examples and all(not e.reference.strip() for e in examples):
            raise RetainError(
                f"task '{cfg.name}': every {split} example of {spec} ({len(examples)}) has an empty answer, "
                "so there is nothing to "
                + ("learn" if split == "train" else "score")
                + "; check the file's answer column (output, or the last assistant message)"
            )
    empty = sum(not e.reference.strip() for e in test)
    if empty:
        # An empty reference would score an empty prediction as correct: such examples are not scored.
        test = [e for e in test if e.reference.strip()]
        if not run.stream.hygiene:  # otherwise the data check says so
            notes.append(f"{empty} test example(s) with an empty answer are left out of the test set")
    train = subsample(train, cfg.train_size, run.seed, f"{cfg.name}/train")
    test = subsample(test, cfg.test_size, run.seed, f"{cfg.name}/test")
    # Training data only: the test set keeps the task's own answer format, which is what is scored.
    train, restyle_notes = diversify(train, run.stream.answer_styles or {}, run.seed, cfg.name)
    notes.extend(restyle_notes)
    return Task(
        name=cfg.name,
        train=_with_system(train, run.stream.system),
        test=_with_system(test, run.stream.system),
        scorer=scorer,
        notes=notes,
        labels=labels,
        hygiene=findings,
    )


def default_scorer(spec: str) -> str:
    """The scorer of a task without one: a synthetic task's own, else `normalized`."""
    name = spec[len(SYNTHETIC_PREFIX) :] if spec.startswith(SYNTHETIC_PREFIX) else ""
    return SYNTHETIC_TASKS[name].scorer if name in SYNTHETIC_TASKS else "normalized"


def build_task(cfg: TaskConfig, run: RunConfig) -> Task:
    """Load, split, check and subsample one task's data."""
    dataset_dir = run.stream.dataset_dir or None
    image_dir = run.stream.image_dir or None
    synthetic = cfg.train.startswith(SYNTHETIC_PREFIX)
    train = _load_spec(cfg.train, dataset_dir, cfg.train_size, run.seed, "train", image_dir)
    notes: list[str] = []
    if cfg.test:
        test = _load_spec(cfg.test, dataset_dir, cfg.test_size, run.seed, "test", image_dir)
    elif synthetic:
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
    scorer = cfg.scorer or default_scorer(cfg.train)
    if synthetic:
        # Generated tasks repeat short examples by design: hygiene checks would only report noise.
        return finish_task(cfg, dataclasses.replace(run, stream=_no_hygiene(run)), train, test, scorer)
    labels, source = infer_labels(train)
    return finish_task(
        cfg,
        run,
        train,
        test,
        scorer,
        labels=labels,
        labels_declared=source == "instruction options",
        notes=notes,
    )


def _no_hygiene(run: RunConfig):
    return dataclasses.replace(run.stream, hygiene=False)


def _benchmark_tasks(run: RunConfig) -> tuple[list[Task], list[str], dict]:
    """The selected tasks of `run.stream.benchmark`, loaded in order, with warnings and a description."""
    stream = run.stream
    root = benchmark_dir(stream.benchmark_dir)
    benchmark = find_benchmark(stream.benchmark, root)
    names = select_tasks(benchmark, stream.benchmark_order, [t.name for t in stream.tasks], stream.max_tasks)
    located, warnings = benchmark_tasks(
        benchmark, root, names, stream.allow_missing, image_dir=stream.image_dir
    )
    chosen = {t.name: t for t in stream.tasks}
    tasks = []
    for item in tqdm(located, desc=f"loading {benchmark.name}", unit="task", disable=len(located) < 3):
        cfg = chosen.get(item.name) or TaskConfig(
            name=item.name, train=item.name, train_size=stream.train_size, test_size=stream.test_size
        )
        train, test = item.read(item.files["train"]), item.read(item.files["test"])
        dev_file = item.files.get("dev")
        dev = item.read(dev_file) if dev_file and os.path.isfile(dev_file) and stream.hygiene else None
        declared = item.read_labels() if item.read_labels else None
        labels, source = (declared, "declared") if declared else infer_labels(train)
        tasks.append(
            finish_task(
                cfg,
                run,
                train,
                test,
                cfg.scorer or item.scorer,
                dev=dev,
                labels=labels,
                labels_declared=source in ("declared", "instruction options"),
            )
        )
    described = {
        "name": benchmark.name,
        "layout": benchmark.layout,
        "order": stream.benchmark_order or next(iter(benchmark.orders)),
        "dir": os.path.abspath(root),
        "tasks": [t.name for t in tasks],
    }
    return tasks, warnings, described


def _benchmark_test(cfg: TaskConfig, run: RunConfig) -> tuple[list[Example], str, list[str] | None, bool]:
    """`benchmark:<benchmark>/<task>`: that task's test set, scorer, label set and whether it is declared."""
    name, _, task = cfg.test[len(BENCHMARK_PREFIX) :].partition("/")
    if not name or not task:
        raise RetainError(
            f"config: eval-only task '{cfg.name}': '{cfg.test}' is not a benchmark task; write it as "
            f"{BENCHMARK_PREFIX}<benchmark>/<task>, e.g. {BENCHMARK_PREFIX}olora/dbpedia"
        )
    root = benchmark_dir(run.stream.benchmark_dir)
    benchmark = find_benchmark(name, root)
    located, _ = benchmark_tasks(benchmark, root, [task], False, image_dir=run.stream.image_dir)
    item = located[0]
    test = item.read(item.files["test"])
    declared = item.read_labels() if item.read_labels else None
    labels, source = (declared, "declared") if declared else infer_labels(test)
    return test, cfg.scorer or item.scorer, labels, source in ("declared", "instruction options")


def build_eval_task(cfg: TaskConfig, run: RunConfig) -> Task:
    """One eval-only task (`stream.eval_only`): its data (`cfg.test`) is all test set, never trained; a
    label set (for rank mode) is the instruction's options or its few distinct answers."""
    spec = cfg.test
    synthetic = spec.startswith(SYNTHETIC_PREFIX)
    declared = False
    if spec.startswith(BENCHMARK_PREFIX):
        test, scorer, labels, declared = _benchmark_test(cfg, run)
    elif spec == INSTRUCT_SPEC:
        with instruct_file() as path:
            test = load_examples(path)
        scorer, labels = cfg.scorer or INSTRUCT_SCORER, None
    else:
        test = _load_spec(spec, run.stream.dataset_dir, cfg.test_size, run.seed, "test", run.stream.image_dir)
        scorer = cfg.scorer or default_scorer(spec)
        labels, source = (None, "") if synthetic else infer_labels(test)
        declared = source == "instruction options"
    # Generated tasks repeat short examples by design: hygiene checks would only report noise.
    checked = dataclasses.replace(run, stream=_no_hygiene(run)) if synthetic else run
    return finish_task(cfg, checked, [], test, scorer, labels=labels, labels_declared=declared)


def load_eval_only(run: RunConfig, tasks: list[Task]) -> list[Task]:
    """The eval-only tasks of `run` (`builtin` expanded), each checked against the stream's training data."""
    names = {t.name for t in tasks}
    trained = {cfg.train for cfg in run.stream.tasks}
    configs = expand_builtin(run.stream.eval_only, trained, names)
    clash = sorted(names & {cfg.name for cfg in configs})
    if clash:
        raise RetainError(
            f"config: stream.eval_only task(s) {', '.join(clash)} share a name with a task of the stream; "
            "an eval-only task is never trained, so give it a name of its own (name:)"
        )
    general = [build_eval_task(cfg, run) for cfg in configs]
    if run.stream.hygiene:
        trained_data = {t.name: t.train for t in tasks}
        for task in general:
            task.hygiene.extend(overlap_findings(task.name, task.test, trained_data))
    return general


@dataclass
class Stream:
    """The loaded tasks plus what a report must say about them."""

    tasks: list[Task]
    warnings: list[str] = field(default_factory=list)  # e.g. tasks dropped for missing files
    benchmark: dict | None = None  # name, layout, order, dir, tasks when the stream is a benchmark
    # Tasks scored in every row but never trained (stream.eval_only); their own columns and metrics.
    eval_only: list[Task] = field(default_factory=list)


def load_stream(run: RunConfig) -> Stream:
    """All tasks of the run, loaded and checked, with the warnings the run's report repeats."""
    warnings: list[str] = []
    benchmark = None
    if run.stream.benchmark:
        tasks, warnings, benchmark = _benchmark_tasks(run)
    else:
        tasks = [build_task(cfg, run) for cfg in run.stream.tasks]
    eval_only = load_eval_only(run, tasks)
    for warning in warnings:
        logger.warning("%s", warning)
    for task in tasks + eval_only:
        for note in task.notes:
            logger.warning("task %s: %s", task.name, note)
        for finding in task.hygiene:
            logger.warning("data check, task %s: %s", task.name, finding.message)
    return Stream(tasks=tasks, warnings=warnings, benchmark=benchmark, eval_only=eval_only)


def build_stream(run: RunConfig) -> list[Task]:
    """All tasks of the run, loaded and checked."""
    return load_stream(run).tasks
