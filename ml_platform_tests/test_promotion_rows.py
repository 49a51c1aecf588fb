"""A retrain after drift is judged on the held-out rows from the drift on (when there are enough)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml_platform import features as fr
from ml_platform.training.pipeline import RECENT_MIN_POSITIVES, RECENT_MIN_ROWS, promotion_rows


def _test_split(days: int = 10, per_day: int = 200, fraud_every: int = 20) -> pd.DataFrame:
    n = days * per_day
    day = np.repeat(np.arange(days), per_day)
    return pd.DataFrame({
        fr.EVENT_TS: pd.Timestamp("2026-03-01", tz="UTC") + pd.to_timedelta(day, unit="D") + pd.Timedelta(hours=9),
        fr.LABEL: (np.arange(n) % fraud_every == 0).astype("int64"),
    })


def test_without_an_episode_the_whole_test_split_is_compared():
    test = _test_split()
    rows, what = promotion_rows(test)
    assert len(rows) == len(test) and what == f"the test split ({len(test)} rows)"


def test_from_the_drift_on_when_there_are_enough_rows():
    test = _test_split()
    rows, what = promotion_rows(test, "2026-03-06")  # days 5..9: 1,000 rows, 50 frauds
    assert len(rows) == 1000 >= RECENT_MIN_ROWS and int(rows[fr.LABEL].sum()) == 50
    assert (rows[fr.EVENT_TS] >= pd.Timestamp("2026-03-06", tz="UTC")).all()
    assert what == "the 1000 test rows from 2026-03-06 on (after the drift; 50 frauds)"


def test_too_few_recent_rows_or_frauds_fall_back_to_the_whole_split_saying_so():
    test = _test_split()
    rows, what = promotion_rows(test, "2026-03-09")  # days 8..9: 400 rows
    assert len(rows) == len(test)
    assert what.endswith(f"only 400 rows with 20 frauds from 2026-03-09 on, fewer than {RECENT_MIN_ROWS} / "
                         f"{RECENT_MIN_POSITIVES}")
    few_frauds = _test_split(fraud_every=1000)  # 1,000 recent rows but 1 fraud
    rows, what = promotion_rows(few_frauds, "2026-03-06")
    assert len(rows) == len(few_frauds) and "with 1 frauds" in what
