"""The statistics the regularizer-cost benchmark decides its targets with."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from scipy.stats import binom

_spec = importlib.util.spec_from_file_location(
    "bench_regularizer_cost_stats", Path(__file__).resolve().parents[2] / "benchmarks" / "regularizer_cost.py")
cost = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cost)


@pytest.mark.parametrize("n", [6, 30, 60, 101])
def test_median_interval_takes_the_narrowest_order_statistics_with_the_coverage(n):
    values = [float(i) for i in range(n, 0, -1)]  # unsorted on purpose
    low, high, coverage = cost.median_interval(values, 0.95)
    k = int(low)  # the values are 1..n, so x_(k) = k
    assert high == n + 1 - k
    assert coverage == pytest.approx(1 - 2 * binom.cdf(k - 1, n, 0.5), abs=1e-12)
    assert coverage >= 0.95
    # One order statistic further in would no longer cover the median 95% of the time.
    assert 1 - 2 * binom.cdf(k, n, 0.5) < 0.95


def test_median_interval_with_too_few_values_is_the_range_and_says_its_coverage():
    assert cost.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0, 0.75)
    assert cost.median_interval([5.0]) == (5.0, 5.0, 0.0)
    with pytest.raises(ValueError):
        cost.median_interval([])


def test_median_interval_covers_the_median_of_a_skewed_distribution():
    rng = random.Random(0)
    trials, n, median = 2000, 30, 1.0  # lognormal(0, 1): median e^0 = 1
    hits = sum(low <= median <= high for low, high, _ in
               (cost.median_interval([rng.lognormvariate(0.0, 1.0) for _ in range(n)]) for _ in range(trials)))
    coverage = cost.median_interval([1.0] * n)[2]
    # Four binomial standard errors below the exact coverage: fails by chance with p < 1e-4.
    assert hits / trials >= coverage - 4 * (coverage * (1 - coverage) / trials) ** 0.5


@pytest.mark.parametrize(("low", "high", "expected"), [(1.1, 1.25, "met"), (1.31, 1.5, "not met"),
                                                      (1.2, 1.4, "undecided"), (1.3, 1.3, "met")])
def test_verdict_needs_the_whole_interval_on_one_side(low, high, expected):
    assert cost.target_verdict(low, high, 1.3) == expected
