"""Data hygiene checks run on every file-based task before training, and reported with the results.

They catch what silently inflates or deflates continual-learning numbers: a dev split that is the test
split (EasyCL's LNT and LFPT5 ship dev == test, so any tuning on dev tunes on test), test prompts that
also occur in the training data, duplicated examples, empty answers, and answers outside the task's
label set.

An example with images is the same as another only if its images are the same too: VQA data asks the same
question about many pictures. Images are compared by their resolved path, not their content: the checks
run on the full splits before subsampling, and reading every image of a benchmark (CoIN's are tens of
GB) for a hash would cost more than the run's data loading; benchmark records name each picture by one
path, so the same picture under two names (a copied file) is the one case this does not catch.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass

from retain.data.formats import Example

SHOWN = 3  # examples quoted per finding


@dataclass
class Finding:
    """One problem found in one task's data."""

    task: str
    # dev_equals_test | test_in_train | duplicates | empty_answers | labels_outside_set | unseen_test_labels
    check: str
    count: int
    message: str

    def to_dict(self) -> dict:
        return asdict(self)


def _key(example: Example, messages: list[dict[str, str]]) -> str:
    # Text examples keep their two-item key, so their findings are as before.
    parts: list = [example.system, messages]
    if example.images:
        parts.append([os.path.normpath(path) for path in example.images])
    return json.dumps(parts, ensure_ascii=False)


def _prompt_key(example: Example) -> str:
    return _key(example, example.messages[:-1])


def _example_key(example: Example) -> str:
    return _key(example, example.messages)


def _quoted(values: list[str]) -> str:
    shown = ", ".join(repr(v[:40]) for v in values[:SHOWN])
    return shown + (", ..." if len(values) > SHOWN else "")


def check_task(
    task: str,
    train: list[Example],
    test: list[Example],
    dev: list[Example] | None = None,
    labels: list[str] | None = None,
    labels_declared: bool = True,
) -> list[Finding]:
    """Every finding for one task's splits (empty when the data is clean).

    `labels_declared` says whether `labels` is the task's declared label set (checked against every
    answer) or was inferred from the training answers (then only unseen test answers are reported).
    """
    findings = []
    if dev is not None and dev and [_example_key(e) for e in dev] == [_example_key(e) for e in test]:
        findings.append(
            Finding(
                task,
                "dev_equals_test",
                len(dev),
                f"dev split is identical to the test split ({len(dev)} examples): tuning or picking "
                "checkpoints on dev tunes on test",
            )
        )
    train_prompts = {_prompt_key(e): e.reference for e in train}
    leaked = [e for e in test if _prompt_key(e) in train_prompts]
    if leaked:
        same = sum(train_prompts[_prompt_key(e)] == e.reference for e in leaked)
        findings.append(
            Finding(
                task,
                "test_in_train",
                len(leaked),
                f"{len(leaked)} of {len(test)} test prompts also occur in the training split "
                f"({same} with the same answer)",
            )
        )
    for split, examples in (("train", train), ("test", test)):
        counts = Counter(_example_key(e) for e in examples)
        extra = sum(n - 1 for n in counts.values() if n > 1)
        if extra:
            findings.append(
                Finding(
                    task,
                    "duplicates",
                    extra,
                    f"{split} split holds {extra} duplicate example(s) "
                    f"({len(counts)} distinct of {len(examples)})",
                )
            )
    for split, examples in (("train", train), ("test", test)):
        empty = sum(not e.reference.strip() for e in examples)
        if empty:
            left_out = " (left out of the test set: nothing to score)" if split == "test" else ""
            findings.append(
                Finding(
                    task,
                    "empty_answers",
                    empty,
                    f"{empty} of {len(examples)} {split} example(s) have an empty answer{left_out}",
                )
            )
    if labels:
        allowed = {label.strip() for label in labels}
        if labels_declared:
            for split, examples in (("train", train), ("test", test)):
                outside = [e.reference.strip() for e in examples if e.reference.strip() not in allowed]
                if outside:
                    findings.append(
                        Finding(
                            task,
                            "labels_outside_set",
                            len(outside),
                            f"{len(outside)} {split} answer(s) outside the label set {sorted(allowed)}: "
                            f"{_quoted(sorted(set(outside)))}",
                        )
                    )
        else:
            unseen = [e.reference.strip() for e in test if e.reference.strip() not in allowed]
            if unseen:
                findings.append(
                    Finding(
                        task,
                        "unseen_test_labels",
                        len(unseen),
                        f"{len(unseen)} test answer(s) never occur as a training answer: "
                        f"{_quoted(sorted(set(unseen)))}",
                    )
                )
    return findings
