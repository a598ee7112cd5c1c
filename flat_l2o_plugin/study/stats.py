"""Paired comparisons with every source of variance, and a correction for many of them.

A learned optimizer's test accuracy varies with the meta-training seed (which
optimizer came out of meta-training) and with the evaluation seed (the optimizee's
initialization and mini-batch order). A study that averages over evaluation seeds and
then puts an interval over meta-seeds, while every meta-seed meets the *same* baseline
runs, leaves the baseline's seed variance out. Here each comparison is a set of paired
differences

    d[m][e] = score(treatment, meta-seed m, eval seed s(m, e)) − score(reference, s(m, e)),

where every (m, e) pair has its own evaluation seed s(m, e), so the reference is run on
as many seeds as the treatment has (meta-seed, eval seed) pairs and its variance enters
every difference. Clusters are meta-seeds (units that share a meta-trained optimizer);
a comparison between two hand-designed optimizers has one observation per cluster.

Two intervals are computed for the mean difference μ (the mean of the cluster means):

* the **two-level bootstrap**: resample clusters with replacement, then the
  observations within each drawn cluster, and take percentiles of the mean;
* the **random-effects t interval**: for d[m][e] = μ + u_m + ε_me, the mean of the
  cluster means has variance σ_u²/M + σ_ε²/(M·E), estimated without bias by the
  sample variance of the cluster means over M; with M − 1 degrees of freedom this is
  the classical interval of a balanced one-way random-effects model.

With few clusters the percentile bootstrap is too narrow (it ignores that the cluster
variance is itself estimated), and with many it agrees with the t interval; verdicts
therefore use whichever of the two is **wider**, and the larger of the two p-values.
Holm's step-down procedure then controls the family-wise error rate over every
comparison of a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Comparison", "compare", "holm", "cluster_means", "random_effects_interval", "bootstrap_interval"]


def cluster_means(clusters: Sequence[Sequence[float]]) -> np.ndarray:
    """The mean of each cluster, ignoring NaN observations; clusters left empty are dropped."""
    means = []
    for cluster in clusters:
        values = np.asarray(cluster, dtype=float)
        values = values[~np.isnan(values)]
        if values.size:
            means.append(values.mean())
    return np.asarray(means, dtype=float)


def _t_quantile(q: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(q, df))


def random_effects_interval(clusters: Sequence[Sequence[float]], level: float = 0.95) -> tuple[float, float, float]:
    """``(low, high, p)``: the t interval of the mean of cluster means, and its two-sided p-value.

    With one observation per cluster this is the paired t-test. Fewer than two clusters
    give an interval of NaNs and p = 1.
    """
    means = cluster_means(clusters)
    if means.size < 2:
        return math.nan, math.nan, 1.0
    mean, se = float(means.mean()), float(means.std(ddof=1) / math.sqrt(means.size))
    df = means.size - 1
    if se == 0:
        return mean, mean, (1.0 if mean == 0 else 0.0)
    half = _t_quantile(0.5 + level / 2, df) * se
    from scipy import stats

    p = float(2 * stats.t.sf(abs(mean) / se, df))
    return mean - half, mean + half, p


def bootstrap_interval(clusters: Sequence[Sequence[float]], level: float = 0.95, *, resamples: int = 4000,
                       seed: int = 0) -> tuple[float, float, float]:
    """``(low, high, p)``: the two-level percentile bootstrap of the mean of cluster means.

    The p-value is the percentile bootstrap's: twice the smaller tail mass on either
    side of 0, at least 1/resamples. The generator is seeded, so the result is a pure
    function of the data.
    """
    groups = [np.asarray(c, dtype=float) for c in clusters]
    groups = [g[~np.isnan(g)] for g in groups]
    groups = [g for g in groups if g.size]
    if len(groups) < 2 and not (len(groups) == 1 and groups[0].size > 1):
        return math.nan, math.nan, 1.0
    rng = np.random.default_rng(seed)
    m = len(groups)
    # Pad clusters to a rectangle so one vectorized draw resamples every level at once.
    sizes = np.array([g.size for g in groups])
    table = np.full((m, sizes.max()), np.nan)
    for i, g in enumerate(groups):
        table[i, : g.size] = g
    if m == 1:  # a single cluster: the ordinary bootstrap over its observations
        picks = rng.integers(0, sizes[0], size=(resamples, sizes[0]))
        stats = table[0][picks].mean(axis=1)
    else:
        chosen = rng.integers(0, m, size=(resamples, m))
        within = rng.random((resamples, m, sizes.max()))
        index = np.floor(within * sizes[chosen][..., None]).astype(int)
        mask = np.arange(sizes.max())[None, None, :] < sizes[chosen][..., None]
        values = table[chosen[..., None], index]
        per_cluster = np.where(mask, values, 0.0).sum(axis=2) / sizes[chosen]
        stats = per_cluster.mean(axis=1)
    alpha = 1 - level
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    tail = min(float(np.mean(stats <= 0)), float(np.mean(stats >= 0)))
    return float(low), float(high), float(min(1.0, max(2 * tail, 1 / resamples)))


@dataclass(frozen=True)
class Comparison:
    """One paired comparison, treatment − reference.

    Attributes:
        mean: The mean of the cluster means.
        low, high: The reported 95% interval (the wider of bootstrap and random-effects).
        p: Its two-sided p-value (the larger of the two).
        clusters: Independent units (meta-seeds; evaluation seeds when no learned
            optimizer is involved).
        observations: Paired differences in all.
        wins: Clusters whose mean difference is > 0 ("pairs won" over independent units).
        bootstrap, random_effects: The two intervals as ``(low, high)``.
    """

    mean: float
    low: float
    high: float
    p: float
    clusters: int
    observations: int
    wins: int
    bootstrap: tuple[float, float]
    random_effects: tuple[float, float]


def compare(clusters: Mapping[object, Sequence[float]] | Sequence[Sequence[float]], level: float = 0.95, *,
            resamples: int = 4000, seed: int = 0) -> Comparison:
    """The paired comparison of :data:`Comparison` from differences grouped by cluster.

    Args:
        clusters: Paired differences per cluster (a mapping from cluster key, or a list).
        level: Confidence level of the interval.
        resamples, seed: Of the bootstrap.
    """
    groups = list(clusters.values()) if isinstance(clusters, Mapping) else list(clusters)
    means = cluster_means(groups)
    observations = sum(int(np.sum(~np.isnan(np.asarray(g, dtype=float)))) for g in groups)
    if not means.size:
        nan = (math.nan, math.nan)
        return Comparison(math.nan, math.nan, math.nan, 1.0, 0, 0, 0, nan, nan)
    b_low, b_high, b_p = bootstrap_interval(groups, level, resamples=resamples, seed=seed)
    r_low, r_high, r_p = random_effects_interval(groups, level)
    lows, highs = [x for x in (b_low, r_low) if not math.isnan(x)], [x for x in (b_high, r_high) if not math.isnan(x)]
    low, high = (min(lows), max(highs)) if lows else (math.nan, math.nan)
    return Comparison(mean=float(means.mean()), low=low, high=high, p=max(b_p, r_p), clusters=int(means.size),
                      observations=observations, wins=int(np.sum(means > 0)), bootstrap=(b_low, b_high),
                      random_effects=(r_low, r_high))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, family-wise error control), in the input order.

    ``adjusted[(i)] = max_{j ≤ i} min(1, (n − j + 1) · p[(j)])`` over the p-values sorted
    ascending; a hypothesis is rejected at level α when its adjusted p-value is < α.
    NaN p-values count as 1.
    """
    ps = [1.0 if p is None or math.isnan(p) else float(p) for p in p_values]
    n = len(ps)
    order = sorted(range(n), key=lambda i: ps[i])
    adjusted = [1.0] * n
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (n - rank) * ps[i]))
        adjusted[i] = running
    return adjusted
