"""How sure a table's numbers are: a bootstrap over test items and training seeds.

Every number of a table (a task score, AP, BWT, FWT, and each row's difference from the
reference row) is a function of per-item outcomes: 0/1 for accuracy and exact match, a ROUGE
value for summaries. The uncertainty has two sources: which test items were drawn (the test set
is a sample) and which training seed was used (training is a sample). One bootstrap replicate
redraws both, the same way for every row of the table:

* items: for every task, its test items drawn with replacement (as multinomial counts), the same
  draw for every row, seed, accuracy-matrix cell and the base model, so differences between rows
  and AP/BWT/FWT, which reuse items across cells, are paired exactly as they were measured;
* seeds: the table's seeds drawn with replacement, the same draw for every row (run s of two rows
  shares its data order and initial noise), and a row's value is the mean over the drawn seeds.

A statistic's interval is the 2.5th and 97.5th percentile of its replicates (``B`` of them,
seeded, so a table is reproducible); a difference from the reference row is marked when its
interval excludes zero. With few seeds the seed part is a little narrow (a bootstrap of n values
has variance (n-1)/n of the truth: 2/3 with three seeds); the item part is exact in the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import stages.core  # noqa: F401  (its thread settings, before numpy loads its BLAS)

import numpy as np

LEVEL = 0.95
REPLICATES = 2000


@dataclass
class Resampler:
    """The bootstrap draws of one table: item weights per task and seed picks, shared by all rows."""

    weights: dict[str, np.ndarray]  # task -> (B + 1, n_items) counts / n_items; row 0 is the sample itself
    seed_picks: np.ndarray  # (B + 1, n_seeds) indices into the seeds; row 0 takes each seed once

    @classmethod
    def draw(cls, items_per_task: dict[str, int], n_seeds: int, replicates: int = REPLICATES, seed: int = 0) -> Resampler:
        rng = np.random.default_rng(seed)
        weights = {}
        for task, n in items_per_task.items():
            if n < 1:
                raise ValueError(f"task {task!r} has no test items to resample")
            counts = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates)
            weights[task] = np.vstack([np.ones((1, n)), counts]) / n
        picks = np.vstack([np.arange(n_seeds)[None, :], rng.integers(0, n_seeds, size=(replicates, n_seeds))])
        return cls(weights, picks)

    def score(self, task: str, outcomes: np.ndarray) -> np.ndarray:
        """(B + 1,) mean outcome of one scored cell under every item draw (index 0: as measured)."""
        return self.weights[task] @ outcomes

    def over_seeds(self, per_seed: np.ndarray) -> np.ndarray:
        """(B + 1,) the mean over seeds of a statistic given per seed as (n_seeds, B + 1): each
        replicate averages the seeds it drew, under its own item draw."""
        columns = np.arange(per_seed.shape[1])
        return per_seed[self.seed_picks.T, columns].mean(axis=0)


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high): the statistic as measured and its percentile interval."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(replicates[1:], [tail, 100 - tail])
    return float(replicates[0]), float(low), float(high)


def excludes_zero(replicates: np.ndarray, level: float = LEVEL) -> int:
    """+1 / -1 when the interval of a difference lies above / below zero, else 0."""
    _, low, high = interval(replicates, level)
    return 1 if low > 0 else -1 if high < 0 else 0


def average_performance(final: list[np.ndarray]) -> np.ndarray:
    """AP per replicate: the mean over tasks of the final scores."""
    return np.mean(final, axis=0)


def backward_transfer(matrix: list[list[np.ndarray | None]]) -> np.ndarray | None:
    """BWT per replicate: mean_{i<T} (a[T, i] - a[i, i]); None for one task."""
    last = len(matrix) - 1
    if last == 0:
        return None
    return np.mean([matrix[last][i] - matrix[i][i] for i in range(last)], axis=0)


def forward_transfer(matrix: list[list[np.ndarray | None]], zero_shot: list[np.ndarray]) -> np.ndarray | None:
    """FWT per replicate: mean_{i>0} (a[i-1, i] - zero-shot score of task i); None for one task."""
    if len(matrix) < 2:
        return None
    return np.mean([matrix[i - 1][i] - zero_shot[i] for i in range(1, len(matrix))], axis=0)
