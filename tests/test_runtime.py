"""The batch layout: how a step's examples split over processes and gradient accumulation."""

from __future__ import annotations

import pytest

from retain.config import TrainConfig
from retain.errors import RetainError
from retain.runtime import batch_layout


def test_without_a_global_batch_each_process_adds_its_per_device_batch():
    train = TrainConfig(per_device_train_batch_size=8, gradient_accumulation_steps=2)
    assert batch_layout(train, 1).global_batch == 16
    assert batch_layout(train, 2).to_dict() == {
        "per_device": 8,
        "processes": 2,
        "accumulation": 2,
        "global": 32,
    }


@pytest.mark.parametrize(
    ("global_batch", "per_device", "processes", "expected"),
    [
        (8, 8, 1, (8, 1)),
        (8, 8, 2, (4, 1)),  # each process's share is smaller than the per-device batch
        (16, 3, 2, (2, 4)),  # 8 per process: the largest micro-batch up to 3 that divides 8 is 2
        (32, 8, 2, (8, 2)),
        (6, 4, 2, (3, 1)),
    ],
)
def test_a_global_batch_is_kept_whatever_the_process_count(global_batch, per_device, processes, expected):
    train = TrainConfig(per_device_train_batch_size=per_device, global_batch_size=global_batch)
    layout = batch_layout(train, processes)
    assert (layout.per_device, layout.accumulation) == expected
    assert layout.global_batch == global_batch
    assert "examples per step" in layout.describe()


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused():
    with pytest.raises(RetainError, match="train.global_batch_size 7 cannot be split over 2"):
        batch_layout(TrainConfig(global_batch_size=7), 2)
