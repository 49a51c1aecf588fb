"""The aggregation declarations on Spark (local mode): the same feature tables as DuckDB's, row by
row and value by value, on the generator's events and on hand-made edge cases; the table is
written where and how the store reads it, atomically; the engine is chosen by name; the Dagster
resource builds the session from config.

Equality: every value is compared exactly (the same float, bit for bit), and so is where the
NULLs are. The platform's sums and means are fixed point (`Aggregation.decimals`: amounts in
cents, 0/1 labels), which both engines add as integers. Only a sum or mean declared without
decimals is a float sum, compared to 1e-12 relative: DuckDB adds a window's values in
segment-tree order and Spark row by row, so its last bit can differ (measured: a few 1e-16)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from featurestore_fixtures import T, merchant, table, user, write_by_day, write_parquet
from test_fixed_point import TRICKY

from ml_platform import features as fr
from ml_platform import fixed_point
from ml_platform.featurestore import Aggregation, Entity, FeatureStore, FeatureView, FileSource
from ml_platform.featurestore.spark_offline import (
    DuckDBOfflineEngine,
    SparkOfflineEngine,
    build_spark_session,
    offline_engine,
    spark_conf,
)
from ml_platform.featurestore.spark_sql import compile_spark_sql
from ml_platform.featurestore.store import FINGERPRINT_KEY
from ml_platform.sources.generator import GeneratorConfig, write_dataset

FLOAT_RTOL = 1e-12
H, D = dt.timedelta(hours=1), dt.timedelta(days=1)


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the test session (1 GB driver, 2 shuffle partitions)."""
    session = build_spark_session(
        spark_conf(
            driver_memory="1g", extra={"spark.sql.shuffle.partitions": "2", "spark.default.parallelism": "2"}
        )
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


# --------------------------------------------------------------------------- comparing tables


def read_sorted(path: Path, view: FeatureView) -> pa.Table:
    return pq.read_table(path).sort_by([(k, "ascending") for k in [*view.join_keys, "event_timestamp"]])


def assert_same_table(duck_store: FeatureStore, spark_store: FeatureStore, view: FeatureView) -> int:
    """The two stores' tables of `view`: same columns, types, fingerprint, rows and values."""
    duck_path, spark_path = (
        duck_store.offline_table_path(view.name),
        spark_store.offline_table_path(view.name),
    )
    a, b = read_sorted(duck_path, view), read_sorted(spark_path, view)
    assert a.column_names == b.column_names
    assert [f.type for f in a.schema] == [f.type for f in b.schema]  # e.g. timestamp[us, tz=UTC], int64
    key = FINGERPRINT_KEY.encode()  # the same fingerprint (DuckDB's table also records its source files)
    assert pq.read_metadata(duck_path).metadata[key] == pq.read_metadata(spark_path).metadata[key]
    assert a.num_rows == b.num_rows
    sums = {a_.feature_name for a_ in view.aggregations if a_.function in ("sum", "mean") and a_.decimals is None}
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        assert x.is_null().to_pylist() == y.is_null().to_pylist(), f"{view.name}.{name}: NULLs differ"
        if name in sums:
            np.testing.assert_allclose(
                x.to_numpy(zero_copy_only=False),
                y.to_numpy(zero_copy_only=False),
                rtol=FLOAT_RTOL,
                err_msg=name,
            )
        else:
            assert x.equals(y), f"{view.name}.{name} differs"
    return a.num_rows


def twin_stores(tmp_path: Path, raw: Path, views) -> tuple[FeatureStore, FeatureStore]:
    """Two stores on the same raw data (a symlink), one per engine, with `views` applied."""
    stores = []
    for name in ("duckdb", "spark"):
        repo = tmp_path / name
        repo.mkdir()
        (repo / raw.name).symlink_to(raw)
        store = FeatureStore(repo, duckdb_threads=1)
        store.apply(list(views))
        stores.append(store)
    return stores[0], stores[1]


# --------------------------------------------------------------------------- generator events


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """45 days of the generator's events (drift included): every aggregated view has full windows."""
    root = tmp_path_factory.mktemp("generated")
    config = GeneratorConfig(
        n_users=250, n_merchants=110, days=45, seed=11, fraud_rate=0.03, label_maturity_days=2
    )
    write_dataset(config, root / "raw")
    return root / "raw"


def test_every_platform_view_gives_duckdbs_table_on_the_generators_events(spark, generated, tmp_path):
    duck, spark_store = twin_stores(tmp_path, generated, [*fr.ENTITIES, *fr.FEATURE_VIEWS])
    engine = SparkOfflineEngine(spark)
    aggregated = [v for v in fr.FEATURE_VIEWS if v.aggregations]
    assert len(aggregated) == 4
    # Every sum and mean is fixed point, so every value below is compared exactly.
    assert all(a.decimals is not None for v in aggregated for a in v.aggregations if a.function in ("sum", "mean"))
    for view in aggregated:
        want = duck.materialize_offline(view.name)
        got = engine.materialize_offline(spark_store, view.name)
        assert got["rows"] == want["rows"] > 1000 and got["engine"] == "spark"
        assert got["path"] == str(spark_store.offline_table_path(view.name))
        assert assert_same_table(duck, spark_store, view) == got["rows"]
    # Read back through the store (the fingerprint check, the point-in-time join): the same frame.
    events = pd.read_parquet(
        generated / "transactions", columns=["user_id", "merchant_id", "event_timestamp"]
    )
    entity_df = events.sample(2000, random_state=1).reset_index(drop=True)
    refs = [r for r in fr.MODEL_FEATURE_REFS if not r.startswith("user_profile")]
    a = duck.get_historical_features(entity_df, refs)
    b = spark_store.get_historical_features(entity_df, refs)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert a["txn_count_30d"].notna().mean() > 0.5  # the rows really found features
    leftovers = [p.name for p in (spark_store.repo_path / "offline").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no scratch folder or temp file left


# --------------------------------------------------------------------------- edge cases

W = dt.timedelta(seconds=1, microseconds=500_000)
events_source = FileSource("events", timestamp_field="ts", created_timestamp_column="created")
# Hand-made: equal times (with different and with equal created times), NULL values, NULL keys,
# NULL times, rows exactly `window` apart and 1 µs inside / outside a window, negative values, a
# user whose only value is NULL.
EDGE = table(
    "user_id merchant_id ts created amount",
    [
        (1, 10, "2024-01-01 00:00:00", "2024-01-01 00:00:05", 4.0),
        (1, 10, "2024-01-01 00:00:00", "2024-01-01 00:00:09", -2.5),  # peer, created later
        (1, 11, "2024-01-01 00:00:01", "2024-01-01 00:00:01", None),  # NULL value: a row, not a value
        (1, 10, "2024-01-01 00:00:01.5", None, 2.0),  # 00:00:00 exactly 1.5 s back: inside
        (1, 11, "2024-01-01 00:00:01.500001", "2024-01-01 00:00:02", 8.0),  # 00:00:00 is 1 µs too old
        (1, 10, "2024-01-01 01:00:00", "2024-01-01 01:00:00", 16.0),  # 00:00:00 exactly 1 h back: inside
        (1, 10, "2024-01-01 01:00:00.000001", "2024-01-01 01:00:00", 32.0),
        (1, 10, "2024-01-02 01:00:00", None, 64.0),  # equal peers without created times
        (1, 10, "2024-01-02 01:00:00", None, 64.0),
        (None, 10, "2024-01-01 00:00:01", "2024-01-01 00:00:01", 100.0),  # NULL key: skipped
        (2, None, "2024-01-01 00:00:01", "2024-01-01 00:00:01", 100.0),  # NULL merchant (user views keep it)
        (2, 12, None, None, 7.0),  # NULL time: skipped
        (2, 12, "2024-01-01 00:00:02", "2024-01-01 00:00:02", 7.0),
        (3, 12, "2024-01-01 00:00:00", "2024-01-01 00:00:00", None),  # no value at all
        # Cents whose float sum is not the sum in cents (0.1 + 0.2 + 0.3 = 0.6000000000000001),
        # and a value off the cent grid (rounded half away from zero: 0.005 is 1 cent).
        (4, 12, "2024-01-01 00:00:00", "2024-01-01 00:00:00", 0.1),
        (4, 12, "2024-01-01 00:00:00.5", "2024-01-01 00:00:00.5", 0.2),
        (4, 12, "2024-01-01 00:00:01", "2024-01-01 00:00:01", 0.3),
        (4, 12, "2024-01-01 00:00:02", "2024-01-01 00:00:02", 0.005),
    ],
    times=["ts", "created"],
    dtypes={"user_id": "Int64", "merchant_id": "Int64"},
)
for _column in ("ts", "created"):
    EDGE[_column] = EDGE[_column].dt.as_unit("us")  # the raw layout's µs (Spark reads no ns times)


def every_function(window: dt.timedelta, label: str) -> list[Aggregation]:
    """Each function over `window`, sums and means both as float sums and fixed point (cents)."""
    return [
        Aggregation("count", window, name=f"rows_{label}"),
        Aggregation("count", window, "amount", name=f"values_{label}"),
        Aggregation("sum", window, "amount", name=f"sum_{label}"),
        Aggregation("mean", window, "amount", name=f"mean_{label}"),
        Aggregation("sum", window, "amount", name=f"cents_sum_{label}", decimals=2),
        Aggregation("mean", window, "amount", name=f"cents_mean_{label}", decimals=2),
        Aggregation("min", window, "amount", name=f"min_{label}"),
        Aggregation("max", window, "amount", name=f"max_{label}"),
    ]


EDGE_VIEWS = [
    FeatureView(
        "edge_user",
        entities=[user],
        source=events_source,
        aggregations=[*every_function(W, "1500ms"), *every_function(H, "1h"), *every_function(D, "1d")],
    ),
    FeatureView(
        "edge_user_merchant",
        entities=[user, merchant],
        source=events_source,
        aggregations=every_function(H, "1h"),
    ),
    FeatureView(  # no created column: created_timestamp is NULL throughout
        "edge_no_created",
        entities=[Entity("card", join_keys=["user_id"])],
        source=FileSource("events", timestamp_field="ts"),
        aggregations=every_function(W, "1500ms"),
    ),
]


def test_edge_cases_give_duckdbs_table_and_the_documented_values(spark, tmp_path):
    raw = tmp_path / "raw_edge"
    write_by_day(raw / "events", EDGE, "created")  # NULL created rows: written apart below
    write_parquet(raw / "events" / "nulls" / "part-0.parquet", EDGE[EDGE["created"].isna()])
    duck, spark_store = twin_stores(tmp_path, raw / "events", EDGE_VIEWS)
    engine = offline_engine("spark", lambda: spark)
    for view in EDGE_VIEWS:
        duck.materialize_offline(view.name)
        engine.materialize_offline(spark_store, view.name)
        assert_same_table(duck, spark_store, view)

    got = read_sorted(spark_store.offline_table_path("edge_user"), EDGE_VIEWS[0]).to_pandas()
    one = got[got["user_id"] == 1].set_index("event_timestamp")
    # Peers at 00:00 collapse to one row keeping the latest created time; both values count.
    first = one.loc[T("2024-01-01 00:00:00")]
    assert (first["rows_1500ms"], first["sum_1500ms"], first["min_1500ms"]) == (2, 1.5, -2.5)
    assert first["created_timestamp"] == T("2024-01-01 00:00:09")
    assert one.loc[T("2024-01-01 00:00:01.5"), "rows_1500ms"] == 4  # the 00:00 peers are exactly 1.5 s back
    assert one.loc[T("2024-01-01 00:00:01.500001"), "rows_1500ms"] == 3  # ... and 1 µs too old here
    assert one.loc[T("2024-01-01 01:00:00"), "rows_1h"] == 6  # 00:00:00 exactly 1 h back: inside
    assert one.loc[T("2024-01-01 01:00:00.000001"), "rows_1h"] == 5
    assert pd.isna(one.loc[T("2024-01-02 01:00:00"), "created_timestamp"])  # peers without created
    assert one.loc[T("2024-01-02 01:00:00"), "rows_1d"] == 4  # 01:00, 01:00:00.000001 and the 2 peers
    assert set(got["user_id"]) == {1, 2, 3, 4}  # the NULL key row is skipped
    assert len(got) == 7 + 2 + 1 + 4  # the NULL time row is skipped, the peers collapse
    cents = got[got["user_id"] == 4].set_index("event_timestamp")
    at_1s = cents.loc[T("2024-01-01 00:00:01")]
    assert at_1s["cents_sum_1500ms"] == 0.6 and at_1s["cents_mean_1500ms"] == 0.6 / 3  # exact: 60 cents
    assert 0.1 + 0.2 + 0.3 != 0.6  # what a float sum in arrival order gives instead
    at_2s = cents.loc[T("2024-01-01 00:00:02")]  # 0.2 (exactly 1.5 s back), 0.3 and 0.005
    assert (at_2s["cents_sum_1500ms"], at_2s["cents_sum_1h"]) == (0.51, 0.61)
    lone = got[got["user_id"] == 3].iloc[0]
    assert (
        lone["rows_1h"] == 1
        and lone["values_1h"] == 0
        and pd.isna(lone["mean_1h"])
        and pd.isna(lone["max_1h"])
    )
    pairs = read_sorted(spark_store.offline_table_path("edge_user_merchant"), EDGE_VIEWS[1]).to_pandas()
    assert pairs["merchant_id"].notna().all() and len(pairs) == 5 + 2 + 1 + 1 + 4  # (2, NULL): a NULL key
    assert (
        read_sorted(spark_store.offline_table_path("edge_no_created"), EDGE_VIEWS[2])
        .column("created_timestamp")
        .null_count
        == 14
    )


def test_compiled_spark_sql_orders_by_microseconds_and_shares_the_function_mapping():
    view = EDGE_VIEWS[0]
    sql = compile_spark_sql(view, "events")
    assert "PARTITION BY `user_id` ORDER BY unix_micros(__source_ts) RANGE BETWEEN 1500000 PRECEDING" in sql
    assert "RANGE BETWEEN 3600000000 PRECEDING AND CURRENT ROW" in sql
    assert "RANGE BETWEEN 86400000000 PRECEDING AND CURRENT ROW" in sql
    assert (
        "CAST(`ts` AS TIMESTAMP) AS __source_ts" in sql
        and "`ts` IS NOT NULL AND `user_id` IS NOT NULL" in sql
    )
    # Counts over growing frames: every row so far minus those older than the window (t - w - 1 µs).
    assert "running AS (PARTITION BY `user_id` ORDER BY unix_micros(__source_ts) RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)" in sql
    assert "w_3600s_before AS (PARTITION BY `user_id` ORDER BY unix_micros(__source_ts) RANGE BETWEEN UNBOUNDED PRECEDING AND 3600000001 PRECEDING)" in sql
    values_1h = "(count(`amount`) OVER running - coalesce(count(`amount`) OVER w_3600s_before, 0))"
    assert f"CAST((sum(CAST(`amount` AS DOUBLE)) OVER w_3600s / {values_1h}) AS DOUBLE) AS `mean_1h`" in sql
    assert "CAST((count(*) OVER running - coalesce(count(*) OVER w_86400s_before, 0)) AS BIGINT) AS `rows_1d`" in sql
    assert "max(CAST(`amount` AS DOUBLE)) OVER w_3600s" in sql  # min, max, float sums: sliding frames
    # A fixed-point mean: the cents once per row, their exact window sum over the count of values.
    assert "CAST(round(CAST(`amount` AS DOUBLE) * CAST(100 AS DOUBLE)) AS BIGINT) AS `__units2_amount`" in sql
    cents_1h = "(count(`__units2_amount`) OVER running - coalesce(count(`__units2_amount`) OVER w_3600s_before, 0))"
    assert (
        f"CAST(((CAST(CASE WHEN {cents_1h} > 0 THEN (sum(`__units2_amount`) OVER running - "
        f"coalesce(sum(`__units2_amount`) OVER w_3600s_before, 0)) END AS DOUBLE) / CAST(100 AS DOUBLE)) "
        f"/ CAST({cents_1h} AS DOUBLE)) AS DOUBLE) AS `cents_mean_1h`"
    ) in sql
    assert "TIMESTAMPTZ" not in sql and '"' not in sql  # nothing of DuckDB's dialect


def test_spark_sql_gives_numpys_fixed_point_units_sums_and_means(spark):
    """The one SQL text of `fixed_point` in Spark: the same units as numpy (and DuckDB, in
    test_fixed_point) on the values where rounding rules part, the same sum and mean."""
    values = spark.createDataFrame([(i, float(x)) for i, x in enumerate(TRICKY)], "i INT, x DOUBLE")
    values.createOrReplaceTempView("tricky")
    rows = spark.sql(f"SELECT {fixed_point.units_sql('x', 2)} AS u FROM tricky ORDER BY i").collect()
    assert [r["u"] for r in rows] == fixed_point.units(np.array(TRICKY), 2).tolist()
    total, count = 6003, 7
    s, m = spark.sql(
        f"SELECT {fixed_point.sum_from_units_sql(f'CAST({total} AS BIGINT)', 2)} AS s, "
        f"{fixed_point.mean_from_units_sql(f'CAST({total} AS BIGINT)', f'CAST({count} AS BIGINT)', 2)} AS m"
    ).first()
    assert (s, m) == (60.03, 60.03 / 7)


def test_a_failed_spark_run_leaves_the_previous_table_intact(spark, tmp_path):
    raw = tmp_path / "raw_fail"
    write_by_day(raw / "events", EDGE.dropna(subset=["created"]), "created")
    _, store = twin_stores(tmp_path, raw / "events", EDGE_VIEWS[:1])
    engine = SparkOfflineEngine(spark)
    engine.materialize_offline(store, "edge_user")
    path = store.offline_table_path("edge_user")
    before = path.read_bytes()
    bad = EDGE.iloc[:1].assign(amount="not a number", ts=T("2024-01-03"), created=T("2024-01-03"))
    write_parquet(raw / "events" / "date=2024-01-03" / "part-0.parquet", bad)
    with pytest.raises(
        RuntimeError, match=r"materialize_offline\('edge_user'\) on Spark failed; previous table kept"
    ):
        engine.materialize_offline(store, "edge_user")
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["edge_user.parquet"]  # no scratch left
    shutil.rmtree(raw / "events" / "date=2024-01-03")
    fee = FeatureView(
        "fee",
        entities=[user],
        source=events_source,
        aggregations=[Aggregation("sum", H, "fee", name="fees_1h")],
    )
    store.apply([fee])
    with pytest.raises(ValueError, match=r"feature view 'fee' source 'events' lacks column\(s\) \['fee'\]"):
        engine.materialize_offline(store, "fee")
    assert not store.offline_table_path("fee").exists()


def test_engines_are_chosen_by_name(spark):
    assert isinstance(offline_engine("duckdb"), DuckDBOfflineEngine)
    assert isinstance(offline_engine(" Spark ", lambda: spark), SparkOfflineEngine)
    with pytest.raises(
        ValueError,
        match=r"offline engine 'flink' is not one of \['duckdb', 'spark'\].*ML_PLATFORM_OFFLINE_ENGINE",
    ):
        offline_engine("flink")


def test_dagster_resource_builds_the_session_from_config_and_materializes(spark, generated, tmp_path):
    pytest.importorskip("dagster_pyspark", reason="the `spark` extra (dagster-pyspark) is not installed")
    from ml_platform.defs.spark import SparkResource

    duck, spark_store = twin_stores(tmp_path, generated, [*fr.ENTITIES, *fr.FEATURE_VIEWS])
    view = fr.merchant_transaction_stats

    @dg.asset(required_resource_keys={"spark_engine"})
    def merchant_table(context) -> dg.MaterializeResult:
        resource = context.resources.spark_engine
        assert resource.spark_session.conf.get("spark.sql.session.timeZone") == "UTC"
        result = resource.offline_engine().materialize_offline(spark_store, view.name)
        return dg.MaterializeResult(metadata={"rows": result["rows"]})

    resource = SparkResource(
        spark_config=spark_conf(driver_memory="1g", extra={"spark.sql.shuffle.partitions": "2"})
    )
    assert resource.spark_config["spark.master"] == "local[2]"
    assert SparkResource().spark_config["spark.sql.session.timeZone"] == "UTC"  # the default config
    run = dg.materialize([merchant_table], resources={"spark_engine": resource})
    assert run.success
    duck.materialize_offline(view.name)
    assert assert_same_table(duck, spark_store, view) > 1000


def test_the_platforms_feature_asset_runs_on_spark_when_the_setting_says_so(spark, generated, tmp_path):
    """ML_PLATFORM_OFFLINE_ENGINE=spark is all a deployment changes: the platform's own feature
    asset, with the platform's resources (`spark` is dagster-pyspark's lazy resource), writes the
    table on Spark; the table equals DuckDB's."""
    pytest.importorskip("dagster_pyspark", reason="the `spark` extra (dagster-pyspark) is not installed")
    from fixtures_platform import TEST_REDIS_URL

    from ml_platform.defs.assets import feature_table_assets
    from ml_platform.defs.resources import default_resources
    from ml_platform.settings import load_settings

    view = fr.merchant_transaction_stats
    duck, spark_store = twin_stores(tmp_path, generated, [*fr.ENTITIES, *fr.FEATURE_VIEWS])
    settings = load_settings({"ML_PLATFORM_DATA_DIR": str(spark_store.repo_path), "REDIS_URL": TEST_REDIS_URL,
                              "ML_PLATFORM_OFFLINE_ENGINE": "spark"})
    asset = next(a for a in feature_table_assets if a.key.to_user_string() == view.name)
    run = dg.materialize([asset], resources=default_resources(settings))
    assert run.success
    (mat,) = run.asset_materializations_for_node(view.name)
    assert mat.metadata["engine"].value == "spark" and "unix_micros" in mat.metadata["sql"].value
    duck.materialize_offline(view.name)
    assert assert_same_table(duck, spark_store, view) > 1000
    with pytest.raises(ValueError, match="ML_PLATFORM_OFFLINE_ENGINE must be one of \\['duckdb', 'spark'\\], got 'flink'"):
        load_settings({"ML_PLATFORM_OFFLINE_ENGINE": "flink"})
