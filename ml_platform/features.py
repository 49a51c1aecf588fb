"""The platform's own feature repo for its reference use case, card-fraud detection.

Every consumer (training set, batch scoring, online serving, stream scoring, drift monitoring)
reads these definitions; nothing else in the code base names a feature's SQL or window.
Source paths are relative to the feature store's repo path (the data directory).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.featurestore.definitions import (
    FEATURE_LOOKUP_OFFSET,
    Aggregation,
    Entity,
    FeatureView,
    Field,
    FileSource,
    Int64,
    String,
    parse_feature_ref,
)
from ml_platform.settings import SyntheticDefaults

# --- Raw data contract: column names of the transaction events (see ml_platform.sources) ---
TRANSACTIONS_PATH = "raw/transactions"  # hive-partitioned Parquet: raw/transactions/date=YYYY-MM-DD/*.parquet
USERS_PATH = "raw/users"
EVENT_TS = "event_timestamp"
CREATED_TS = "created_timestamp"
LABEL_TS = "label_timestamp"
LABEL = "is_fraud"
AMOUNT_DECIMALS = 2  # amounts are in cents: the contract refuses finer ones, the features add them exactly

user = Entity("user", join_keys=["user_id"], value_type=Int64, description="A card holder")
merchant = Entity("merchant", join_keys=["merchant_id"], value_type=Int64, description="A merchant")

transactions_source = FileSource(
    path=TRANSACTIONS_PATH,
    timestamp_field=EVENT_TS,
    created_timestamp_column=CREATED_TS,
    name="transactions",
)
# The same events seen at the time their label became known: a label is usable only from then on.
labels_source = FileSource(
    path=TRANSACTIONS_PATH,
    timestamp_field=LABEL_TS,
    created_timestamp_column=None,
    name="labels",
)
users_source = FileSource(
    path=USERS_PATH,
    timestamp_field="updated_at",
    created_timestamp_column=None,
    name="users",
)

# FEATURE_LOOKUP_OFFSET (defined with the store's definitions): features of an event are looked up
# as of just before it, so the transaction being scored is never inside its own aggregates.


def feature_lookup_time(event_timestamp):
    """The point-in-time at which an event's looked-up features are read (see FEATURE_LOOKUP_OFFSET)."""
    return event_timestamp - FEATURE_LOOKUP_OFFSET


_H, _D = timedelta(hours=1), timedelta(days=1)
_WINDOWS = {"1h": _H, "24h": _D, "7d": 7 * _D, "30d": 30 * _D}


def _amount_aggs() -> list[Aggregation]:
    aggs: list[Aggregation] = []
    for label, window in _WINDOWS.items():
        aggs += [
            Aggregation("count", window, name=f"txn_count_{label}"),
            Aggregation("sum", window, "amount", name=f"amount_sum_{label}", decimals=AMOUNT_DECIMALS),
            Aggregation("mean", window, "amount", name=f"amount_mean_{label}", decimals=AMOUNT_DECIMALS),
            Aggregation("max", window, "amount", name=f"amount_max_{label}"),
        ]
    return aggs


user_transaction_stats = FeatureView(
    name="user_transaction_stats",
    entities=[user],
    source=transactions_source,
    aggregations=_amount_aggs(),
    ttl=30 * _D,
    description="Spend velocity per card holder: count, sum, mean and max amount over 1h, 24h, 7d, 30d",
)

merchant_transaction_stats = FeatureView(
    name="merchant_transaction_stats",
    entities=[merchant],
    source=transactions_source,
    aggregations=[
        Aggregation("count", _D, name="merchant_txn_count_24h"),
        Aggregation("mean", 7 * _D, "amount", name="merchant_amount_mean_7d", decimals=AMOUNT_DECIMALS),
    ],
    ttl=30 * _D,
    description="Merchant activity: transactions in the last 24h and mean amount over 7 days",
)

merchant_fraud_stats = FeatureView(
    name="merchant_fraud_stats",
    entities=[merchant],
    source=labels_source,
    aggregations=[
        Aggregation("mean", 30 * _D, LABEL, name="merchant_fraud_rate_30d", decimals=0),  # labels are 0/1
        Aggregation("count", 30 * _D, name="merchant_label_count_30d"),
    ],
    ttl=30 * _D,
    description="Fraud rate per merchant over labels that arrived in the last 30 days (known-at-the-time only)",
)

user_merchant_stats = FeatureView(
    name="user_merchant_stats",
    entities=[user, merchant],
    source=transactions_source,
    aggregations=[Aggregation("count", 30 * _D, name="user_merchant_txn_count_30d")],
    ttl=30 * _D,
    description="How often this card holder used this merchant in 30 days (1 = a new merchant)",
)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    source=users_source,
    schema=[Field("home_country", String), Field("account_age_days", Int64)],
    ttl=None,
    description="Card-holder profile: home country and account age at the last profile update",
)

# How long labels take to settle: a legit label is confirmed this long after the event (the
# generator's default; set it to your own label process). Views on `labels_source` reach their
# steady state only this long after their window has filled.
LABEL_SETTLING = timedelta(days=SyntheticDefaults.label_maturity_days)

ENTITIES = [user, merchant]
FEATURE_VIEWS = [
    user_transaction_stats,
    merchant_transaction_stats,
    merchant_fraud_stats,
    user_merchant_stats,
    user_profile,
]


