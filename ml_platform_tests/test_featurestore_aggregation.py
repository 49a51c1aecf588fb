"""Aggregated feature views: compiled DuckDB SQL against hand-computed windows, materialization."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_platform.featurestore import (
    Aggregation,
    Entity,
    FeatureStore,
    FeatureView,
    FileSource,
    NotMaterializedError,
    compile_aggregation_sql,
)
from ml_platform.featurestore.aggregation import count_sql, max_sql, mean_sql, min_sql, sum_sql

H, D = dt.timedelta(hours=1), dt.timedelta(days=1)


def T(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def write_parquet(path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)


user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
events = FileSource("events", timestamp_field="ts", created_timestamp_column="created")


def spend_view(ttl=None) -> FeatureView:
    aggs = []
    for label, window in (("1h", H), ("24h", D)):
        aggs += [
            Aggregation("count", window, name=f"count_{label}"),
            Aggregation("sum", window, "amount", name=f"sum_{label}"),
            Aggregation("mean", window, "amount", name=f"mean_{label}"),
            Aggregation("min", window, "amount", name=f"min_{label}"),
            Aggregation("max", window, "amount", name=f"max_{label}"),
        ]
    return FeatureView("spend", entities=[user], source=events, aggregations=aggs, ttl=ttl)


# user 1: 00:00 10, 00:30 20, 01:00 30, next day 00:30 40 (exactly 24h after the 00:30 event);
# user 2: one event at 00:45 (100). Files split by day like the raw data.
EVENTS = pd.DataFrame(
    {
        "user_id": [1, 1, 1, 1, 2],
        "ts": [
            T("2024-01-01 00:00"),
            T("2024-01-01 00:30"),
            T("2024-01-01 01:00"),
            T("2024-01-02 00:30"),
            T("2024-01-01 00:45"),
        ],
        "amount": [10.0, 20.0, 30.0, 40.0, 100.0],
    }
)
EVENTS["created"] = EVENTS["ts"] + pd.Timedelta(seconds=1)

# Hand-computed: (user, ts) -> count, sum, mean, min, max over [ts - 1h, ts] and [ts - 24h, ts].
EXPECTED = [
    # 1h: {10}; 24h: {10}
    (1, T("2024-01-01 00:00"), (1, 10.0, 10.0, 10.0, 10.0), (1, 10.0, 10.0, 10.0, 10.0)),
    # 1h: {10, 20}; 24h: {10, 20}
    (1, T("2024-01-01 00:30"), (2, 30.0, 15.0, 10.0, 20.0), (2, 30.0, 15.0, 10.0, 20.0)),
    # 1h: 00:00 is exactly 1h back, included: {10, 20, 30}
    (1, T("2024-01-01 01:00"), (3, 60.0, 20.0, 10.0, 30.0), (3, 60.0, 20.0, 10.0, 30.0)),
    # 1h: {40}; 24h: 00:30 the day before is exactly 24h back, included; 00:00 is not: {20, 30, 40}
    (1, T("2024-01-02 00:30"), (1, 40.0, 40.0, 40.0, 40.0), (3, 90.0, 30.0, 20.0, 40.0)),
    (2, T("2024-01-01 00:45"), (1, 100.0, 100.0, 100.0, 100.0), (1, 100.0, 100.0, 100.0, 100.0)),
]


def write_events(repo, frame=EVENTS):
    for day, part in frame.groupby(frame["ts"].dt.strftime("%Y-%m-%d")):
        write_parquet(repo / "events" / f"date={day}" / "part-0.parquet", part)


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    write_events(tmp_path)
    fs = FeatureStore(tmp_path)
    fs.apply([spend_view()])
    return fs


def expected_frame() -> pd.DataFrame:
    rows = []
    for uid, ts, hour, day in EXPECTED:
        row = {
            "user_id": uid,
            "event_timestamp": ts.as_unit("us"),
            "created_timestamp": (ts + pd.Timedelta(seconds=1)).as_unit("us"),
        }
        for label, values in (("1h", hour), ("24h", day)):
            row.update(dict(zip([f"{f}_{label}" for f in ("count", "sum", "mean", "min", "max")], values)))
        rows.append(row)
    return pd.DataFrame(rows)


def read_offline(store: FeatureStore, view: str) -> pd.DataFrame:
    frame = pq.read_table(store.offline_table_path(view)).to_pandas()
    return frame.sort_values(list(frame.columns[:2]), ignore_index=True)


def test_materialized_windows_match_hand_computed_values(store):
    result = store.materialize_offline("spend")
    assert result["rows"] == 5
    assert result["path"] == str(store.offline_table_path("spend"))
    assert result["seconds"] >= 0
    got = read_offline(store, "spend")
    want = expected_frame()
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert str(got["count_1h"].dtype) == "int64" and str(got["sum_1h"].dtype) == "float64"


def test_rows_with_equal_times_collapse_to_one_row(tmp_path):
    ties = pd.DataFrame(
        {
            "user_id": [1, 1, 1],
            "ts": [T("2024-01-01 00:00"), T("2024-01-01 00:00"), T("2024-01-01 00:20")],
            "created": [T("2024-01-01 00:00:01"), T("2024-01-01 00:00:07"), T("2024-01-01 00:20")],
            "amount": [10.0, 30.0, 20.0],
        }
    )
    write_events(tmp_path, ties)
    fs = FeatureStore(tmp_path)
    fs.apply([spend_view()])
    assert fs.materialize_offline("spend")["rows"] == 2
    got = read_offline(fs, "spend")
    # Both 00:00 rows are in each other's window (RANGE peers): count 2, sum 40, mean 20, max 30.
    assert got[["count_1h", "sum_1h", "mean_1h", "min_1h", "max_1h"]].values.tolist() == [
        [2, 40.0, 20.0, 10.0, 30.0],
        [3, 60.0, 20.0, 10.0, 30.0],
    ]
    assert got["created_timestamp"].tolist() == [T("2024-01-01 00:00:07"), T("2024-01-01 00:20")]


def test_labels_source_skips_rows_whose_label_has_not_arrived(tmp_path):
    labels = pd.DataFrame(
        {
            "merchant_id": [10, 10, 10, 10, 11],
            "event_timestamp": [
                T("2024-01-01 00:00"),
                T("2024-01-01 00:10"),
                T("2024-01-01 00:20"),
                T("2024-01-01 00:30"),
                T("2024-01-01 00:00"),
            ],
            "is_fraud": pd.array([1, 0, None, 0, None], dtype="Int64"),
            "label_timestamp": [
                T("2024-01-01 02:00"),
                T("2024-01-01 01:00"),
                None,
                T("2024-01-01 02:00"),
                None,
            ],
        }
    )
    write_parquet(tmp_path / "tx" / "part-0.parquet", labels)
    view = FeatureView(
        "fraud",
        entities=[merchant],
        source=FileSource("tx", timestamp_field="label_timestamp"),
        aggregations=[
            Aggregation("mean", 30 * D, "is_fraud", name="rate"),
            Aggregation("count", 30 * D, name="labels"),
        ],
    )
    fs = FeatureStore(tmp_path)
    fs.apply([view])
    assert fs.materialize_offline("fraud")["rows"] == 2
    got = read_offline(fs, "fraud")
    assert got["event_timestamp"].tolist() == [T("2024-01-01 01:00"), T("2024-01-01 02:00")]
    assert got["rate"].tolist() == [0.0, pytest.approx(1 / 3)]  # 02:00: labels 0, 1, 0 known
    assert got["labels"].tolist() == [1, 3]
    assert got["merchant_id"].tolist() == [10, 10]  # merchant 11 has no arrived label
    assert got["created_timestamp"].isna().all()  # the source declares no created column


def test_compiled_sql_uses_range_windows_and_one_function_per_aggregate(store):
    sql = store.aggregation_sql("spend")
    assert "RANGE BETWEEN INTERVAL '3600 seconds' PRECEDING AND CURRENT ROW" in sql
    assert "RANGE BETWEEN INTERVAL '86400 seconds' PRECEDING AND CURRENT ROW" in sql
    assert '"ts" IS NOT NULL' in sql
    assert sql == compile_aggregation_sql(spend_view(), store._source_scan(spend_view()))
    assert count_sql(None, "w") == "count(*) OVER w"
    assert count_sql("amount", "w") == 'count("amount") OVER w'
    assert [f("amount", "w") for f in (sum_sql, min_sql, max_sql)] == [
        'sum(CAST("amount" AS DOUBLE)) OVER w',
        'min(CAST("amount" AS DOUBLE)) OVER w',
        'max(CAST("amount" AS DOUBLE)) OVER w',
    ]
    assert mean_sql("amount", "w") == '(sum(CAST("amount" AS DOUBLE)) OVER w / count("amount") OVER w)'


def test_historical_features_read_the_materialized_table(store):
    rows = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "event_timestamp": [
                T("2024-01-01 00:45"),
                T("2024-01-02 12:00"),
                T("2024-01-01 00:45"),
                T("2024-01-02"),
            ],
        }
    )
    with pytest.raises(NotMaterializedError, match=r"materialize_offline\('spend'\)"):
        store.get_historical_features(rows, ["spend:count_1h"])
    store.materialize_offline("spend")
    out = store.get_historical_features(rows, ["spend:count_1h", "spend:sum_24h", "spend:mean_1h"])
    # 00:45 -> the 00:30 row; next day 12:00 -> the 00:30 row (no ttl: values stay as of the last event)
    assert out["count_1h"].tolist() == [2, 1, 1, pd.NA]
    assert out["sum_24h"].tolist()[:3] == [30.0, 90.0, 100.0]
    assert out["mean_1h"].tolist()[:3] == [15.0, 40.0, 100.0]
    assert out["count_1h"].dtype == pd.Int64Dtype()


def test_latest_features_of_an_aggregated_view_with_ttl(tmp_path):
    write_events(tmp_path)
    fs = FeatureStore(tmp_path)
    fs.apply([spend_view(ttl=H)])
    fs.materialize_offline("spend")
    table = fs.latest_features("spend", T("2024-01-01 01:30"))
    # user 1: the 01:00 row; user 2: 00:45 is 45 min old, within the 1h ttl
    assert table.select(["user_id", "count_1h", "sum_1h"]).to_pylist() == [
        {"user_id": 1, "count_1h": 3, "sum_1h": 60.0},
        {"user_id": 2, "count_1h": 1, "sum_1h": 100.0},
    ]
    assert (
        table.column_names[:2] == ["user_id", "event_timestamp"]
        and "created_timestamp" not in table.column_names
    )
    # 01:45:01: user 2's 00:45 row is 1h and 1s old -> expired; user 1's 01:00 row is 45 min old
    assert fs.latest_features("spend", T("2024-01-01 01:45:01")).column("user_id").to_pylist() == [1]


def test_failing_recompute_leaves_previous_table_intact(store, tmp_path):
    store.materialize_offline("spend")
    path = store.offline_table_path("spend")
    before = path.read_bytes()
    # A new partition whose amount is text that cannot be cast: the query fails while writing.
    bad = EVENTS.iloc[:1].assign(amount="not a number", ts=T("2024-01-03"), created=T("2024-01-03"))
    write_parquet(tmp_path / "events" / "date=2024-01-03" / "part-0.parquet", bad)
    with pytest.raises(RuntimeError, match="previous table kept"):
        store.materialize_offline("spend")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["spend.parquet"]  # no temp file left


def test_materialize_refuses_views_without_aggregations(tmp_path):
    from ml_platform.featurestore import Field, Float64

    write_events(tmp_path)
    plain = FeatureView("plain", entities=[user], source=events, schema=[Field("amount", Float64)])
    fs = FeatureStore(tmp_path)
    fs.apply([plain])
    with pytest.raises(ValueError, match="no aggregations"):
        fs.materialize_offline("plain")


def test_table_of_an_older_view_definition_is_not_read(store):
    store.materialize_offline("spend")
    rows = pd.DataFrame({"user_id": [1], "event_timestamp": [T("2024-01-01 00:45")]})
    changed = FeatureView(
        "spend", entities=[user], source=events, aggregations=[Aggregation("count", 2 * H, name="count_1h")]
    )
    store.apply([changed])
    with pytest.raises(NotMaterializedError, match="another definition"):
        store.get_historical_features(rows, ["spend:count_1h"])
    store.materialize_offline("spend")
    assert store.get_historical_features(rows, ["spend:count_1h"])["count_1h"].tolist() == [2]
    store.apply([spend_view(ttl=D)])  # only the ttl differs from the first definition: no recompute needed
    store.materialize_offline("spend")
    store.apply([spend_view(ttl=H)])
    assert store.get_historical_features(rows, ["spend:count_1h"])["count_1h"].tolist() == [2]
