"""Aggregated feature views: compiled DuckDB SQL against hand-computed windows, materialization."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pyarrow.parquet as pq
import pytest
from featurestore_fixtures import T, merchant, table, user, write_by_day, write_parquet

from ml_platform.featurestore import (
    Aggregation,
    FeatureStore,
    FeatureView,
    FileSource,
    NotMaterializedError,
    compile_aggregation_sql,
    offline,
)
from ml_platform.featurestore.aggregation import Frame, count_sql, max_sql, mean_sql, min_sql, sum_sql

H, D = dt.timedelta(hours=1), dt.timedelta(days=1)

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
EVENTS = table(
    "user_id ts amount",
    [
        (1, "2024-01-01 00:00", 10.0),
        (1, "2024-01-01 00:30", 20.0),
        (1, "2024-01-01 01:00", 30.0),
        (1, "2024-01-02 00:30", 40.0),
        (2, "2024-01-01 00:45", 100.0),
    ],
    times=["ts"],
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
    write_by_day(repo / "events", frame, "ts")


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
    assert pq.read_metadata(result["path"]).num_rows == result["rows"]  # reports what it wrote
    got = read_offline(store, "spend")
    want = expected_frame()
    assert list(got.columns) == list(want.columns)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert str(got["count_1h"].dtype) == "int64" and str(got["sum_1h"].dtype) == "float64"


def test_rows_with_equal_times_collapse_to_one_row(tmp_path):
    ties = table(
        "user_id ts created amount",
        [
            (1, "2024-01-01 00:00", "2024-01-01 00:00:01", 10.0),
            (1, "2024-01-01 00:00", "2024-01-01 00:00:07", 30.0),
            (1, "2024-01-01 00:20", "2024-01-01 00:20", 20.0),
        ],
        times=["ts", "created"],
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
    labels = table(
        "merchant_id event_timestamp is_fraud label_timestamp",
        [
            (10, "2024-01-01 00:00", 1, "2024-01-01 02:00"),
            (10, "2024-01-01 00:10", 0, "2024-01-01 01:00"),
            (10, "2024-01-01 00:20", None, None),
            (10, "2024-01-01 00:30", 0, "2024-01-01 02:00"),
            (11, "2024-01-01 00:00", None, None),
        ],
        times=["event_timestamp", "label_timestamp"],
        dtypes={"is_fraud": "Int64"},
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
    w = Frame("w")
    assert count_sql(None, w) == "count(*) OVER w"
    assert count_sql("amount", w) == 'count("amount") OVER w'
    assert [f("amount", w) for f in (sum_sql, min_sql, max_sql)] == [
        'sum(CAST("amount" AS DOUBLE)) OVER w',
        'min(CAST("amount" AS DOUBLE)) OVER w',
        'max(CAST("amount" AS DOUBLE)) OVER w',
    ]
    assert mean_sql("amount", w) == '(sum(CAST("amount" AS DOUBLE)) OVER w / count("amount") OVER w)'
    # Growing frames (Spark's): counts and integer sums as everything so far minus what is older.
    g = Frame("w", growing=True)
    assert count_sql(None, g) == "(count(*) OVER running - coalesce(count(*) OVER w_before, 0))"
    assert g.integer_sum("u") == (
        'CASE WHEN (count("u") OVER running - coalesce(count("u") OVER w_before, 0)) > 0 '
        'THEN (sum("u") OVER running - coalesce(sum("u") OVER w_before, 0)) END'
    )
    assert max_sql("amount", g) == 'max(CAST("amount" AS DOUBLE)) OVER w'  # not additive: sliding


def test_sql_shown_for_a_view_reads_its_source_and_gives_the_hand_computed_values(store):
    # What the UI shows must be the query that computes the table: run it on the view's files.
    with offline.connect() as con:
        got = con.sql(store.aggregation_sql("spend")).df()
    got = got.sort_values(["user_id", "event_timestamp"], ignore_index=True)
    pd.testing.assert_frame_equal(got, expected_frame(), check_dtype=False)


# Sub-second window (1.5 s) and NULLs: a NULL amount counts as a row but not as a value; rows with
# a NULL key or a NULL time are skipped. Windows [t - w, t] include both ends.
W = dt.timedelta(seconds=1, microseconds=500_000)
TINY_EVENTS = table(
    "user_id ts amount",
    [
        (1, "2024-01-01 00:00:00", 4.0),
        (1, "2024-01-01 00:00:01", None),
        (1, "2024-01-01 00:00:01.5", 2.0),  # 00:00:00 is exactly 1.5 s back: in the window
        (1, "2024-01-01 00:00:03", None),
        (1, "2024-01-01 00:00:05", None),  # the only row in its window has no amount
        (None, "2024-01-01 00:00:01", 100.0),  # no key: skipped
        (2, None, 7.0),  # no time: skipped
        (2, "2024-01-01 00:00:02", 7.0),
    ],
    times=["ts"],
    dtypes={"user_id": "Int64"},
)
# (user, second) -> rows in 1 s, rows in 1.5 s, amounts in 1.5 s, sum, mean, min, max over 1.5 s
TINY_EXPECTED = [
    (1, 0.0, 1, 1, 1, 4.0, 4.0, 4.0, 4.0),
    (1, 1.0, 2, 2, 1, 4.0, 4.0, 4.0, 4.0),
    (1, 1.5, 2, 3, 2, 6.0, 3.0, 2.0, 4.0),
    (1, 3.0, 1, 2, 1, 2.0, 2.0, 2.0, 2.0),
    (1, 5.0, 1, 1, 0, None, None, None, None),
    (2, 2.0, 1, 1, 1, 7.0, 7.0, 7.0, 7.0),
]


def test_compiled_sql_on_a_hand_made_table_gives_hand_computed_windows():
    view = FeatureView(
        "tiny",
        entities=[user],
        source=FileSource("unused", timestamp_field="ts"),
        aggregations=[
            Aggregation("count", dt.timedelta(seconds=1), name="rows_1s"),
            Aggregation("count", W, name="rows"),
            *(
                Aggregation(function, W, "amount", name=name)
                for function, name in (
                    ("count", "amounts"),
                    ("sum", "total"),
                    ("mean", "mean"),
                    ("min", "low"),
                    ("max", "high"),
                )
            ),
        ],
    )
    sql = compile_aggregation_sql(view, "tiny_events")
    assert "INTERVAL '1500000 microseconds' PRECEDING" in sql and "INTERVAL '1 seconds' PRECEDING" in sql
    with offline.connect() as con:
        con.register("tiny_events", TINY_EVENTS)
        got = con.sql(sql + " ORDER BY user_id, event_timestamp").df()
    start = T("2024-01-01")
    features = ["rows_1s", "rows", "amounts", "total", "mean", "low", "high"]
    assert list(got.columns) == ["user_id", "event_timestamp", "created_timestamp", *features]
    assert got["created_timestamp"].isna().all()  # the source declares no created column
    rows = [
        (r.user_id, (r.event_timestamp - start).total_seconds(), *[None if pd.isna(v) else v for v in r[3:]])
        for r in got.itertuples(index=False)
    ]
    assert rows == TINY_EXPECTED


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
    # At 01:00 user 1 has rows at 00:00, 00:30, 01:00: 3 within 1 h, 2 within 30 min.
    rows = pd.DataFrame({"user_id": [1], "event_timestamp": [T("2024-01-01 01:00")]})
    store.materialize_offline("spend")
    assert store.get_historical_features(rows, ["spend:count_1h"])["count_1h"].tolist() == [3]
    redefined = FeatureView(
        "spend", entities=[user], source=events, aggregations=[Aggregation("count", H / 2, name="count_1h")]
    )
    store.apply([redefined])
    with pytest.raises(NotMaterializedError, match="another definition"):
        store.get_historical_features(rows, ["spend:count_1h"])
    store.materialize_offline("spend")
    assert store.get_historical_features(rows, ["spend:count_1h"])["count_1h"].tolist() == [2]
    store.apply([spend_view(ttl=D)])  # back to the 1 h window
    store.materialize_offline("spend")
    store.apply([spend_view(ttl=H)])  # only the ttl differs from the table's definition: still read
    assert store.get_historical_features(rows, ["spend:count_1h"])["count_1h"].tolist() == [3]


def test_fixed_point_sums_add_cents_exactly_and_are_part_of_the_definition(tmp_path):
    """decimals=2: the window adds cents, so 0.10 + 0.20 + 0.30 is 0.60 (a float sum in arrival
    order is 0.6000000000000001); the mean is that sum over the count of values; a NULL amount
    is a row, not a value. The declaration survives the registry and changes the fingerprint."""
    frame = table(
        "user_id ts amount",
        [
            (1, "2024-01-01 00:00", 0.1),
            (1, "2024-01-01 00:10", 0.2),
            (1, "2024-01-01 00:20", 0.3),
            (1, "2024-01-01 00:30", None),
        ],
        times=["ts"],
    )
    frame["created"] = frame["ts"]
    write_events(tmp_path, frame)
    view = FeatureView(
        "cents",
        entities=[user],
        source=events,
        aggregations=[
            Aggregation("sum", H, "amount", name="total", decimals=2),
            Aggregation("mean", H, "amount", name="average", decimals=2),
        ],
    )
    fs = FeatureStore(tmp_path)
    fs.apply([view])
    fs.materialize_offline("cents")
    got = read_offline(fs, "cents")
    assert got["total"].tolist() == [0.1, 0.3, 0.6, 0.6] and 0.1 + 0.2 + 0.3 != 0.6
    assert got["average"].tolist() == [0.1, 0.3 / 2, 0.6 / 3, 0.6 / 3]
    assert "CAST(round(CAST(\"amount\" AS DOUBLE) * CAST(100 AS DOUBLE)) AS BIGINT)" in fs.aggregation_sql("cents")

    reread = FeatureStore(tmp_path).get_feature_view("cents")
    assert [a.decimals for a in reread.aggregations] == [2, 2]
    as_floats = FeatureView(
        "cents",
        entities=[user],
        source=events,
        aggregations=[Aggregation("sum", H, "amount", name="total"), Aggregation("mean", H, "amount", name="average")],
    )
    fs.apply([as_floats])
    with pytest.raises(NotMaterializedError, match="another definition"):
        fs.get_historical_features(pd.DataFrame({"user_id": [1], "event_timestamp": [T("2024-01-01 01:00")]}), ["cents:total"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"function": "max", "column": "amount", "decimals": 2}, "Aggregation 'max' takes no decimals \\(got 2\\)"),
        ({"function": "count", "decimals": 0}, "Aggregation 'count' takes no decimals"),
        ({"function": "sum", "column": "amount", "decimals": 10}, "'amount_sum_1h'.*integer in \\[0, 9\\], got 10"),
        ({"function": "mean", "column": "amount", "decimals": 1.0}, "integer in \\[0, 9\\], got 1.0"),
        ({"function": "sum", "column": "amount", "decimals": -1}, "got -1"),
    ],
)
def test_decimals_are_refused_where_they_mean_nothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Aggregation(window=H, **kwargs)
