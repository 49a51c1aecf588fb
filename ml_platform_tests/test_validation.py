"""The validation gate reports every defect with its column, row count and sample values."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest

from ml_platform.features import CATEGORICAL_FEATURES, MODEL_FEATURE_REFS, REQUEST_FEATURES
from ml_platform.sources import GeneratorConfig, generate_day, generate_users
from ml_platform.transactions import TRANSACTION
from ml_platform.validation import (
    RAW_TRANSACTIONS_SCHEMA,
    TRAINING_SET_SCHEMA,
    USERS_SCHEMA,
    raw_transactions_schema,
    training_set_schema,
    validate,
)

CONFIG = GeneratorConfig(days=10, n_users=1000, n_merchants=200)
NOW = "2024-02-01T00:00:00Z"


@pytest.fixture(scope="module")
def clean_day() -> pd.DataFrame:
    return generate_day(CONFIG, "2024-01-02")


def _only(report, column: str, check: str) -> dict:
    found = [f for f in report.failures if f["column"] == column and f["check"] == check]
    assert len(found) == 1, report.summary()
    return found[0]


def test_a_clean_generated_day_passes(clean_day):
    report = validate(clean_day, "raw_transactions", now=NOW)
    assert report.ok, report.summary()
    assert (report.rows, report.failed_rows, report.failures, report.warnings) == (len(clean_day), 0, [], [])
    assert report.summary() == f"raw_transactions: {len(clean_day)} rows, OK"
    # The plain pandera schema accepts it too (for callers that use pandera directly).
    RAW_TRANSACTIONS_SCHEMA.validate(clean_day.head(100), lazy=True)


def test_null_user_id(clean_day):
    df = clean_day.copy()
    df["user_id"] = df["user_id"].astype("Int64")
    df.loc[[3, 40], "user_id"] = pd.NA
    report = validate(df, "raw_transactions", now=NOW)
    assert not report.ok and report.failed_rows == 2
    finding = _only(report, "user_id", "not_nullable")
    assert finding["failure_count"] == 2
    assert finding["sample_values"] == [None, None] and finding["sample_rows"] == [3, 40]


def test_negative_amount(clean_day):
    df = clean_day.copy()
    df.loc[[5, 6, 7], "amount"] = [-4.0, 0.0, -0.01]
    report = validate(df, "raw_transactions", now=NOW)
    finding = _only(report, "amount", "amount > 0")
    assert (finding["failure_count"], finding["sample_values"]) == (3, [-4.0, 0.0, -0.01])
    assert report.failed_rows == 3 and len(report.failures) == 1


def test_absurd_amount(clean_day):
    df = clean_day.copy()
    df.loc[9, "amount"] = 5e6
    finding = _only(validate(df, "raw_transactions", now=NOW), "amount", "amount < 1e+06")
    assert (finding["failure_count"], finding["sample_values"]) == (1, [5e6])


def test_an_amount_finer_than_cents_is_named_with_its_rows(clean_day):
    """Amounts are fixed point (features add them exactly in cents): a fraction of a cent, or a
    float sum's artefact such as 0.1 + 0.2, is refused; 12.30 and 7 are fine."""
    df = clean_day.copy()
    df.loc[[2, 4, 11, 12], "amount"] = [12.345, 0.1 + 0.2, 12.30, 7.0]
    report = validate(df, "raw_transactions", now=NOW)
    finding = _only(report, "amount", "amount has at most 2 decimal places")
    assert (finding["failure_count"], finding["sample_values"]) == (2, [12.345, 0.1 + 0.2])
    assert finding["sample_rows"] == [2, 4] and report.failed_rows == 2


def test_duplicate_transaction_id(clean_day):
    df = clean_day.copy()
    df.loc[8, "transaction_id"] = df.loc[7, "transaction_id"]
    report = validate(df, "raw_transactions", now=NOW)
    finding = _only(report, "transaction_id", "field_uniqueness")
    assert finding["failure_count"] == 2  # both rows that share the id
    assert finding["sample_values"] == ["20240102-000-00000007"] * 2 and finding["sample_rows"] == [7, 8]


def test_future_timestamp_relative_to_now(clean_day):
    df = clean_day.copy()
    df.loc[10, ["event_timestamp", "created_timestamp"]] = pd.Timestamp("2024-03-01T00:00:00Z")
    report = validate(df, "raw_transactions", now=NOW)
    finding = _only(report, "event_timestamp", "not in the future (<= now)")
    assert (finding["failure_count"], finding["sample_values"]) == (1, ["2024-03-01T00:00:00+00:00"])
    assert _only(report, "created_timestamp", "not in the future (<= now)")["failure_count"] == 1
    # The label of row 10 now precedes its event: reported too.
    assert _only(report, "label_timestamp", "label_timestamp >= event_timestamp")["sample_rows"] == [10]
    # Validated "as of" mid-day, the rest of the day is in the future as well.
    midday = validate(clean_day, "raw_transactions", now="2024-01-02T12:00:00Z")
    later = int((clean_day["event_timestamp"] > pd.Timestamp("2024-01-02T12:00:00Z")).sum())
    assert _only(midday, "event_timestamp", "not in the future (<= now)")["failure_count"] == later


