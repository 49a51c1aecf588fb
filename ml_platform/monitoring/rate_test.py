"""Is today's count of flagged transactions unlike the model's usual days? A rate test that knows
flags come in bursts.

Fraud is clustered (one account takeover is a burst of transactions), so the number of flags a
day varies far more than a binomial with the average rate says: on the demo's data the daily
counts have a Pearson dispersion of about 6 (variance six times the binomial one), and a
binomial test alarms on one quiet day in three. The day's count is tested against a
beta-binomial instead, with the intra-day correlation `rho` estimated (method of moments) from the
model's own held-out days, so the test's variance is the one the model's data really has, for a
day of any size: Var = n p (1 - p) (1 + (n - 1) rho). rho = 0 is the exact binomial test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_DAYS = 5  # fewer full days: no estimate of the day-to-day variation (rho = 0, the binomial test)
FULL_DAY_SHARE = 0.5  # a day counts when it holds at least this share of the median day's rows


@dataclass(frozen=True)
class DailyRate:
    """The flag rate of a model's full days and how much it varies from day to day."""

    rate: float | None  # pooled over the full days (None: no full day)
    rho: float  # intra-day correlation (0: binomial)
    days: int  # full days used


def daily_rate(flags: Sequence[int], rows: Sequence[int]) -> DailyRate:
    """The pooled rate and the intra-day correlation rho of flags over days of `rows` rows with
    `flags` flagged. rho comes from the Pearson dispersion phi = sum((x - n p)^2 / (n p (1 - p))) /
    (k - 1) as rho = (phi - 1) / (n_bar - 1), never below 0. Days smaller than FULL_DAY_SHARE of the
    median (a partial day, or the last days of a training set, whose legit labels have not arrived
    and whose labelled rows are nearly all frauds) are left out; fewer than MIN_DAYS days: rho = 0."""
    x, n = np.asarray(flags, dtype="float64"), np.asarray(rows, dtype="float64")
    if x.shape != n.shape:
        raise ValueError(f"daily_rate: {len(x)} flag counts for {len(n)} day sizes")
    if len(n) == 0:
        return DailyRate(None, 0.0, 0)
    full = n >= FULL_DAY_SHARE * np.median(n)
    x, n = x[full], n[full]
    k = len(n)
    p = float(x.sum() / n.sum()) if n.sum() else None
    if k < MIN_DAYS or p is None or not 0 < p < 1:
        return DailyRate(p, 0.0, k)
    phi = float(np.sum((x - n * p) ** 2 / (n * p * (1 - p))) / (k - 1))
    n_bar = float(n.mean())
    rho = max(0.0, (phi - 1) / (n_bar - 1)) if n_bar > 1 else 0.0
    return DailyRate(p, min(rho, 0.5), k)


def rate_pvalue(flagged: int, rows: int, rate: float, rho: float = 0.0) -> float:
    """Two-sided p-value of `flagged` of `rows` under a rate `rate` (0 < rate < 1) with intra-day
    correlation `rho`: the exact binomial test when rho = 0, else the beta-binomial with that mean
    and correlation (twice the smaller tail, at most 1)."""
    if not 0 < rate < 1:
        raise ValueError(f"rate_pvalue: rate = {rate!r} must be in (0, 1)")
    if not 0 <= rho < 1:
        raise ValueError(f"rate_pvalue: rho = {rho!r} must be in [0, 1)")
    if rho == 0:
        return float(stats.binomtest(flagged, rows, rate).pvalue)
    scale = 1 / rho - 1  # alpha + beta of the beta-binomial
    dist = stats.betabinom(rows, rate * scale, (1 - rate) * scale)
    return float(min(1.0, 2 * min(dist.cdf(flagged), dist.sf(flagged - 1))))
