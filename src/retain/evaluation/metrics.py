"""Continual-learning metrics computed from the accuracy matrix alone.

`R[i][j]` is the score on task j after training task i, with tasks numbered 1..T as in the papers:
row 0 is the model before any training and column j - 1 holds task j (Python lists start at 0). A matrix
has T + 1 rows and T columns; a row not evaluated yet may be None (a partial run), and a metric that
needs such a row is None. A metric that needs more tasks than there are (BWT with T = 1) is None too,
never 0, so that "no forgetting measured" and "nothing to measure" stay apart.

A "joint" matrix has 2 rows, before and after training on all tasks at once (the multitask upper
bound); only Last and Avg, both the mean of row 1, are defined for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real

from retain.errors import RetainError

Matrix = Sequence[Sequence[float] | None]

METRIC_NAMES = ("last", "avg", "bwt", "fwt", "forgetting", "plasticity")


def validate_matrix(matrix: Matrix, joint: bool = False) -> int:
    """Check the shape and values of an accuracy matrix and return T, the number of tasks.

    Raises RetainError naming the offending row or cell: wrong row count or length, a value that is
    not a number, NaN, or outside [0, 1].
    """
    if isinstance(matrix, str | bytes) or not isinstance(matrix, Sequence):
        raise RetainError(
            f"accuracy matrix: expected a list of rows, got {type(matrix).__name__}; "
            "give T + 1 rows (row 0 before training) of T scores in [0, 1]"
        )
    rows = [row for row in matrix if row is not None]
    if joint:
        if len(matrix) != 2:
            raise RetainError(
                f"joint accuracy matrix: expected 2 rows (before, after joint training), got {len(matrix)}"
            )
        n_tasks = len(rows[0]) if rows else 0
    else:
        n_tasks = len(matrix) - 1
    if n_tasks < 1 and (rows or not joint):
        raise RetainError(
            f"accuracy matrix: {len(matrix)} row(s) give no task; a stream of T tasks needs T + 1 rows "
            "(row 0 before training) of T scores each"
        )
    _check_rows(matrix, n_tasks, "accuracy matrix")
    return n_tasks


def _check_rows(matrix: Matrix, n_columns: int, what: str) -> None:
    """Every row not None holds `n_columns` numbers in [0, 1]; RetainError naming the row and cell."""
    for i, row in enumerate(matrix):
        if row is None:
            continue
        if isinstance(row, str | bytes) or not isinstance(row, Sequence):
            raise RetainError(f"{what} row {i}: expected a list of {n_columns} scores or null")
        if len(row) != n_columns:
            raise RetainError(
                f"{what} row {i}: has {len(row)} score(s) but the matrix has {n_columns} task(s) "
                f"({len(matrix)} rows); every row needs one score per task"
            )
        for j, value in enumerate(row):
            if isinstance(value, bool) or not isinstance(value, Real):
                raise RetainError(
                    f"{what} row {i}, column {j}: {value!r} is not a number; scores are in [0, 1]"
                )
            if math.isnan(value) or not 0.0 <= value <= 1.0:
                raise RetainError(
                    f"{what} row {i}, column {j}: {value!r} is not in [0, 1]; "
                    "scores are fractions (0.75, not 75) and never NaN"
                )


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _rows(matrix: Matrix, needed: range) -> bool:
    """True when every row in `needed` has been evaluated."""
    return all(matrix[i] is not None for i in needed)


def _r(matrix: Matrix, i: int, j: int) -> float:
    """R[i][j] with task j numbered from 1, as in the definitions."""
    return float(matrix[i][j - 1])  # type: ignore[index]


def last_accuracy(matrix: Matrix) -> float | None:
    """Last (final average accuracy): mean_j R[T][j], the mean score on all tasks after the last one.

    Called ACC in Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017).
    """
    n = validate_matrix(matrix)
    if matrix[n] is None:
        return None
    return _mean([_r(matrix, n, j) for j in range(1, n + 1)])


def average_incremental_accuracy(matrix: Matrix) -> float | None:
    """Avg (average incremental accuracy, MAA): mean_{i=1..T} of mean_{j<=i} R[i][j].

    The mean over training steps of the accuracy on the tasks seen so far; Rebuffi et al., "iCaRL"
    (CVPR 2017), reported as MAA in continual instruction tuning papers.
    """
    n = validate_matrix(matrix)
    if not _rows(matrix, range(1, n + 1)):
        return None
    return _mean([_mean([_r(matrix, i, j) for j in range(1, i + 1)]) for i in range(1, n + 1)])


def backward_transfer(matrix: Matrix) -> float | None:
    """BWT: mean_{j<T} (R[T][j] - R[j][j]); negative when learning later tasks hurt earlier ones.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning" (NeurIPS 2017). None for T = 1.
    """
    n = validate_matrix(matrix)
    if n < 2 or not _rows(matrix, range(1, n + 1)):
        return None
    return _mean([_r(matrix, n, j) - _r(matrix, j, j) for j in range(1, n)])


def forward_transfer(matrix: Matrix) -> float | None:
    """FWT: mean_{j>1} (R[j-1][j] - R[0][j]); how much earlier tasks help a task before it is trained.

    Lopez-Paz & Ranzato (NeurIPS 2017), with the model before training (row 0) as the baseline.
    None for T = 1.
    """
    n = validate_matrix(matrix)
    if n < 2 or not _rows(matrix, range(0, n)):
        return None
    return _mean([_r(matrix, j - 1, j) - _r(matrix, 0, j) for j in range(2, n + 1)])


def forgetting(matrix: Matrix) -> float | None:
    """Forgetting (max - last): mean_{j<T} (max_{i in [j, T-1]} R[i][j] - R[T][j]); >= 0.

    Chaudhry et al., "Riemannian Walk for Incremental Learning" (ECCV 2018), with the maximum taken from
    the step task j was trained. Unlike -BWT it counts a drop from the best score, not from the first one.
    None for T = 1.
    """
    n = validate_matrix(matrix)
    if n < 2 or not _rows(matrix, range(1, n + 1)):
        return None
    return _mean([max(_r(matrix, i, j) for i in range(j, n)) - _r(matrix, n, j) for j in range(1, n)])


def plasticity(matrix: Matrix) -> float | None:
    """Plasticity (New.ACC, mean final-task accuracy, MFT): mean_j R[j][j], each task just after training it.

    The learning side of the stability-plasticity trade-off (Chaudhry et al., ECCV 2018, measure its
    opposite as "intransigence"); continual instruction tuning papers report it as New.ACC or MFT.
    """
    n = validate_matrix(matrix)
    if not _rows(matrix, range(1, n + 1)):
        return None
    return _mean([_r(matrix, j, j) for j in range(1, n + 1)])


def avalanche_forgetting(matrix: Matrix) -> float | None:
    """Avalanche's forgetting (first - last): mean_{j<T} (R[j][j] - R[T][j]), equal to -BWT.

    Avalanche's `StreamForgetting` (Lomonaco et al., "Avalanche", CVPR-W 2021). Offered by name only;
    `compute_metrics`' "forgetting" is the max-minus-last definition.
    """
    n = validate_matrix(matrix)
    if n < 2 or not _rows(matrix, range(1, n + 1)):
        return None
    return _mean([_r(matrix, j, j) - _r(matrix, n, j) for j in range(1, n)])


def compute_metrics(matrix: Matrix, joint: bool = False) -> dict[str, float | None]:
    """All standard metrics: last, avg, bwt, fwt, forgetting, plasticity (None where undefined).

    With `joint=True` the matrix has 2 rows (before and after joint training): last and avg are the mean
    of row 1, the others None.
    """
    if joint:
        validate_matrix(matrix, joint=True)
        after = matrix[1]
        value = _mean([float(v) for v in after]) if after else None
        return {name: value if name in ("last", "avg") else None for name in METRIC_NAMES}
    return {
        "last": last_accuracy(matrix),
        "avg": average_incremental_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "fwt": forward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "plasticity": plasticity(matrix),
    }


def _retention(scores: list[float | None]) -> dict[str, float | int | None]:
    """before, last, drop, worst, worst_row and max_drop of one series of scores over rows 0..N."""
    before, last = scores[0], scores[-1]
    trained = [(value, i) for i, value in enumerate(scores) if i > 0 and value is not None]
    # The first of equal minima: the earliest row at which the ability was at its lowest.
    worst, worst_row = min(trained, key=lambda pair: (pair[0], pair[1])) if trained else (None, None)
    return {
        "before": before,
        "last": last,
        "drop": None if before is None or last is None else before - last,
        "worst": worst,
        "worst_row": worst_row,
        "max_drop": None if before is None or worst is None else before - worst,
    }


def general_retention(matrix_general: Matrix, tasks: Sequence[str] | None = None) -> dict:
    """General retention: what training the stream did to the eval-only (general-ability) tasks.

    `matrix_general[i][g]` is the score on eval-only task g after training the i-th task (row 0: before
    any training, the last row: after the whole stream; a row not evaluated is None), with as many rows
    as the stream's matrix and one column per eval-only task. These tasks are never trained, so the
    stream metrics (Last, Avg, BWT, ...) do not apply; instead, for each task and for their mean per row:

    - `before` = R[0][g] and `last` = R[N][g] (N the last row);
    - `drop` = R[0][g] - R[N][g]: the ability lost by the end of the stream (negative: gained);
    - `worst` = min_{i >= 1} R[i][g], reached first at row `worst_row`, and `max_drop` = R[0][g] - worst:
      the deepest dip at any point of the stream, which a recovery by the last row would hide.

    Returns `{"mean": {...}, "tasks": {name: {...}}}` with those keys (None where a needed row is
    missing), the mean taken over the eval-only tasks row by row before the keys are computed; tasks are
    named by `tasks` (default task1..taskG).
    """
    if isinstance(matrix_general, str | bytes) or not isinstance(matrix_general, Sequence):
        raise RetainError("general matrix: expected a list of rows (row 0 before training), one per row")
    if len(matrix_general) < 2:
        raise RetainError(
            f"general matrix: {len(matrix_general)} row(s); it has the stream matrix's rows, at least 2 "
            "(before training and after the first task)"
        )
    rows = [row for row in matrix_general if row is not None]
    n_columns = len(rows[0]) if rows else len(tasks or [])
    _check_rows(matrix_general, n_columns, "general matrix")
    names = list(tasks) if tasks is not None else [f"task{g}" for g in range(1, n_columns + 1)]
    if len(names) != n_columns:
        raise RetainError(f"general matrix: {len(names)} task name(s) for {n_columns} column(s)")
    per_task = {
        name: _retention([None if row is None else float(row[g]) for row in matrix_general])
        for g, name in enumerate(names)
    }
    means = [None if row is None or not row else _mean([float(v) for v in row]) for row in matrix_general]
    return {"mean": _retention(means), "tasks": per_task}
