"""Continual-learning metrics over an accuracy matrix a[t][i] = score on task i after task t.

The metrics read only some cells: AP the last row, BWT the diagonal, FWT the cell before each
diagonal one (a[i-1][i]). ``scored_tasks`` gives those cells row by row, so a long sequence can be
scored on 3T-2 of its T² cells; an unscored cell is None and no metric reads it.
"""

from __future__ import annotations

# Sequences shorter than this are scored on every cell (3T-2 = T² for T <= 2; 7 of 9 for T = 3).
SPARSE_FROM = 4


def scored_tasks(n_tasks: int, after: int, full: bool) -> list[int]:
    """The tasks to score after training task ``after`` (0-based): every task where ``full``, the
    sequence is short or ``after`` is the last task; else the task just trained (BWT's diagonal)
    and the next one (FWT's a[i-1][i])."""
    if full or n_tasks < SPARSE_FROM or after == n_tasks - 1:
        return list(range(n_tasks))
    return [after, after + 1]


def average_performance(matrix: list[list[float | None]]) -> float:
    """AP = mean_i a[T, i]: the final model's mean score over every task of the sequence."""
    final = matrix[-1]
    return sum(final) / len(final)


def backward_transfer(matrix: list[list[float | None]]) -> float | None:
    """BWT = mean_{i<T} (a[T, i] - a[i, i]): negative means forgetting; None for one task."""
    last = len(matrix) - 1
    if last == 0:
        return None
    return sum(matrix[last][i] - matrix[i][i] for i in range(last)) / last


def forward_transfer(matrix: list[list[float | None]], zero_shot: list[float]) -> float | None:
    """FWT = mean_{i>0} (a[i-1, i] - zero-shot score of i): what earlier tasks did for later ones."""
    if len(matrix) < 2:
        return None
    return sum(matrix[i - 1][i] - zero_shot[i] for i in range(1, len(matrix))) / (len(matrix) - 1)
