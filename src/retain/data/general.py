"""General-ability evaluation: the built-in general set and the checks on eval-only tasks.

`stream.eval_only` lists tasks that are scored in every row of the run but never trained, to measure
what continual tuning does to abilities outside the stream. `builtin` (`general:builtin`) stands for a
small set that ships with retain and needs no download:

- every text synthetic task (retain.data.synthetic) the stream does not train, `BUILTIN_SYNTHETIC_TEST`
  test examples each (or the entry's / the stream's test_size), scored by the task's own scorer;
- `instruct` (`general:instruct`): 40 short factual instructions (retain/data/general_eval.jsonl), scored
  by ROUGE-L. They are not the records GeRe replays in training (general_samples.jsonl); a test checks
  that the two never share one.

Eval-only data is checked like a stream task's (duplicates, empty answers, labels), plus one check of
its own: a test prompt that also occurs in a stream task's training data is a `test_in_train` finding,
since that task would then be trained on after all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from importlib import resources

from retain.config import BUILTIN_GENERAL, TaskConfig
from retain.data.formats import Example
from retain.data.hygiene import Finding, check_task
from retain.data.synthetic import SYNTHETIC_TASKS, SyntheticTask

SYNTHETIC_PREFIX = "synthetic:"
BENCHMARK_PREFIX = "benchmark:"  # benchmark:<benchmark>/<task>: one benchmark task's test set
INSTRUCT_TASK = "instruct"
INSTRUCT_SPEC = "general:instruct"  # the spec of the instruction-following sample, usable on its own
INSTRUCT_FILE = "general_eval.jsonl"  # in the retain.data package
INSTRUCT_SCORER = "rouge_l"
BUILTIN_SYNTHETIC_TEST = 20  # test examples per built-in synthetic task when no test_size is set


@contextlib.contextmanager
def instruct_file() -> Iterator[str]:
    """A filesystem path of the built-in instruction-following sample (alpaca JSONL)."""
    with resources.as_file(resources.files("retain.data").joinpath(INSTRUCT_FILE)) as path:
        yield str(path)


def text_synthetic_tasks() -> list[str]:
    """The names of the synthetic tasks without images (the image ones subclass SyntheticTask)."""
    return sorted(name for name, task in SYNTHETIC_TASKS.items() if type(task) is SyntheticTask)


def builtin_configs(entry: TaskConfig, trained_specs: set[str], stream_names: set[str]) -> list[TaskConfig]:
    """The tasks `builtin` stands for: the synthetic tasks the stream does not train (by spec or by name)
    and the instruction-following sample; `entry`'s test_size and scorer apply to each."""
    configs = [
        TaskConfig(
            name=name,
            test=f"{SYNTHETIC_PREFIX}{name}",
            scorer=entry.scorer,
            test_size=entry.test_size or BUILTIN_SYNTHETIC_TEST,
        )
        for name in text_synthetic_tasks()
        if f"{SYNTHETIC_PREFIX}{name}" not in trained_specs and name not in stream_names
    ]
    if INSTRUCT_TASK not in stream_names:
        configs.append(
            TaskConfig(
                name=INSTRUCT_TASK,
                test=INSTRUCT_SPEC,
                scorer=entry.scorer or INSTRUCT_SCORER,
                test_size=entry.test_size,
            )
        )
    return configs


def expand_builtin(
    entries: list[TaskConfig], trained_specs: set[str], stream_names: set[str]
) -> list[TaskConfig]:
    """`entries` with the `builtin` entry replaced by the tasks it stands for; a built-in task whose name
    another entry already uses is left out (the user's entry wins)."""
    named = {e.name for e in entries if e.test != BUILTIN_GENERAL}
    out: list[TaskConfig] = []
    for entry in entries:
        if entry.test != BUILTIN_GENERAL:
            out.append(entry)
            continue
        out.extend(c for c in builtin_configs(entry, trained_specs, stream_names) if c.name not in named)
    return out


def overlap_findings(name: str, test: list[Example], stream: dict[str, list[Example]]) -> list[Finding]:
    """`test_in_train` findings for eval-only task `name`: its test prompts that occur in the training
    data (as trained: subsampled, with the system prompt) of a stream task, one finding per such task."""
    findings = []
    for task, train in stream.items():
        for finding in check_task(name, train, test):
            if finding.check == "test_in_train":
                message = (
                    f"{finding.count} of {len(test)} test prompts of this eval-only task occur in the "
                    f"training data of stream task '{task}', so they are trained on after all"
                )
                findings.append(replace(finding, message=message))
    return findings
