"""Training: contract, leak-free time split, data version, model quality and evaluation metrics."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)
from threadpoolctl import threadpool_limits

from ml_platform.features import (
    CATEGORICAL_FEATURES,
    EVENT_TS,
    LABEL,
    LABEL_TS,
    MODEL_FEATURE_REFS,
    REQUEST_FEATURES,
    add_request_features,
)
from ml_platform.training import (
    ModelContract,
    build_training_frame,
    calibration_table,
    choose_threshold,
    classification_metrics,
    data_version,
    evaluate,
    fraud_probability,
    time_split,
    train_model,
)

T0 = pd.Timestamp("2026-01-01", tz="UTC")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One OpenMP thread: on this shared 2-core machine HGB fit/predict are ~10x faster than with 2."""
    with threadpool_limits(limits=1):
        yield


FAST = {"max_iter": 30, "learning_rate": 0.2}


def synthetic_training_frame(n: int = 3000, seed: int = 0, signal: float = 1.0) -> pd.DataFrame:
    """A training frame shaped like build_training_frame's output, where fraud truly depends on
    `txn_count_1h`, `merchant_category == 'electronics'` and night-time (scaled by `signal`)."""
    rng = np.random.default_rng(seed)
    contract = ModelContract.from_features()
    frame = pd.DataFrame(
        {
            "transaction_id": [f"t{seed}-{i:06d}" for i in range(n)],
            "user_id": rng.integers(1, 300, n),
            "merchant_id": rng.integers(1, 50, n),
            EVENT_TS: T0 + pd.to_timedelta(np.sort(rng.uniform(0, 60 * 86400, n)), unit="s"),
            "amount": rng.lognormal(3.5, 1.0, n),
            "merchant_category": rng.choice(["grocery", "electronics", "travel", "fuel"], n),
            "country": rng.choice(["DE", "FR", "US", "GB"], n, p=[0.6, 0.2, 0.1, 0.1]),
            "device": rng.choice(["ios", "android", "web"], n),
            "channel": rng.choice(["pos", "online"], n),
        }
    )
    for col in contract.feature_columns:
        if col == "home_country":
            frame[col] = rng.choice(["DE", "FR", None], n, p=[0.7, 0.2, 0.1])
        elif "count" in col:
            frame[col] = rng.poisson(3, n).astype("int64")
        else:
            frame[col] = rng.gamma(2.0, 20.0, n)
    frame.loc[rng.random(n) < 0.05, "amount_mean_30d"] = np.nan  # a new user: no history
    frame = add_request_features(frame)
    logit = -3.2 + signal * (
        1.2 * (frame["txn_count_1h"] - 3)
        + 1.5 * (frame["merchant_category"] == "electronics")
        + 1.0 * frame["is_night"]
    )
    frame[LABEL] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame[LABEL_TS] = frame[EVENT_TS] + pd.to_timedelta(rng.uniform(0, 3 * 86400, n), unit="s")
    return frame


@pytest.fixture(scope="module")
def frame() -> pd.DataFrame:
    return synthetic_training_frame()


@pytest.fixture(scope="module")
def trained(frame):
    split = time_split(frame, train_frac=0.6, val_frac=0.2)
    model, contract = train_model(split.train, split.validation, params=FAST, random_state=0)
    return split, model, contract


# --- contract ---------------------------------------------------------------------------------


def test_contract_from_features_lists_every_input_once_in_order():
    contract = ModelContract.from_features()
    assert contract.feature_refs == tuple(MODEL_FEATURE_REFS)
    # home_country is a String feature view field, so it is categorical next to the request's own.
    assert contract.categorical_features == (*CATEGORICAL_FEATURES, "home_country")
    assert contract.input_columns[-5:] == contract.categorical_features
    assert contract.input_columns[:2] == ("txn_count_1h", "amount_sum_1h")
    assert set(REQUEST_FEATURES) <= set(contract.numeric_features)
    assert contract.input_columns.count("amount") == 1
    assert len(contract.input_columns) == 22 + 5 + 5  # numeric refs, request features, categoricals


def test_contract_json_round_trip_and_clear_errors():
    contract = ModelContract.from_features().with_threshold(0.37).with_registration("fraud_detector", 4)
    text = contract.to_json()
    assert json.loads(text)["decision_threshold"] == 0.37
    assert ModelContract.from_json(text) == contract
    with pytest.raises(ValueError, match=r"missing keys \['input_columns'\]"):
        ModelContract.from_json(
            json.dumps({k: v for k, v in contract.to_dict().items() if k != "input_columns"})
        )
    with pytest.raises(ValueError, match="no feature view named 'nope'"):
        ModelContract.from_features(feature_refs=["nope:x"])