# --- Request-time features: computed from the transaction itself plus looked-up features. ---
# One vectorised definition (`request_features`, numpy columns in, numpy columns out) serves the
# training-set builder and batch scoring (through `add_request_features`, its DataFrame form), the
# HTTP API and the stream worker (the fast scorer's column path), so a request-time feature is
# computed by the same code everywhere. A new request feature is added there and named in
# REQUEST_FEATURES; every consumer picks it up.
REQUEST_COLUMNS = ["amount", "merchant_category", "country", "device", "channel", EVENT_TS]
REQUEST_FEATURES = ["amount", "amount_to_user_mean_30d", "hour_of_day", "is_night", "is_foreign"]
CATEGORICAL_FEATURES = ["merchant_category", "country", "device", "channel"]
US_PER_HOUR = 3_600_000_000
NIGHT_HOURS = (0, 5)  # UTC hours counted as night, both ends included


def request_features(
    amount: np.ndarray,
    event_us: np.ndarray,
    country: Sequence[Any],
    amount_mean_30d: np.ndarray,
    home_country: Sequence[Any],
) -> dict[str, np.ndarray]:
    """The request-time features (REQUEST_FEATURES) of n events, column by column.

    amount: float64; event_us: int64 µs since the epoch, UTC; country: the merchant's country;
    amount_mean_30d: the card holder's looked-up 30-day mean amount, float64 (NaN = null);
    home_country: the looked-up home country (None / NaN = null). Returns float64 columns
    (`amount_to_user_mean_30d` and `is_foreign` NaN where undefined) and int64 `hour_of_day`,
    `is_night`."""
    amount = np.asarray(amount, dtype=np.float64)
    mean_30d = np.asarray(amount_mean_30d, dtype=np.float64)
    ratio = np.full(len(amount), np.nan)
    np.divide(amount, mean_30d, out=ratio, where=mean_30d > 0)  # no mean, or a non-positive one: null
    hour = np.asarray(event_us, dtype=np.int64) // US_PER_HOUR % 24
    is_night = ((hour >= NIGHT_HOURS[0]) & (hour <= NIGHT_HOURS[1])).astype(np.int64)
    home = np.empty(len(amount), dtype=object)
    home[:] = home_country
    ours = np.empty(len(amount), dtype=object)
    ours[:] = country
    is_foreign = (ours != home).astype(np.float64)
    is_foreign[pd.isna(home)] = np.nan  # no home country known: undefined, not "foreign"
    return {
        "amount": amount,
        "amount_to_user_mean_30d": ratio,
        "hour_of_day": hour,
        "is_night": is_night,
        "is_foreign": is_foreign,
    }


def event_micros(timestamps: pd.Series | Sequence[Any]) -> np.ndarray:
    """Event times as int64 µs since the epoch, UTC (naive = UTC); a null time is an error."""
    ts = pd.to_datetime(pd.Series(timestamps) if not isinstance(timestamps, pd.Series) else timestamps, utc=True)
    nulls = int(ts.isna().sum())
    if nulls:
        raise ValueError(f"{EVENT_TS}: {nulls} of {len(ts)} events have no time; every event needs one")
    return ts.dt.tz_convert(None).to_numpy(dtype="datetime64[us]").view(np.int64)


def add_request_features(frame: pd.DataFrame) -> pd.DataFrame:
    """Add request-time features to `frame` (a copy): it needs REQUEST_COLUMNS plus the
    looked-up `amount_mean_30d` and `home_country` columns (nulls allowed). `request_features`
    on the frame's columns."""
    out = frame.copy()
    computed = request_features(
        amount=out["amount"].to_numpy(dtype=np.float64),
        event_us=event_micros(out[EVENT_TS]),
        country=out["country"].astype("object").to_numpy(),
        amount_mean_30d=pd.to_numeric(out["amount_mean_30d"], errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        ),
        home_country=out["home_country"].astype("object").to_numpy(),
    )
    for name in REQUEST_FEATURES:
        if name != "amount":
            out[name] = computed[name]
    return out


# The model's input: looked-up features (by reference) + request-time + categorical features.
MODEL_FEATURE_REFS = [
    *user_transaction_stats.feature_refs(),
    *merchant_transaction_stats.feature_refs(),
    *merchant_fraud_stats.feature_refs(),
    *user_merchant_stats.feature_refs(),
    "user_profile:account_age_days",
    "user_profile:home_country",
]


def history_warmup(feature_refs: Sequence[str] = MODEL_FEATURE_REFS) -> timedelta:
    """How much history the features of `feature_refs` need before their values are in steady
    state: the longest aggregation window of the views they read, plus `LABEL_SETTLING` when one of
    them aggregates labels. Before that, a "30-day count" holds only the days that exist, so
    events of the first weeks of a history look unlike any event served later (monitoring's
    reference leaves them out)."""
    views = {v.name: v for v in FEATURE_VIEWS}
    warmup = timedelta(0)
    for ref in feature_refs:
        view = views.get(parse_feature_ref(ref)[0])
        if view is None or not view.aggregations:
            continue
        longest = max(a.window for a in view.aggregations)
        warmup = max(warmup, longest + (LABEL_SETTLING if view.source is labels_source else timedelta(0)))
    return warmup
