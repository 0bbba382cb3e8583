"""The bootstrap of stages/stats.py on cases whose answer is known: a 0/1 vector's interval
is the normal approximation's, a planted paired difference is found and a null one is flagged at
about the nominal 5% rate, seeds widen an interval, and AP/BWT/FWT follow their definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages import stats


def test_interval_of_a_proportion_matches_the_normal_approximation():
    n, p = 400, 0.7
    outcomes = np.array([1.0] * int(n * p) + [0.0] * (n - int(n * p)))
    boot = stats.Resampler.draw({"t": n}, n_seeds=1, replicates=4000, seed=1)
    estimate, low, high = stats.interval(boot.score("t", outcomes))
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert estimate == pytest.approx(p)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)


def paired_rows(rng, n: int, gain: float) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of a reference row and another row on the same n items: item i is answered right
    with probability p_i (items differ in difficulty, so the rows' outcomes are correlated), by the
    other row with p_i + ``gain`` (``gain`` 0: a null difference)."""
    difficulty = rng.beta(2, 2, n)
    reference = (rng.random(n) < difficulty).astype(float)
    row = (rng.random(n) < np.clip(difficulty + gain, 0, 1)).astype(float)
    return reference, row


def test_paired_test_finds_a_planted_difference_and_not_a_null_one_too_often():
    rng = np.random.default_rng(0)
    n, draws = 500, 200
    found = false_alarms = 0
    boot = stats.Resampler.draw({"t": n}, n_seeds=1, replicates=1000, seed=0)  # fresh data in every trial
    for _ in range(draws):
        reference, better = paired_rows(rng, n, gain=0.12)
        found += stats.excludes_zero(boot.score("t", better) - boot.score("t", reference)) == 1
        reference, same = paired_rows(rng, n, gain=0.0)
        false_alarms += stats.excludes_zero(boot.score("t", same) - boot.score("t", reference)) != 0
    assert found / draws > 0.95
    assert 0.01 <= false_alarms / draws <= 0.10  # nominal 5%


def test_seeds_widen_the_interval_and_the_estimate_is_their_mean():
    n = 300
    rng = np.random.default_rng(3)
    outcomes = (rng.random(n) < 0.5).astype(float)
    one_seed = stats.Resampler.draw({"t": n}, n_seeds=1, seed=2)
    three = stats.Resampler.draw({"t": n}, n_seeds=3, seed=2)
    per_seed = np.stack([three.score("t", outcomes) + shift for shift in (-0.1, 0.0, 0.1)])
    estimate, low, high = stats.interval(three.over_seeds(per_seed))
    _, low1, high1 = stats.interval(one_seed.over_seeds(one_seed.score("t", outcomes)[None, :]))
    assert estimate == pytest.approx(outcomes.mean())
    assert high - low > (high1 - low1) * 1.3


def test_continual_metrics_follow_their_definitions():
    matrix = [[np.array([0.8, 0.7]), np.array([0.3, 0.3])],
              [np.array([0.6, 0.5]), np.array([0.9, 0.8])]]
    zero = [np.array([0.5, 0.5]), np.array([0.2, 0.1])]
    np.testing.assert_allclose(stats.average_performance(matrix[-1]), [0.75, 0.65])
    np.testing.assert_allclose(stats.backward_transfer(matrix), [-0.2, -0.2])
    np.testing.assert_allclose(stats.forward_transfer(matrix, zero), [0.1, 0.2])
    assert stats.backward_transfer(matrix[:1]) is None and stats.forward_transfer([[matrix[0][0]]], zero) is None