def test_model_input_shapes_columns_and_names_missing_ones(frame):
    contract = ModelContract.from_features()
    x = contract.model_input(frame.head(20).iloc[:, ::-1])
    assert list(x.columns) == list(contract.input_columns)
    assert all(x[c].dtype == "float64" for c in contract.numeric_features)
    assert x["home_country"].isna().sum() == frame.head(20)["home_country"].isna().sum()
    with pytest.raises(ValueError, match=r"missing columns \['is_night'\]"):
        contract.model_input(frame.drop(columns=["is_night"]))


# --- time split -------------------------------------------------------------------------------


def test_time_split_excludes_rows_whose_label_arrives_after_the_cut():
    day = pd.Timedelta(days=1)
    # 10 events one per day; label delays chosen by hand.
    delays = [0.5, 0.5, 5.0, 0.5, 0.5, 0.5, 3.0, 0.5, 0.5, 9.0]
    ev = [T0 + i * day for i in range(10)]
    frame = pd.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(10)],
            EVENT_TS: ev,
            LABEL: [0, 1, 1, 0, 0, 1, 0, 1, 0, 1],
            LABEL_TS: [e + d * day for e, d in zip(ev, delays)],
        }
    )
    split = time_split(frame, as_of=T0 + 10 * day, train_frac=0.5, val_frac=0.3)
    # Known at as_of (day 10): all but t9 (label at day 18) -> 9 rows; cuts at sorted[4] and sorted[7].
    assert split.train_cut == T0 + 4 * day and split.validation_cut == T0 + 7 * day
    # t2 (label at day 7 > cut day 4) must not be trained on; t3 (label at day 3.5 <= 4) is.
    assert list(split.train["transaction_id"]) == ["t0", "t1", "t3"]
    # t6's label arrives at day 9: after t2 but before as_of, usable for validation by default.
    assert list(split.validation["transaction_id"]) == ["t4", "t5", "t6"]
    assert list(split.test["transaction_id"]) == ["t7", "t8"]
    assert split.rows_without_known_label == 2  # t2, t9
    assert (split.train[LABEL_TS] <= split.train_cut).all()
    assert split.summary()["train_positives"] == 1
    strict = time_split(frame, as_of=T0 + 10 * day, train_frac=0.5, val_frac=0.3, strict_validation=True)
    assert list(strict.validation["transaction_id"]) == ["t4", "t5"]  # t6's label is after t2
    assert strict.rows_without_known_label == 3
    # Labels settling in 2 days: test events must be at least 2 days older than as_of (day 8 is
    # the last), so t8 (day 8) stays and nothing else changes; with 3 days t8 is dropped too.
    settled = time_split(frame, as_of=T0 + 10 * day, train_frac=0.5, val_frac=0.3, settling=2 * day)
    assert list(settled.test["transaction_id"]) == ["t7", "t8"]
    settled = time_split(frame, as_of=T0 + 10 * day, train_frac=0.5, val_frac=0.3, settling=3 * day)
    assert list(settled.test["transaction_id"]) == ["t7"]
    assert list(settled.validation["transaction_id"]) == ["t4", "t5", "t6"]
    assert settled.rows_without_known_label == 3  # t2, t9 and the immature t8


def test_time_split_rejects_bad_fractions(frame):
    with pytest.raises(ValueError, match="train_frac"):
        time_split(frame, train_frac=0.8, val_frac=0.3)


# --- data version -----------------------------------------------------------------------------


def test_data_version_is_stable_and_content_sensitive(frame):
    sample = frame.head(200).assign(**{EVENT_TS: frame[EVENT_TS].head(200).dt.floor("us")})
    v = data_version(sample)
    assert len(v) == 16 and int(v, 16) >= 0
    assert data_version(sample.copy()) == v
    # Row order, column order and the timestamp storage unit do not matter.
    assert data_version(sample.sample(frac=1.0, random_state=1)) == v
    assert data_version(sample[sample.columns[::-1]]) == v
    assert data_version(sample.assign(**{EVENT_TS: sample[EVENT_TS].astype("datetime64[us, UTC]")})) == v
    changed = sample.copy()
    changed.loc[changed.index[17], "amount"] += 0.01
    assert data_version(changed) != v
    assert data_version(sample.head(199)) != v


# --- model ------------------------------------------------------------------------------------