def test_bad_country(clean_day):
    df = clean_day.copy()
    df.loc[[11, 12], "country"] = ["usa", "fr"]
    finding = _only(
        validate(df, "raw_transactions", now=NOW),
        "country",
        "country: 1..2 characters, not blank, matching [A-Z]{2}",
    )
    assert (finding["failure_count"], finding["sample_values"]) == (2, ["usa", "fr"])


def test_label_before_event(clean_day):
    df = clean_day.copy()
    event = df.loc[13, "event_timestamp"]
    df.loc[13, ["is_fraud", "label_timestamp"]] = [0, event - pd.Timedelta(hours=1)]
    finding = _only(
        validate(df, "raw_transactions", now=NOW), "label_timestamp", "label_timestamp >= event_timestamp"
    )
    assert finding["failure_count"] == 1 and finding["sample_rows"] == [13]
    assert finding["sample_values"] == [
        {"label_timestamp": (event - pd.Timedelta(hours=1)).isoformat(), "event_timestamp": event.isoformat()}
    ]


def test_created_before_event_and_label_without_timestamp(clean_day):
    df = clean_day.copy()
    df.loc[14, "created_timestamp"] = df.loc[14, "event_timestamp"] - pd.Timedelta(seconds=1)
    df.loc[15, ["is_fraud", "label_timestamp"]] = [1, pd.NaT]  # a label whose arrival time is unknown
    report = validate(df, "raw_transactions", now=NOW)
    assert _only(report, "created_timestamp", "created_timestamp >= event_timestamp")["sample_rows"] == [14]
    finding = _only(report, "is_fraud", "is_fraud is null iff label_timestamp is null")
    assert finding["sample_values"] == [{"is_fraud": 1, "label_timestamp": None}]
    assert report.failed_rows == 2


def test_device_channel_and_label_values(clean_day):
    df = clean_day.copy()
    df.loc[16, "device"] = "toaster"
    df.loc[17, "channel"] = "telepathy"
    df.loc[18, ["is_fraud", "label_timestamp"]] = [2, df.loc[18, "event_timestamp"] + pd.Timedelta(days=1)]
    report = validate(df, "raw_transactions", now=NOW)
    assert _only(
        report, "device", "isin(['ios', 'android', 'desktop', 'mobile_web', 'pos_terminal', 'unknown'])"
    )["sample_values"] == ["toaster"]
    assert _only(report, "channel", "isin(['pos', 'contactless', 'online'])")["sample_values"] == [
        "telepathy"
    ]
    assert _only(report, "is_fraud", "label in {0, 1}")["sample_values"] == [2]


def test_unknown_category_is_a_warning_not_an_error(clean_day):
    df = clean_day.copy()
    df.loc[[1, 2], "merchant_category"] = "space_tourism"
    df.loc[3, "merchant_category"] = "crypto_exchange"  # a drift category: known
    report = validate(df, "raw_transactions", now=NOW)
    assert report.ok and report.failures == []
    assert report.warnings == [
        {
            "column": "merchant_category",
            "check": "merchant_category is a known one",
            "failure_count": 2,
            "sample_values": ["space_tourism", "space_tourism"],
            "sample_rows": [1, 2],
        }
    ]
    only_grocery = dataclasses.replace(TRANSACTION.field("merchant_category"), allowed=("grocery",))
    strict = raw_transactions_schema(TRANSACTION.with_field(only_grocery))
    assert validate(clean_day, strict, now=NOW).warnings[0]["failure_count"] == int(
        (clean_day["merchant_category"] != "grocery").sum()
    )
    df.loc[4, "merchant_category"] = "Not A Category!"
    assert (
        _only(
            validate(df, "raw_transactions", now=NOW),
            "merchant_category",
            "merchant_category: 1..64 characters, not blank, matching [a-z][a-z0-9_]*",
        )["failure_count"]
        == 1
    )


def test_structural_problems_are_reported_not_raised(clean_day):
    df = clean_day.drop(columns=["amount"])
    df["event_timestamp"] = df["event_timestamp"].dt.tz_localize(None)
    report = validate(df, "raw_transactions", now=NOW)
    assert not report.ok and report.failed_rows == len(df)
    assert _only(report, "amount", "column_in_dataframe")["failure_count"] == len(df)
    assert _only(report, "event_timestamp", "dtype is utc_timestamp")["sample_values"] == ["datetime64[us]"]
    with pytest.raises(ValueError, match="Unknown schema 'raw'"):
        validate(df, "raw")


