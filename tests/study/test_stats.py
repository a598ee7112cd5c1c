"""The study's statistics against hand-worked values and against the model they assume."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from flat_l2o_plugin.study.stats import bootstrap_interval, cluster_means, compare, holm, random_effects_interval


def test_holm_matches_a_hand_worked_example():
    # Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")]) == [1.0, 1.0]
    assert holm([]) == []


def test_random_effects_interval_is_the_t_interval_of_cluster_means():
    clusters = [[0.1, 0.3], [0.5, 0.7, float("nan")], [0.0, 0.2], [0.4, 0.4]]
    means = np.array([0.2, 0.6, 0.1, 0.4])
    low, high, p = random_effects_interval(clusters)
    half = stats.t.ppf(0.975, 3) * means.std(ddof=1) / 2
    assert (low, high) == pytest.approx((means.mean() - half, means.mean() + half))
    assert p == pytest.approx(stats.ttest_1samp(means, 0.0).pvalue)
    assert list(cluster_means(clusters)) == pytest.approx(list(means))


def test_bootstrap_is_deterministic_and_reduces_to_the_ordinary_bootstrap():
    rng = np.random.default_rng(1)
    clusters = [list(rng.normal(0.2, 1.0, 10)) for _ in range(5)]
    assert bootstrap_interval(clusters, seed=3) == bootstrap_interval(clusters, seed=3)
    # One observation per cluster: resampling clusters is the ordinary bootstrap of the values,
    # whose percentile interval approaches mean ± 1.96 s/√n (here n = 400).
    values = rng.normal(1.0, 2.0, 400)
    low, high, _ = bootstrap_interval([[v] for v in values], resamples=20000)
    se = values.std(ddof=0) / math.sqrt(values.size)
    # The percentile quantiles of 20,000 resamples are within ~2% of the normal ones.
    assert low == pytest.approx(values.mean() - 1.96 * se, abs=0.1 * se)
    assert high == pytest.approx(values.mean() + 1.96 * se, abs=0.1 * se)


def test_wider_interval_covers_the_mean_of_a_random_effects_model():
    """d = μ + u_m + ε: 5 clusters of 10, the design of a headline row."""
    rng = np.random.default_rng(0)
    trials, covered, mu = 300, 0, 0.5
    for _ in range(trials):
        u = rng.normal(0, 1.0, 5)
        clusters = [list(mu + u[m] + rng.normal(0, 2.0, 10)) for m in range(5)]
        c = compare(clusters, resamples=1000)
        covered += c.low <= mu <= c.high
    # Nominal 95% (the t interval is exact under this model; the reported one is at least
    # as wide). Three binomial standard deviations below it: 0.95 - 3·√(0.95·0.05/300) ≈ 0.912.
    assert covered / trials >= 0.95 - 3 * math.sqrt(0.95 * 0.05 / trials)


def test_compare_counts_independent_units_and_reports_the_wider_interval():
    clusters = {0: [1.0, 2.0], 1: [-1.0, 0.0], 2: [3.0, 3.0]}
    c = compare(clusters)
    assert (c.clusters, c.observations, c.wins) == (3, 6, 2)
    assert c.mean == pytest.approx((1.5 - 0.5 + 3.0) / 3)
    assert c.low == min(c.bootstrap[0], c.random_effects[0])
    assert c.high == max(c.bootstrap[1], c.random_effects[1])
    empty = compare([[float("nan")]])
    assert math.isnan(empty.mean) and empty.p == 1.0 and empty.clusters == 0
