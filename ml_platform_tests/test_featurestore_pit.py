"""Point-in-time join (FeatureStore.get_historical_features) against hand-computed rows."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from featurestore_fixtures import T, merchant, table, user, write_by_day, write_parquet

from ml_platform.featurestore import FeatureStore, FeatureView, Field, FileSource, Float64, Int64, String

H = dt.timedelta(hours=1)

# user 1: 10:00 -> 1.0; two rows at 11:00, the later-created one (11:05, 2.0) must win; 12:00 -> 3.0
# user 2: 09:00 -> 5.0
USER_STATS = table(
    "user_id event_timestamp created score n",
    [
        (1, "2024-01-01 10:00", "2024-01-01 10:00", 1.0, 1),
        (1, "2024-01-01 11:00", "2024-01-01 11:05", 2.0, 2),
        (1, "2024-01-01 11:00", "2024-01-01 11:01", 9.0, 9),
        (1, "2024-01-01 12:00", "2024-01-01 12:00", 3.0, 3),
        (2, "2024-01-01 09:00", "2024-01-01 09:00", 5.0, 5),
    ],
    times=["event_timestamp", "created"],
)


def user_stats_view(ttl=H, path="features/user_stats.parquet", name="user_stats") -> FeatureView:
    return FeatureView(
        name=name,
        entities=[user],
        source=FileSource(path, timestamp_field="event_timestamp", created_timestamp_column="created"),
        schema=[Field("score", Float64), Field("n", Int64)],
        ttl=ttl,
    )


@pytest.fixture()
def store(tmp_path) -> FeatureStore:
    write_parquet(tmp_path / "features" / "user_stats.parquet", USER_STATS)
    fs = FeatureStore(tmp_path)
    fs.apply([user, user_stats_view()])
    return fs


def entity_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 1, 2, 2, 3, 1, 1, 1],
            "event_timestamp": [
                T("2024-01-01 12:30"),  # latest 12:00 -> 3.0
                T("2024-01-01 11:30"),  # tie at 11:00 -> created 11:05 wins -> 2.0
                T("2024-01-01 10:00"),  # 09:00 exactly ttl (1h) before -> included -> 5.0
                T("2024-01-01 10:00:00.000001"),  # 1us past the ttl -> null
                T("2024-01-01 12:00"),  # unknown user -> null
                T("2024-01-01 09:59"),  # before any feature row -> null
                T("2024-01-01 12:30"),  # duplicate of row 0 -> answered again
                T("2024-01-01 11:00"),  # feature time == entity time is visible -> 2.0
            ],
            "label": [1, 0, 0, 1, 0, 1, 1, 0],
            "note": ["a", "b", "c", "d", "e", "f", "g", "h"],
        },
        index=[70, 60, 50, 40, 30, 20, 70, 10],
    )


def test_point_in_time_rows_ttl_ties_missing_duplicates_order(store):
    out = store.get_historical_features(entity_rows(), ["user_stats:score", "user_stats:n"])
    expected = entity_rows()
    expected["event_timestamp"] = expected["event_timestamp"].astype("datetime64[us, UTC]")
    expected["score"] = [3.0, 2.0, 5.0, None, None, None, 3.0, 2.0]
    expected["n"] = pd.array([3, 2, 5, None, None, None, 3, 2], dtype="Int64")
    pd.testing.assert_frame_equal(out, expected)


def test_feature_columns_follow_requested_order_and_entity_df_is_untouched(store):
    rows = entity_rows()
    before = rows.copy()
    out = store.get_historical_features(rows, ["user_stats:n", "user_stats:score"])
    assert list(out.columns) == ["user_id", "event_timestamp", "label", "note", "n", "score"]
    pd.testing.assert_frame_equal(rows, before)


def test_no_ttl_means_no_lower_bound(tmp_path):
    write_parquet(tmp_path / "features" / "user_stats.parquet", USER_STATS)
    fs = FeatureStore(tmp_path)
    fs.apply([user_stats_view(ttl=None)])
    rows = pd.DataFrame(
        {"user_id": [2, 2], "event_timestamp": [T("2024-01-01 10:00:00.000001"), T("2030-01-01")]}
    )
    out = fs.get_historical_features(rows, ["user_stats:score"])
    assert out["score"].tolist() == [5.0, 5.0]


def test_multi_key_entity(tmp_path):
    write_parquet(
        tmp_path / "um.parquet",
        pd.DataFrame(
            {
                "user_id": [1, 1, 2],
                "merchant_id": [10, 11, 10],
                "ts": [T("2024-01-01 10:00"), T("2024-01-01 10:30"), T("2024-01-01 09:00")],
                "visits": [1, 7, 4],
            }
        ),
    )
    view = FeatureView(
        "user_merchant",
        entities=[user, merchant],
        source=FileSource("um.parquet", timestamp_field="ts"),
        schema=[Field("visits", Int64)],
    )
    fs = FeatureStore(tmp_path)
    fs.apply([view])
    rows = pd.DataFrame(
        {
            "merchant_id": [10, 11, 10, 11],
            "user_id": [1, 1, 2, 2],
            "event_timestamp": [T("2024-01-01 11:00")] * 4,
        }
    )
    out = fs.get_historical_features(rows, ["user_merchant:visits"])
    assert out["visits"].tolist() == [1, 7, 4, pd.NA]


def other_view() -> FeatureView:
    return FeatureView(
        "merchant_stats",
        entities=[merchant],
        source=FileSource("features/merchant_stats.csv", file_format="csv"),
        schema=[Field("score", Float64), Field("category", String)],
    )


def test_full_feature_names_and_name_clash_between_views(store, tmp_path):
    (tmp_path / "features" / "merchant_stats.csv").write_text(
        "merchant_id,event_timestamp,score,category\n10,2024-01-01T08:00:00Z,0.5,food\n"
    )
    store.apply([other_view()])
    rows = pd.DataFrame({"user_id": [1], "merchant_id": [10], "event_timestamp": [T("2024-01-01 12:00")]})
    refs = ["user_stats:score", "merchant_stats:score", "merchant_stats:category"]
    with pytest.raises(ValueError, match=r"\['score'\].*full_feature_names=True"):
        store.get_historical_features(rows, refs)
    out = store.get_historical_features(rows, refs, full_feature_names=True)
    assert list(out.columns[-3:]) == [
        "user_stats__score",
        "merchant_stats__score",
        "merchant_stats__category",
    ]
    assert out.iloc[0, -3:].tolist() == [3.0, 0.5, "food"]


def test_empty_entity_df_gives_empty_frame_with_typed_columns(store):
    rows = entity_rows().iloc[:0]
    out = store.get_historical_features(rows, ["user_stats:score", "user_stats:n"])
    assert len(out) == 0
    assert list(out.columns) == ["user_id", "event_timestamp", "label", "note", "score", "n"]
    assert str(out["event_timestamp"].dtype) == "datetime64[us, UTC]"
    assert out["score"].dtype == "float64"
    assert out["n"].dtype == pd.Int64Dtype()


def test_timezones_converted_to_utc_and_naive_taken_as_utc(store):
    paris = pd.DataFrame(
        {"user_id": [1], "event_timestamp": [pd.Timestamp("2024-01-01 12:30", tz="Europe/Paris")]}
    )
    out = store.get_historical_features(paris, ["user_stats:score"])  # 11:30 UTC
    assert out["score"].tolist() == [2.0]
    assert out["event_timestamp"].tolist() == [T("2024-01-01 11:30")]
    naive = pd.DataFrame({"user_id": [1], "event_timestamp": [pd.Timestamp("2024-01-01 12:30")]})
    out = store.get_historical_features(naive, ["user_stats:score"])
    assert out["score"].tolist() == [3.0]
    assert str(out["event_timestamp"].dtype) == "datetime64[us, UTC]"
    as_text = pd.DataFrame(
        {"user_id": [1, 1], "event_timestamp": ["2024-01-01T12:30:00Z", "2024-01-01T12:30:00+01:00"]}
    )
    assert store.get_historical_features(as_text, ["user_stats:score"])["score"].tolist() == [3.0, 2.0]


def test_mixed_naive_and_aware_timestamps_are_refused(store):
    mixed = pd.DataFrame(
        {
            "user_id": [1, 1],
            "event_timestamp": pd.Series(
                [dt.datetime(2024, 1, 1, 12), T("2024-01-01 12:00").to_pydatetime()], dtype=object
            ),
        }
    )
    with pytest.raises(ValueError, match="mixes tz-naive and tz-aware"):
        store.get_historical_features(mixed, ["user_stats:score"])


def test_rows_with_null_timestamp_or_key_are_kept_with_null_features(store):
    rows = pd.DataFrame(
        {
            "user_id": pd.array([1, 1, None, 1], dtype="Int64"),
            "event_timestamp": [T("2024-01-01 12:30"), pd.NaT, T("2024-01-01 12:30"), T("2024-01-01 11:30")],
        }
    )
    out = store.get_historical_features(rows, ["user_stats:score"])
    assert out["score"].isna().tolist() == [False, True, True, False]
    assert out["score"].dropna().tolist() == [3.0, 2.0]


@pytest.mark.parametrize(
    ("rows", "refs", "message"),
    [
        (
            pd.DataFrame({"user_id": [1], "ts": [T("2024-01-01")]}),
            ["user_stats:score"],
            r"no 'event_timestamp' column.*'ts'",
        ),
        (None, ["nope:score"], r"unknown feature view 'nope'.*\['user_stats'\]"),
        (None, ["user_stats:nope"], r"has no feature 'nope'.*\['score', 'n'\]"),
        (None, ["user_stats.score"], r"must look like 'feature_view:feature'"),
        (None, [], r"features is empty"),
        (
            pd.DataFrame({"uid": [1], "event_timestamp": [T("2024-01-01")]}),
            ["user_stats:score"],
            r"\['user_id'\].*'user_stats'",
        ),
        (
            pd.DataFrame({"user_id": [1], "event_timestamp": [T("2024-01-01")], "n": [0]}),
            ["user_stats:n"],
            r"\['n'\] would overwrite",
        ),
    ],
)
def test_bad_input_is_a_clear_value_error(store, rows, refs, message):
    rows = entity_rows() if rows is None else rows
    with pytest.raises(ValueError, match=message):
        store.get_historical_features(rows, refs)


def test_missing_source_column_names_it(tmp_path):
    write_parquet(tmp_path / "features" / "user_stats.parquet", USER_STATS.drop(columns=["n"]))
    fs = FeatureStore(tmp_path)
    fs.apply([user_stats_view()])
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['n'\]"):
        fs.get_historical_features(entity_rows(), ["user_stats:score"])


def test_source_directory_with_hive_partitions_ignores_partition_column(tmp_path):
    write_by_day(tmp_path / "stats", USER_STATS, "event_timestamp")
    write_parquet(tmp_path / "stats" / "date=2023-12-31" / "part-0.parquet", USER_STATS.iloc[:0])
    fs = FeatureStore(tmp_path)
    fs.apply([user_stats_view(path=str(tmp_path / "stats"))])  # absolute path
    out = fs.get_historical_features(entity_rows(), ["user_stats:score"])
    assert out["score"].tolist()[:3] == [3.0, 2.0, 5.0]
    table = fs.latest_features("user_stats", T("2024-01-01 12:00"))
    assert "date" not in table.column_names


def test_missing_source_path_is_reported(tmp_path):
    fs = FeatureStore(tmp_path)
    fs.apply([user_stats_view(path="nowhere")])
    with pytest.raises(FileNotFoundError, match="nowhere does not exist"):
        fs.get_historical_features(entity_rows(), ["user_stats:score"])


def test_latest_features_respects_ttl_and_tie_break(store):
    table = store.latest_features("user_stats", dt.datetime(2024, 1, 1, 11, 30, tzinfo=dt.UTC))
    assert table.column_names == ["user_id", "event_timestamp", "score", "n"]
    # user 2's 09:00 row is 2.5h old with a 1h ttl: gone; user 1 gets the later-created 11:00 row.
    assert table.to_pylist() == [
        {"user_id": 1, "event_timestamp": T("2024-01-01 11:00").to_pydatetime(), "score": 2.0, "n": 2}
    ]
    table = store.latest_features("user_stats", dt.datetime(2024, 1, 1, 10, 0))  # naive = UTC
    assert [(r["user_id"], r["score"]) for r in table.to_pylist()] == [
        (1, 1.0),
        (2, 5.0),
    ]  # 09:00 at the ttl edge
    assert store.latest_features("user_stats", T("2024-01-01 08:00")).num_rows == 0


def test_registry_apply_get_list_and_reload(store, tmp_path):
    assert store.get_entity("user").join_keys == ("user_id",)
    assert [v.name for v in store.list_feature_views()] == ["user_stats"]
    with pytest.raises(ValueError, match=r"Unknown feature view 'x'.*\['user_stats'\]"):
        store.get_feature_view("x")
    with pytest.raises(TypeError, match="Entity and FeatureView"):
        store.apply(["user_stats"])
    reopened = FeatureStore(tmp_path)
    assert reopened.get_feature_view("user_stats") == store.get_feature_view("user_stats")
    assert reopened.get_historical_features(entity_rows(), ["user_stats:score"])["score"].tolist()[:2] == [
        3.0,
        2.0,
    ]


def test_every_declared_dtype_comes_back_as_documented(tmp_path):
    from ml_platform.featurestore import Bool, Float32, Int32, UnixTimestamp

    write_parquet(
        tmp_path / "typed.parquet",
        pd.DataFrame(
            {
                "user_id": [1],
                "event_timestamp": [T("2024-01-01")],
                "i32": [7],
                "f32": [0.5],
                "flag": [True],
                "seen": [T("2023-12-31 23:00")],
                "word": ["x"],
            }
        ),
    )
    fields = [
        Field("i32", Int32),
        Field("f32", Float32),
        Field("flag", Bool),
        Field("seen", UnixTimestamp),
        Field("word", String),
    ]
    fs = FeatureStore(tmp_path)
    fs.apply([FeatureView("typed", entities=[user], source=FileSource("typed.parquet"), schema=fields)])
    rows = pd.DataFrame({"user_id": [1, 2], "event_timestamp": [T("2024-01-02")] * 2})
    out = fs.get_historical_features(rows, [f"typed:{f.name}" for f in fields])
    assert [str(t) for t in out.dtypes.iloc[2:]] == [
        "Int32",
        "float32",
        "boolean",
        "datetime64[us, UTC]",
        "str",
    ]
    assert out.iloc[0, 2:].tolist() == [7, 0.5, True, T("2023-12-31 23:00"), "x"]
    assert out.iloc[1, 2:].isna().all()