def test_trained_model_learns_the_signal_and_threshold_is_max_f1(trained):
    split, model, contract = trained
    assert len(split.train) > 1500 and split.validation[LABEL].sum() > 10
    metrics = evaluate(model, contract, split.test)
    # The label depends on three inputs strongly; noise features cannot reach this.
    assert 0.80 < metrics["roc_auc"] < 0.99
    assert metrics["pr_auc"] > 2 * metrics["positives"] / metrics["rows"]
    # The threshold is the max-F1 point of the validation PR curve, recomputed here by hand.
    y_val = split.validation[LABEL].to_numpy()
    p_val = model.predict_proba(contract.model_input(split.validation))[:, 1]
    precision, recall, thresholds = precision_recall_curve(y_val, p_val)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    assert contract.decision_threshold == pytest.approx(thresholds[np.argmax(f1)])
    assert 0.0 < contract.decision_threshold < 1.0
    assert f1_score(y_val, p_val >= contract.decision_threshold) == pytest.approx(f1.max())


def test_training_is_reproducible_with_a_fixed_random_state(trained):
    split, model, contract = trained
    again, contract2 = train_model(split.train, split.validation, params=FAST, random_state=0)
    assert contract2 == contract
    np.testing.assert_array_equal(
        fraud_probability(again, contract, split.test), fraud_probability(model, contract, split.test)
    )


def test_model_handles_unseen_categories_and_missing_values(trained):
    split, model, contract = trained
    rows = split.test.head(3).copy()
    rows["merchant_category"] = ["never-seen", None, "grocery"]
    rows["amount_to_user_mean_30d"] = np.nan
    p = fraud_probability(model, contract, rows)
    assert p.shape == (3,) and np.isfinite(p).all()


def test_a_feature_null_in_every_training_row_trains_and_is_ignored(trained, caplog):
    """Label aggregates are null everywhere in an early train split (no label matured yet):
    scikit-learn's HistGradientBoosting fails on an all-missing column; the model trains, warns,
    and its scores do not depend on that feature (it could not have learnt from it)."""
    split, _, _ = trained
    train = split.train.copy()
    train["merchant_fraud_rate_30d"] = np.nan
    with caplog.at_level("WARNING", logger="ml_platform.training.model"):
        model, contract = train_model(train, split.validation, params=FAST)
    assert "merchant_fraud_rate_30d" in caplog.text and "null in all" in caplog.text
    rows = split.test.head(200)
    scored = [
        fraud_probability(model, contract, rows.assign(merchant_fraud_rate_30d=value))
        for value in (np.nan, 0.0, 0.9)
    ]
    np.testing.assert_array_equal(scored[0], scored[1])
    np.testing.assert_array_equal(scored[0], scored[2])
    assert scored[0].std() > 0  # the other features still score


def test_train_model_refuses_single_class_train_split(frame):
    train = frame[frame[LABEL] == 0].head(100)
    with pytest.raises(ValueError, match="single class"):
        train_model(train, frame.head(100), params=FAST)


def test_choose_threshold_by_hand():
    # F1 by threshold: 0.9 -> 0.5, 0.6 -> 0.8, 0.5 -> 2/3, 0.4 -> 0.857 (3 TP, 1 FP, 0 FN), 0.1 -> 0.75.
    assert choose_threshold(np.array([0, 1, 1, 0, 1]), np.array([0.1, 0.9, 0.6, 0.5, 0.4])) == 0.4
    with pytest.raises(ValueError, match="no fraud labels"):
        choose_threshold(np.zeros(4), np.linspace(0, 1, 4))


# --- evaluation -------------------------------------------------------------------------------


def test_classification_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8])
    m = classification_metrics(y, p, threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.75)  # 3 of 4 (pos, neg) pairs ranked right
    assert m["pr_auc"] == pytest.approx((1.0 + 2 / 3) / 2)  # AP: precision 1 at 0.8, 2/3 at 0.35
    assert (m["precision"], m["recall"]) == (1.0, 0.5)  # only 0.8 is flagged
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["brier"] == pytest.approx((0.01 + 0.16 + 0.4225 + 0.04) / 4)
    assert (m["rows"], m["positives"], m["flagged"]) == (4, 2, 1)
    # A score equal to the threshold is flagged (score >= threshold), as choose_threshold assumes.
    at = classification_metrics(y, p, threshold=0.4)
    assert (at["flagged"], at["precision"], at["recall"]) == (2, 0.5, 0.5)
    table = m["calibration"]
    assert len(table) == 10 and [b["count"] for b in table] == [0, 1, 0, 1, 1, 0, 0, 0, 1, 0]
    assert table[3] == {
        "bin_lower": 0.3,
        "bin_upper": 0.4,
        "count": 1,
        "mean_predicted": 0.35,
        "observed_rate": 1.0,
    }
    assert table[0]["mean_predicted"] is None
    json.dumps(m)  # JSON-serialisable
    # One class only: ranking metrics are undefined, not a crash.
    assert classification_metrics(np.zeros(3), np.array([0.1, 0.2, 0.9]), 0.5)["roc_auc"] is None


