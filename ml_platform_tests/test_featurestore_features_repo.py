"""The platform's own feature repo (ml_platform.features) on a tiny hand-made raw dataset."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pytest
from featurestore_fixtures import T, write_by_day, write_parquet

from ml_platform import features as repo
from ml_platform.featurestore import FeatureStore

TS = pa.timestamp("us", tz="UTC")


# t1..t5 as in the data contract. Labels: t1 (legit) known at 01-01 12:00, t2 (fraud) at 01-02 09:00,
# t4 (legit) at 01-02 11:00; t3 and t5 not labelled yet.
TRANSACTIONS = pd.DataFrame(
    {
        "transaction_id": ["t1", "t2", "t3", "t4", "t5"],
        "user_id": [1, 1, 2, 1, 2],
        "merchant_id": [10, 10, 10, 11, 10],
        "merchant_category": ["food", "food", "food", "travel", "food"],
        "amount": [10.0, 30.0, 100.0, 50.0, 20.0],
        "country": ["FR", "FR", "FR", "ES", "DE"],
        "device": ["ios"] * 5,
        "channel": ["web"] * 5,
        "event_timestamp": [
            T("2024-01-01 10:00"),
            T("2024-01-01 10:30"),
            T("2024-01-01 11:00"),
            T("2024-01-02 10:00"),
            T("2024-01-02 10:30"),
        ],
        "is_fraud": pd.array([0, 1, None, 0, None], dtype="Int64"),
        "label_timestamp": [
            T("2024-01-01 12:00"),
            T("2024-01-02 09:00"),
            pd.NaT,
            T("2024-01-02 11:00"),
            pd.NaT,
        ],
    }
)
TRANSACTIONS["created_timestamp"] = TRANSACTIONS["event_timestamp"] + pd.Timedelta(seconds=1)

USERS = pd.DataFrame(
    {
        "user_id": [1, 2],
        "home_country": ["FR", "DE"],
        "account_age_days": [100, 5],
        "updated_at": [T("2023-12-01"), T("2024-01-01 12:00")],  # user 2's profile appears after t3
    }
)


def _schema(frame: pd.DataFrame) -> pa.Schema:
    types = {
        "user_id": pa.int64(),
        "merchant_id": pa.int64(),
        "is_fraud": pa.int64(),
        "account_age_days": pa.int64(),
        "amount": pa.float64(),
    }
    return pa.schema(
        [
            (c, TS if "timestamp" in c or c == "updated_at" else types.get(c, pa.string()))
            for c in frame.columns
        ]
    )


@pytest.fixture()
def store(settings) -> FeatureStore:
    data = settings.data_dir
    write_by_day(data / repo.TRANSACTIONS_PATH, TRANSACTIONS, "event_timestamp", _schema(TRANSACTIONS))
    write_parquet(data / repo.USERS_PATH / "users.parquet", USERS, _schema(USERS))
    fs = FeatureStore(data)
    fs.apply([*repo.ENTITIES, *repo.FEATURE_VIEWS])
    for view in repo.FEATURE_VIEWS:
        if view.aggregations:
            fs.materialize_offline(view.name)
    return fs


def test_training_rows_for_the_model_feature_refs(store):
    entity_df = TRANSACTIONS.drop(columns=["created_timestamp"])
    out = store.get_historical_features(entity_df, repo.MODEL_FEATURE_REFS)
    assert len(out) == 5 and out["transaction_id"].tolist() == ["t1", "t2", "t3", "t4", "t5"]
    by_txn = out.set_index("transaction_id")

    # Card-holder velocity; t4's 24h window starts exactly at t1 (01-01 10:00) and includes it.
    assert by_txn["txn_count_1h"].tolist() == [1, 2, 1, 1, 1]
    assert by_txn["amount_sum_1h"].tolist() == [10.0, 40.0, 100.0, 50.0, 20.0]
    assert by_txn["txn_count_24h"].tolist() == [1, 2, 1, 3, 2]
    assert by_txn["amount_mean_24h"].tolist() == [10.0, 20.0, 100.0, 30.0, 60.0]
    assert by_txn["amount_max_30d"].tolist() == [10.0, 30.0, 100.0, 50.0, 100.0]

    # Merchant 10 saw t1, t2, t3, t5; t5's 24h window [01-01 10:30, 01-02 10:30] holds t2, t3, t5.
    assert by_txn["merchant_txn_count_24h"].tolist() == [1, 2, 3, 1, 3]
    assert by_txn["merchant_amount_mean_7d"].tolist() == [10.0, 20.0, pytest.approx(140 / 3), 50.0, 40.0]

    # Fraud rate uses labels known at the time only: merchant 10 at t5 knows t1 (0) and t2 (1).
    rate = by_txn["merchant_fraud_rate_30d"]
    assert rate.isna().tolist() == [True, True, True, True, False] and rate["t5"] == 0.5
    assert by_txn["merchant_label_count_30d"].tolist() == [pd.NA, pd.NA, pd.NA, pd.NA, 2]

    assert by_txn["user_merchant_txn_count_30d"].tolist() == [1, 2, 1, 1, 2]

    # Profile: user 2's was written after t3.
    home = by_txn["home_country"]
    assert home.isna().tolist() == [False, False, True, False, False]
    assert home.dropna().tolist() == ["FR", "FR", "FR", "DE"]
    assert by_txn["account_age_days"].tolist() == [100, 100, pd.NA, 100, 5]

    with_request = repo.add_request_features(out)
    assert with_request["amount_to_user_mean_30d"].tolist()[:2] == [1.0, 1.5]
    assert with_request["is_foreign"].tolist()[3] == 1.0  # t4 in ES, home FR


def test_latest_features_for_the_online_store(store):
    table = store.latest_features("user_transaction_stats", T("2024-01-02 12:00"))
    rows = {r["user_id"]: r for r in table.to_pylist()}
    assert rows[1]["event_timestamp"] == T("2024-01-02 10:00") and rows[1]["txn_count_24h"] == 3
    assert rows[2]["event_timestamp"] == T("2024-01-02 10:30") and rows[2]["amount_sum_24h"] == 120.0
    profile = store.latest_features("user_profile", T("2024-01-01 11:00")).to_pylist()
    assert [(r["user_id"], r["home_country"]) for r in profile] == [(1, "FR")]
