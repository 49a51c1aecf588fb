"""The flag-rate test of prediction drift: it knows flags come in bursts (issue 9's quiet scenario
alarmed on one day in three with a binomial test)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ml_platform.monitoring.rate_test import daily_rate, rate_pvalue


def test_daily_rate_is_the_method_of_moments_estimate_over_full_days():
    # p = 100 / 5000 = 0.02; phi = (10^2 + 0 + 10^2 + 0 + 0) / (1000 * 0.02 * 0.98) / 4 = 2.5510;
    # rho = (phi - 1) / (1000 - 1). The 40-row day is partial (< half the median) and left out.
    daily = daily_rate([10, 20, 30, 20, 20, 3], [1000, 1000, 1000, 1000, 1000, 40])
    assert daily.days == 5
    assert daily.rate == pytest.approx(0.02)
    assert daily.rho == pytest.approx((200 / 19.6 / 4 - 1) / 999)
    # Binomial-looking days: no overdispersion; too few days: no estimate.
    assert daily_rate([20, 20, 20, 20, 20], [1000] * 5).rho == 0.0
    assert daily_rate([10, 30, 20], [1000] * 3).rho == 0.0
    with pytest.raises(ValueError, match="3 flag counts for 2 day sizes"):
        daily_rate([1, 2, 3], [10, 10])


def test_rate_pvalue_is_the_binomial_at_rho_zero_and_wider_with_rho():
    assert rate_pvalue(3, 3000, 0.0056) == pytest.approx(stats.binomtest(3, 3000, 0.0056).pvalue)
    # 3 flags where 16.8 are expected: binomial p ~ 1e-4, but days this model's data varies by
    # (rho 0.0017, a dispersion of ~6 at 3,000 rows) make it an ordinary day.
    assert rate_pvalue(3, 3000, 0.0056) < 0.001
    assert rate_pvalue(3, 3000, 0.0056, rho=0.0017) > 0.05
    with pytest.raises(ValueError, match="rate"):
        rate_pvalue(1, 10, 0.0)


def test_bursty_quiet_days_do_not_alarm_and_a_fivefold_rate_does():
    rng = np.random.default_rng(4)
    n, p, rho, alpha = 3000, 0.005, 0.0017, 0.01
    scale = 1 / rho - 1

    def days(k, rate):
        return stats.betabinom(n, rate * scale, (1 - rate) * scale).rvs(k, random_state=rng)

    reference = daily_rate(days(30, p), [n] * 30)
    assert 0.0005 < reference.rho < 0.004  # estimated from 30 days, within a factor ~3
    quiet = days(300, p)
    binomial_alarms = np.mean([rate_pvalue(int(x), n, reference.rate) < alpha for x in quiet])
    alarms = np.mean([rate_pvalue(int(x), n, reference.rate, reference.rho) < alpha for x in quiet])
    assert binomial_alarms > 0.15  # the binomial test cries wolf on bursty data
    assert alarms < 0.03
    # The price: with days this bursty one day's flags must move ~5x to stand out (a 3x day is an
    # ordinary burst a third of the time); the score distribution's KS sees smaller shifts.
    shifted = days(100, 5 * p)
    assert np.mean([rate_pvalue(int(x), n, reference.rate, reference.rho) < alpha for x in shifted]) > 0.7
