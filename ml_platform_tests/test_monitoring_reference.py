"""The monitoring reference stored with a model: steady-state rows only (past the features' history
warm-up), the held-out scores and flag rate, saved and loaded as a whole."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml_platform import features as fr
from ml_platform.monitoring.reference import MonitoringReference, build_reference
from ml_platform.training import ModelContract

CONTRACT = ModelContract.from_features(feature_refs=fr.user_transaction_stats.feature_refs()).with_threshold(0.5)


class _AmountModel:
    """P(fraud) = amount / 100 (a model whose scores are known in advance)."""

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        p = np.clip(frame["amount"].to_numpy(dtype="float64") / 100.0, 0, 1)
        return np.column_stack([1 - p, p])


def _training_frame(days: int = 60, per_day: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = days * per_day
    day = np.repeat(np.arange(days), per_day)
    frame = pd.DataFrame({c: rng.normal(size=n) for c in CONTRACT.input_columns if c not in CONTRACT.categorical_features})
    for c in CONTRACT.categorical_features:
        frame[c] = rng.choice(["a", "b"], n)
    frame["amount"] = rng.uniform(0, 100, n)
    frame["day"] = day  # marks each row's day for the assertions
    frame[fr.EVENT_TS] = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(day, unit="D") + pd.Timedelta(hours=12)
    frame[fr.LABEL] = (rng.random(n) < 0.1).astype("int64")
    frame["split"] = np.select([day < 0.6 * days, day < 0.8 * days], ["train", "validation"], "test")
    return frame


def test_the_reference_leaves_out_the_warm_up_and_scores_the_held_out_steady_rows(tmp_path):
    frame = _training_frame()
    warmup_days = fr.history_warmup(CONTRACT.feature_refs).days
    assert warmup_days == 30  # the user views' longest window, no label settling
    ref = build_reference(_AmountModel(), CONTRACT, frame, {"pr_auc": 0.5}, data_version="v", max_rows=10_000)
    # Inputs: every row from day 30 on (all splits), none before.
    steady = frame[frame["day"] >= warmup_days]
    assert len(ref.inputs) == len(steady)
    assert list(ref.inputs.columns) == list(CONTRACT.input_columns)
    assert sorted(ref.inputs["amount"]) == sorted(steady["amount"])
    # Scores: the model's on held-out (validation + test) steady rows; the flag rate at 0.5.
    held_out = steady[steady["split"] != "train"]
    assert sorted(ref.scores["probability"]) == pytest.approx(sorted(held_out["amount"] / 100))
    assert ref.positive_rate == pytest.approx((held_out["amount"] >= 50).mean())
    assert ref.metrics == {"pr_auc": 0.5}
    assert ref.summary["warmup_days"] == 30 and "left out" in ref.summary["reference_note"]
    # Saved and loaded as a whole.
    back = MonitoringReference.load(ref.save(tmp_path / "ref"))
    pd.testing.assert_frame_equal(back.inputs, ref.inputs)
    assert back.summary == ref.summary


def test_a_history_shorter_than_the_warm_up_falls_back_to_its_latest_third_and_says_so():
    frame = _training_frame(days=21)
    ref = build_reference(_AmountModel(), CONTRACT, frame, {}, data_version="v")
    assert len(ref.inputs) == (frame["day"] >= 14).sum()
    assert "shorter than the features' 30-day warm-up" in ref.summary["reference_note"]


def test_the_sample_is_bounded_and_seeded():
    frame = _training_frame()
    a = build_reference(_AmountModel(), CONTRACT, frame, {}, data_version="v", max_rows=500, seed=1)
    b = build_reference(_AmountModel(), CONTRACT, frame, {}, data_version="v", max_rows=500, seed=1)
    assert len(a.inputs) == 500
    pd.testing.assert_frame_equal(a.inputs, b.inputs)


def test_a_frame_without_splits_is_refused():
    with pytest.raises(ValueError, match="no `split` column"):
        build_reference(_AmountModel(), CONTRACT, _training_frame().drop(columns="split"), {}, data_version="v")


def test_a_model_retrained_after_a_drift_is_monitored_against_the_rows_since_the_drift():
    frame = _training_frame(per_day=300)
    since = (pd.Timestamp("2026-01-01") + pd.Timedelta(days=50)).date()
    ref = build_reference(_AmountModel(), CONTRACT, frame, {}, data_version="v", since=since)
    after = frame[frame["day"] >= 50]  # 10 days x 300 rows, all splits
    assert sorted(ref.inputs["amount"]) == sorted(after["amount"])
    assert "the drift this model was retrained for" in ref.summary["reference_note"]
    # The day-to-day variation of each input is measured on those days (300 rows each).
    assert set(ref.day_to_day_effects) == set(CONTRACT.input_columns)
    assert all(0 < e < 0.2 for e in ref.day_to_day_effects.values())
    # Fewer rows than MIN_STEADY_ROWS since the drift: the steady rows, as for any model.
    late = build_reference(_AmountModel(), CONTRACT, frame, {}, data_version="v",
                           since=(pd.Timestamp("2026-01-01") + pd.Timedelta(days=58)).date())
    assert len(late.inputs) == int((frame["day"] >= 30).sum())
