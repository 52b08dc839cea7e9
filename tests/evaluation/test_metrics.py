import math

import pytest

from retain.errors import RetainError
from retain.evaluation.metrics import (
    avalanche_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    compute_metrics,
    forgetting,
    forward_transfer,
    last_accuracy,
    plasticity,
    validate_matrix,
)

# R[i][j]: row 0 before training, row i after training task i; column j - 1 is task j.
TWO_TASKS = [
    [0.1, 0.2],
    [0.8, 0.4],
    [0.6, 0.9],
]
THREE_TASKS = [
    [0.0, 0.1, 0.2],
    [0.5, 0.3, 0.2],
    [0.8, 0.6, 0.4],  # task 1 peaks after task 2, so forgetting (max - last) != -BWT
    [0.4, 0.5, 0.9],
]


def test_two_tasks_hand_computed():
    assert last_accuracy(TWO_TASKS) == pytest.approx((0.6 + 0.9) / 2)
    assert average_incremental_accuracy(TWO_TASKS) == pytest.approx((0.8 + (0.6 + 0.9) / 2) / 2)
    assert backward_transfer(TWO_TASKS) == pytest.approx(0.6 - 0.8)
    assert forward_transfer(TWO_TASKS) == pytest.approx(0.4 - 0.2)
    assert forgetting(TWO_TASKS) == pytest.approx(0.8 - 0.6)
    assert plasticity(TWO_TASKS) == pytest.approx((0.8 + 0.9) / 2)
    assert avalanche_forgetting(TWO_TASKS) == pytest.approx(0.8 - 0.6)


def test_three_tasks_hand_computed():
    assert last_accuracy(THREE_TASKS) == pytest.approx((0.4 + 0.5 + 0.9) / 3)
    assert average_incremental_accuracy(THREE_TASKS) == pytest.approx((0.5 + (0.8 + 0.6) / 2 + 0.6) / 3)
    assert backward_transfer(THREE_TASKS) == pytest.approx(((0.4 - 0.5) + (0.5 - 0.6)) / 2)
    assert forward_transfer(THREE_TASKS) == pytest.approx(((0.3 - 0.1) + (0.4 - 0.2)) / 2)
    # j = 1: max(R11, R21) - R31 = 0.8 - 0.4; j = 2: max(R22) - R32 = 0.6 - 0.5.
    assert forgetting(THREE_TASKS) == pytest.approx(((0.8 - 0.4) + (0.6 - 0.5)) / 2)
    assert plasticity(THREE_TASKS) == pytest.approx((0.5 + 0.6 + 0.9) / 3)
    assert avalanche_forgetting(THREE_TASKS) == pytest.approx(((0.5 - 0.4) + (0.6 - 0.5)) / 2)


def test_forgetting_differs_from_negative_bwt_and_avalanche():
    assert forgetting(THREE_TASKS) == pytest.approx(0.25)
    assert -backward_transfer(THREE_TASKS) == pytest.approx(0.1)
    assert avalanche_forgetting(THREE_TASKS) == pytest.approx(-backward_transfer(THREE_TASKS))


def test_forgetting_ignores_the_row_before_training():
    # The max runs over i in [j, T-1]: a high score before training task j is not "forgotten".
    matrix = [[1.0, 1.0], [0.5, 0.0], [0.5, 0.5]]
    assert forgetting(matrix) == 0.0


def test_compute_metrics_keys_and_values():
    metrics = compute_metrics(THREE_TASKS)
    assert list(metrics) == ["last", "avg", "bwt", "fwt", "forgetting", "plasticity"]
    assert metrics["last"] == pytest.approx(0.6)
    assert metrics["avg"] == pytest.approx(0.6)
    assert metrics["bwt"] == pytest.approx(-0.1)
    assert metrics["fwt"] == pytest.approx(0.2)
    assert metrics["forgetting"] == pytest.approx(0.25)
    assert metrics["plasticity"] == pytest.approx(2 / 3)
    assert all(isinstance(v, float) for v in metrics.values())


def test_one_task_leaves_transfer_metrics_undefined():
    metrics = compute_metrics([[0.2], [0.7]])
    assert metrics == {
        "last": pytest.approx(0.7),
        "avg": pytest.approx(0.7),
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "plasticity": pytest.approx(0.7),
    }
    assert avalanche_forgetting([[0.2], [0.7]]) is None


def test_partial_matrix_gives_none_for_metrics_needing_missing_rows():
    partial = THREE_TASKS[:3] + [None]
    metrics = compute_metrics(partial)
    assert metrics["fwt"] == pytest.approx(0.2)  # needs rows 0..T-1 only
    assert {k for k, v in metrics.items() if v is None} == {"last", "avg", "bwt", "forgetting", "plasticity"}
    assert compute_metrics([THREE_TASKS[0], THREE_TASKS[1], None, None])["fwt"] is None
    assert compute_metrics([None, [0.5, 0.1], [0.4, 0.9]])["fwt"] is None
    assert compute_metrics([None, [0.5, 0.1], [0.4, 0.9]])["bwt"] == pytest.approx(-0.1)


def test_joint_matrix():
    metrics = compute_metrics([[0.1, 0.2, 0.3], [0.6, 0.7, 0.8]], joint=True)
    assert metrics["last"] == pytest.approx(0.7)
    assert metrics["avg"] == pytest.approx(0.7)
    assert [metrics[k] for k in ("bwt", "fwt", "forgetting", "plasticity")] == [None] * 4
    assert compute_metrics([[0.1, 0.2], None], joint=True)["last"] is None
    with pytest.raises(RetainError, match="expected 2 rows"):
        compute_metrics(THREE_TASKS, joint=True)


@pytest.mark.parametrize(
    "matrix, where",
    [
        ([[0.1, 0.2], [0.3, math.nan], [0.5, 0.6]], "row 1, column 1"),
        ([[0.1, 0.2], [0.3, 0.4], [75.0, 0.6]], "row 2, column 0"),
        ([[0.1, 0.2], [0.3, -0.1], [0.5, 0.6]], "row 1, column 1"),
        ([[0.1, "x"], [0.3, 0.4], [0.5, 0.6]], "row 0, column 1"),
        ([[0.1, True], [0.3, 0.4], [0.5, 0.6]], "row 0, column 1"),
        ([[0.1, 0.2], [0.3, 0.4, 0.5], [0.5, 0.6]], "row 1"),
        ([[0.1, 0.2], [0.3, 0.4]], "row 0"),  # 2 rows means T = 1, so rows of 2 are wrong
        ([[0.1, 0.2], 0.3, [0.5, 0.6]], "row 1"),
        ([[0.5]], "1 row(s)"),
        ([], "0 row(s)"),
        ("0.5", "list of rows"),
    ],
)
def test_invalid_matrices_name_the_problem(matrix, where):
    with pytest.raises(RetainError, match="accuracy matrix") as info:
        compute_metrics(matrix)
    assert where in str(info.value)


def test_validate_matrix_returns_task_count():
    assert validate_matrix(THREE_TASKS) == 3
    assert validate_matrix([[0, 1], [1, 0.5]], joint=True) == 2