def test_calibration_table_puts_one_in_the_last_bin():
    table = calibration_table(np.array([1, 0, 1]), np.array([1.0, 0.95, 0.0]))
    assert table[9]["count"] == 2 and table[9]["observed_rate"] == 0.5 and table[0]["count"] == 1


def test_evaluate_agrees_with_sklearn_on_the_model(trained):
    split, model, contract = trained
    small = split.test.head(400)
    m = evaluate(model, contract, small)
    y = small[LABEL].to_numpy()
    p = model.predict_proba(contract.model_input(small))[:, 1]
    flagged = p >= contract.decision_threshold
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["precision"] == pytest.approx(precision_score(y, flagged, zero_division=0))
    assert m["recall"] == pytest.approx(recall_score(y, flagged))
    assert m["brier"] == pytest.approx(brier_score_loss(y, p))
    assert sum(b["count"] for b in m["calibration"]) == 400 and m["positives"] == int(y.sum())


# --- training frame from the real feature store -----------------------------------------------


def test_build_training_frame_keeps_labelled_rows_with_point_in_time_features(tmp_path):
    from ml_platform.featurestore.definitions import Entity, FeatureView, Field, FileSource, Float64, String
    from ml_platform.featurestore.store import FeatureStore

    h = pd.Timedelta(hours=1)
    pd.DataFrame(
        {
            "user_id": [1, 1],
            "updated_at": [T0, T0 + 24 * h],
            "amount_mean_30d": [20.0, 25.0],
            "home_country": ["DE", "DE"],
        }
    ).to_parquet(tmp_path / "user_stats.parquet")
    user = Entity("user", join_keys=["user_id"])
    view = FeatureView(
        "user_stats",
        [user],
        FileSource("user_stats.parquet", timestamp_field="updated_at"),
        schema=[Field("amount_mean_30d", Float64), Field("home_country", String)],
    )
    store = FeatureStore(tmp_path)
    store.apply([user, view])
    events = pd.DataFrame(
        {
            "transaction_id": ["b", "a", "c"],
            "user_id": [1, 1, 2],
            "merchant_id": [7, 7, 7],
            "amount": [50.0, 10.0, 5.0],
            "merchant_category": ["grocery"] * 3,
            "country": ["FR", "DE", "DE"],
            "device": ["web"] * 3,
            "channel": ["online"] * 3,
            EVENT_TS: [T0 + 30 * h, T0 + 2 * h, T0 + 3 * h],
            LABEL: [1, 0, None],
            LABEL_TS: [T0 + 60 * h, T0 + 50 * h, pd.NaT],
        }
    )
    refs = ["user_stats:amount_mean_30d", "user_stats:home_country"]
    out = build_training_frame(store, events, refs)
    assert list(out["transaction_id"]) == ["a", "b"]  # sorted by event time; "c" has no label yet
    assert list(out["amount_mean_30d"]) == [20.0, 25.0]  # the value as of each event
    assert list(out["amount_to_user_mean_30d"]) == [0.5, 2.0]
    assert list(out["is_foreign"]) == [0.0, 1.0]
    assert list(out["hour_of_day"]) == [2, 6] and out[LABEL].dtype == "int64"
    with pytest.raises(ValueError, match="No labelled events"):
        build_training_frame(store, events[events[LABEL].isna()], refs)


def test_training_on_generated_events_through_the_feature_store(tmp_path):
    """The whole path on the platform's own generator, feature views and store."""
    from ml_platform import features
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.sources.generator import GeneratorConfig, write_dataset
    from ml_platform.sources.raw_events import labelled_events, latest_label_time

    config = GeneratorConfig(n_users=400, n_merchants=120, days=30, fraud_rate=0.02)
    write_dataset(config, tmp_path / "raw")
    store = FeatureStore(tmp_path, duckdb_threads=1)
    store.apply([*features.ENTITIES, *features.FEATURE_VIEWS])
    for view in features.FEATURE_VIEWS:
        if view.aggregations:
            store.materialize_offline(view.name)
    as_of = latest_label_time(tmp_path / "raw")
    frame = build_training_frame(store, labelled_events(tmp_path / "raw", as_of), features.MODEL_FEATURE_REFS)
    split = time_split(frame, as_of=as_of)
    assert (split.train[LABEL_TS] <= split.train_cut).all() and split.validation[LABEL].sum() > 0
    model, contract = train_model(split.train, split.validation, params={"max_iter": 60})
    metrics = evaluate(model, contract, split.test)
    assert metrics["positives"] >= 5
    assert 0.7 < metrics["roc_auc"] <= 1.0  # measured 0.875 with this config


