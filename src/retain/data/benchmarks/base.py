"""What every benchmark layout provides: named task orders, and for each task where its files are and how
to read them into `Example`s.

A layout (EasyCL, O-LoRA, TRACE) knows a folder structure and a prompt format; a `Benchmark` is one named
benchmark in one layout, with its orders. `locate(root)` maps a data folder to `BenchmarkTask`s whose
files may or may not exist, so a run can report every missing file before anything trains.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from retain.data.dataset_info import read_records
from retain.data.formats import Example
from retain.errors import RetainError

# More distinct answers than this and a task is treated as open-ended (no label set).
MAX_INFERRED_LABELS = 20
_OPTION_LINE = re.compile(r"Option:\s*(.+?)\s*$", re.MULTILINE)


@dataclass
class BenchmarkTask:
    """One task of a benchmark: its files (which may be missing) and how to read and score them."""

    name: str
    files: dict[str, str]  # split ("train", "test", "dev", "labels") -> path
    read: Callable[[str], list[Example]]  # reads the train/test/dev file of this task
    scorer: str = "accuracy"
    read_labels: Callable[[], list[str]] | None = None  # the declared label set, when the layout ships one
    required: tuple[str, ...] = ("train", "test")

    def missing(self) -> list[str]:
        """The required files that do not exist, as paths."""
        return [self.files[split] for split in self.required if not os.path.isfile(self.files[split])]


@dataclass
class Benchmark:
    """A named benchmark: its layout, task orders, and where its files are expected."""

    name: str
    layout: str
    description: str
    orders: dict[str, list[str]]
    expected: str  # where the data is expected, relative to benchmark_dir, for messages and listings
    locate: Callable[..., dict[str, BenchmarkTask]]  # benchmark_dir -> every task's files
    notes: list[str] = field(default_factory=list)
    reads_images: bool = False  # locate(root, image_dir=...) takes stream.image_dir

    @property
    def task_names(self) -> list[str]:
        """Every task named in any order, first-seen order."""
        return list(dict.fromkeys(name for order in self.orders.values() for name in order))


def options_in(text: str) -> list[str] | None:
    """The label set an instruction spells out as `Option: a, b, c` (EasyCL's and O-LoRA's convention)."""
    match = _OPTION_LINE.search(text)
    if not match:
        return None
    labels = [label.strip() for label in match.group(1).split(",") if label.strip()]
    return labels or None


def infer_labels(train: list[Example]) -> tuple[list[str] | None, str]:
    """A task's label set and where it came from: the instruction's options, else the distinct training
    answers when there are few of them (None for open-ended tasks)."""
    declared = options_in(train[0].messages[-2]["content"]) if train and len(train[0].messages) > 1 else None
    if declared:
        return declared, "instruction options"
    answers = list(dict.fromkeys(e.reference.strip() for e in train))
    if 1 < len(answers) <= MAX_INFERRED_LABELS and len(answers) * 10 <= len(train):
        return sorted(answers), "distinct training answers"
    return None, ""


def read_pairs(
    path: str, task: str, fields: tuple[str, str], layout: str, render: Callable[[str], str] = str
) -> list[Example]:
    """A file of `{input_field: ..., answer_field: ...}` records as one-turn chat examples; `render` turns
    the input into the user message (a layout's prompt format)."""
    source, target = fields
    examples = []
    for index, record in enumerate(read_records(path)):
        if not isinstance(record, dict) or source not in record or target not in record:
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise RetainError(
                f'{path}: record {index} needs "{source}" and "{target}" ({layout} format), got {got}'
            )
        messages = [
            {"role": "user", "content": render(str(record[source]))},
            {"role": "assistant", "content": str(record[target])},
        ]
        examples.append(Example(messages, meta={"dataset": task}))
    if not examples:
        raise RetainError(f"{path} holds no records")
    return examples


def single_benchmark(benchmark: Benchmark) -> Callable[[str, str | None], Benchmark | None]:
    """The `make_benchmark` of a layout that defines exactly one benchmark: `benchmark` for its own name."""
    return lambda name, root: benchmark if name == benchmark.name else None