def test_report_metadata_is_json_and_summary_is_readable(clean_day):
    df = clean_day.copy()
    df.loc[5, "amount"] = -4.0
    df.loc[11, "country"] = "usa"
    report = validate(df, "raw_transactions", now=NOW)
    meta = json.loads(json.dumps(report.to_metadata()))
    assert (
        meta["ok"] is False
        and meta["rows"] == len(df)
        and meta["failed_rows"] == 2
        and meta["failed_checks"] == 2
    )
    assert meta["failures"][0] == {
        "column": "amount",
        "check": "amount > 0",
        "failure_count": 1,
        "sample_values": [-4.0],
        "sample_rows": [5],
    }
    summary = report.summary()
    assert summary.splitlines()[0] == f"raw_transactions: {len(df)} rows, FAILED: 2 bad rows, 2 failed checks"
    assert "error: column 'amount' failed 'amount > 0' on 1 rows; e.g. [-4.0]" in summary
    assert "column 'country'" in summary and "'usa'" in summary


def test_samples_are_capped_at_five(clean_day):
    df = clean_day.copy()
    df.loc[:19, "amount"] = -1.0
    finding = _only(validate(df, "raw_transactions", now=NOW), "amount", "amount > 0")
    assert finding["failure_count"] == 20 and len(finding["sample_values"]) == 5


def test_users_schema():
    users = generate_users(CONFIG)
    assert validate(users, "users", now=NOW).ok
    users.loc[1, "user_id"] = 1
    users.loc[2, "home_country"] = "Germany"
    users.loc[3, "account_age_days"] = -5
    report = validate(users, USERS_SCHEMA, now=NOW)
    assert _only(report, "user_id", "field_uniqueness")["sample_rows"] == [0, 1]
    assert _only(report, "home_country", "home_country: 1..2 characters, not blank, matching [A-Z]{2}")[
        "sample_values"
    ] == ["Germany"]
    assert _only(report, "account_age_days", "greater_than_or_equal_to(0)")["sample_values"] == [-5]


def _training_frame(n: int = 20) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = {
        "event_timestamp": pd.date_range("2024-01-05", periods=n, freq="h", tz="UTC").as_unit("us"),
        "is_fraud": np.array([0, 1] * (n // 2), dtype="int64"),
    }
    for ref in MODEL_FEATURE_REFS:
        name = ref.split(":")[1]
        frame[name] = rng.uniform(0, 1, n)
    frame["home_country"] = ["FR"] * n
    frame.update(
        amount=rng.uniform(1, 100, n),
        amount_to_user_mean_30d=np.r_[np.nan, rng.uniform(0, 3, n - 1)],
        hour_of_day=np.arange(n) % 24,
        is_night=(np.arange(n) % 24 < 6).astype("int64"),
        is_foreign=np.r_[np.nan, np.zeros(n - 1)],
        merchant_category=["grocery"] * n,
        country=["FR"] * n,
        device=["ios"] * n,
        channel=["online"] * n,
    )
    return pd.DataFrame(frame)


def test_training_set_schema_comes_from_the_feature_definitions():
    columns = TRAINING_SET_SCHEMA.columns
    expected = {
        "event_timestamp",
        "is_fraud",
        *(r.split(":")[1] for r in MODEL_FEATURE_REFS),
        *REQUEST_FEATURES,
        *CATEGORICAL_FEATURES,
    }
    assert set(columns) == expected
    assert not columns["is_fraud"].nullable and columns["txn_count_1h"].nullable
    full = training_set_schema(full_feature_names=True)
    assert "user_transaction_stats__txn_count_1h" in full.columns


def test_training_set_validation():
    frame = _training_frame()
    assert validate(frame, "training_set").ok, validate(frame, "training_set").summary()
    frame.loc[2, "is_fraud"] = np.nan  # an unlabelled row in a training set
    frame.loc[3, "merchant_fraud_rate_30d"] = 1.5
    frame.loc[4, "txn_count_24h"] = -1
    frame.loc[5, "hour_of_day"] = 24
    frame["device"] = frame["device"].where(frame.index != 6, None)
    report = validate(frame, "training_set")
    assert report.failed_rows == 5
    assert _only(report, "is_fraud", "not_nullable")["sample_rows"] == [2]
    assert _only(report, "merchant_fraud_rate_30d", "in_range(0, 1)")["sample_values"] == [1.5]
    assert _only(report, "txn_count_24h", "greater_than_or_equal_to(0)")["sample_values"] == [-1.0]
    assert _only(report, "hour_of_day", "in_range(0, 23)")["sample_values"] == [24]
    assert _only(report, "device", "not_nullable")["sample_rows"] == [6]
    text_features = _training_frame().assign(amount_sum_1h="a lot")
    assert (
        _only(validate(text_features, "training_set"), "amount_sum_1h", "dtype is numeric")["failure_count"]
        == 20
    )


def test_a_custom_pandera_schema_works_too():
    schema = pa.DataFrameSchema({"x": pa.Column(int, pa.Check.ge(0))}, name="mine")
    report = validate(pd.DataFrame({"x": [1, -2, 3]}), schema)
    assert report.schema == "mine"
    assert report.failures == [
        {
            "column": "x",
            "check": "greater_than_or_equal_to(0)",
            "failure_count": 1,
            "sample_values": [-2],
            "sample_rows": [1],
        }
    ]