def test_drift_split_trains_on_the_history_and_the_first_mature_post_drift_rows_and_tests_on_the_rest():
    from ml_platform.training.dataset import drift_split

    day = pd.Timedelta(days=1)
    # 20 events one per day; the drift starts on day 10; as_of day 20; labels settle in 3 days, so
    # the mature post-drift events are days 10-17. Day 3's and day 12's labels arrive after as_of;
    # days 18 and 19 are immature (their labels are known, but they would skew the new world's rows).
    delays = [1.0] * 20
    delays[3] = delays[12] = 30.0
    ev = [T0 + i * day for i in range(20)]
    frame = pd.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(20)],
            EVENT_TS: ev,
            LABEL: [i % 2 for i in range(20)],
            LABEL_TS: [e + d * day for e, d in zip(ev, delays)],
        }
    )
    split = drift_split(
        frame, since=T0 + 10 * day, as_of=T0 + 20 * day, settling=3 * day, train_frac=0.5, val_frac=0.25
    )
    # mature post-drift rows with a label known at as_of: days 10, 11, 13, 14, 15, 16, 17 (n = 7);
    # cuts at sorted[int(3.5)] = day 14 and sorted[int(5.25)] = day 16
    assert split.train_cut == T0 + 14 * day and split.validation_cut == T0 + 16 * day
    before = [f"t{i}" for i in range(10) if i != 3]
    assert list(split.train["transaction_id"]) == [*before, "t10", "t11", "t13"]
    assert list(split.validation["transaction_id"]) == ["t14", "t15"]
    assert list(split.test["transaction_id"]) == ["t16", "t17"]
    assert split.rows_without_known_label == 4  # t3, t12 (late labels), t18, t19 (immature)
    # Keeping 4 days of history before the drift: days 6-9 (not 0-5) of it train.
    recent = drift_split(
        frame,
        since=T0 + 10 * day,
        as_of=T0 + 20 * day,
        settling=3 * day,
        train_frac=0.5,
        val_frac=0.25,
        history=4 * day,
    )
    assert list(recent.train["transaction_id"]) == ["t6", "t7", "t8", "t9", "t10", "t11", "t13"]
    assert list(recent.test["transaction_id"]) == ["t16", "t17"]
    assert recent.rows_without_known_label == 9  # t0-t5 (t3 among them), t12, t18, t19
    with pytest.raises(ValueError, match="no post-drift event is mature yet"):
        drift_split(frame, since=T0 + 18 * day, as_of=T0 + 20 * day, settling=3 * day)
    with pytest.raises(ValueError, match="train_frac"):
        drift_split(
            frame, since=T0 + 10 * day, as_of=T0 + 20 * day, settling=3 * day, train_frac=0.8, val_frac=0.3
        )


def test_drift_split_cuts_by_the_frauds_so_the_test_quarter_gets_its_share_of_them():
    from ml_platform.training.dataset import DRIFT_SPLIT_MIN_FRAUDS, drift_split

    hour = pd.Timedelta(hours=1)
    # 100 post-drift events one hour apart from T0; frauds only among the first 30 (ids 0, 3, ..., 27:
    # 10 frauds), labels known an hour later; as_of far enough that all are mature.
    ev = [T0 + i * hour for i in range(100)]
    frame = pd.DataFrame(
        {
            "transaction_id": [f"t{i}" for i in range(100)],
            EVENT_TS: ev,
            LABEL: [int(i < 30 and i % 3 == 0) for i in range(100)],
            LABEL_TS: [e + hour for e in ev],
        }
    )
    assert frame[LABEL].sum() == 10 >= DRIFT_SPLIT_MIN_FRAUDS
    split = drift_split(frame, since=T0, as_of=T0 + 30 * pd.Timedelta(days=1), settling=pd.Timedelta(days=7))
    # fraud event times: hours 0, 3, ..., 27; t1 = the 5th (hour 15), t2 = the 7th (int(7.5) = 7: hour 21)
    assert split.train_cut == T0 + 15 * hour and split.validation_cut == T0 + 21 * hour
    assert split.test[LABEL].sum() == 3  # hours 21, 24, 27 (row quantiles would leave the test none)
    assert split.validation[LABEL].sum() == 2 and split.train[LABEL].sum() == 5
    assert len(split.train) + len(split.validation) + len(split.test) == 100
