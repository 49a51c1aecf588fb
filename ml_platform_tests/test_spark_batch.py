"""A day of batch scoring on Spark (local mode) gives the platform batch path's predictions:
`score_partition_spark` against `score_partition` on the same tiny platform, row by row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from ml_platform import features as fr
from ml_platform.featurestore import FeatureStore, NotMaterializedError
from ml_platform.serving.batch import read_predictions, read_scored_days, score_partition
from ml_platform.serving.scoring import LoadedModel, load_champion
from ml_platform.serving.spark_batch import read_spark_predictions, score_partition_spark

try:
    from fixtures_platform import tiny_platform
    from test_spark_features import spark
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import tiny_platform  # noqa: F401
    from ml_platform_tests.test_spark_features import spark  # noqa: F401


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def champion(tiny_platform):
    return load_champion(tiny_platform.registry)


@pytest.fixture(scope="module")
def last_day(tiny_platform):
    ts = pd.to_datetime(tiny_platform.events[fr.EVENT_TS], utc=True)
    return max(set(ts.dt.date))


@pytest.fixture(scope="module")
def reference(tiny_platform, champion, last_day, tmp_path_factory):
    """The platform's batch path on the day: score_partition into a fresh predictions database."""
    db = tmp_path_factory.mktemp("batch") / "predictions.duckdb"
    score_partition(tiny_platform.store, champion, last_day, db, chunk_rows=100)
    return by_id(read_predictions(db, last_day))


def by_id(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("transaction_id").reset_index(drop=True)


@pytest.fixture(scope="module")
def spark_scored(spark, tiny_platform, champion, last_day, tmp_path_factory):
    """The same day scored on Spark: Parquet output and the day published into a predictions DB."""
    root = tmp_path_factory.mktemp("spark_batch")
    out, db = root / "spark_predictions", root / "spark.duckdb"
    result = score_partition_spark(
        spark, tiny_platform.store, champion, last_day, output_dir=out, duckdb_path=db
    )
    return result, out, db


def test_spark_scores_equal_score_partition(spark_scored, champion, last_day, reference):
    result, out, db = spark_scored
    written = by_id(read_spark_predictions(out))
    published = by_id(read_predictions(db, last_day))

    assert len(reference) > 200 and result["rows"] == len(reference)
    for got in (written, published):
        assert list(got.columns) == list(reference.columns)
        assert got["transaction_id"].tolist() == reference["transaction_id"].tolist()
        # Same features looked up, same assembly, same model: the very same floats, not close ones.
        np.testing.assert_array_equal(got["score"].to_numpy(), reference["score"].to_numpy())
        assert got["decision"].tolist() == reference["decision"].tolist()
        for column in ("user_id", "merchant_id", fr.EVENT_TS, "model_version", "day"):
            assert got[column].tolist() == reference[column].tolist(), column
        assert got["scored_at"].nunique() == 1
    assert result["positives_flagged"] == int(reference["decision"].sum())
    assert result["model_version"] == champion.version == 2
    days = read_scored_days(db)
    assert days["rows"].tolist() == [len(reference)] and days["model_version"].tolist() == [2]
    # The scores depend on the looked-up features: the day is not scored as if it had no history.
    assert reference["score"].nunique() > len(reference) // 2


def test_a_model_with_another_contract_reads_its_own_features(spark, tiny_platform, last_day, tmp_path):
    """v1 reads only the card holder's views (and the raw user_profile source): its own lookups."""
    model, contract = tiny_platform.registry.load_model(1)
    v1 = LoadedModel(version=1, model=model, contract=contract)
    db = tmp_path / "p.duckdb"
    score_partition(tiny_platform.store, v1, last_day, db, chunk_rows=10_000)
    want = by_id(read_predictions(db, last_day))
    score_partition_spark(spark, tiny_platform.store, v1, last_day, output_dir=tmp_path / "out")
    got = by_id(read_spark_predictions(tmp_path / "out"))
    np.testing.assert_array_equal(got["score"].to_numpy(), want["score"].to_numpy())
    assert (got["model_version"] == 1).all()


def test_rescoring_replaces_the_output_and_a_missing_day_or_table_is_named(
    spark, spark_scored, tiny_platform, champion, last_day, tmp_path
):
    first, out, _ = spark_scored
    second = score_partition_spark(spark, tiny_platform.store, champion, last_day, output_dir=out)
    assert len(read_spark_predictions(out)) == first["rows"] == second["rows"]  # replaced, not appended
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == [".spark.duckdb.staging", "spark.duckdb", "spark_predictions"]  # no scratch folder left
    assert not list((out.parent / ".spark.duckdb.staging").iterdir())  # the staged DuckDB file removed
    with pytest.raises(FileNotFoundError, match="no raw transactions for 1999-01-01"):
        score_partition_spark(spark, tiny_platform.store, champion, "1999-01-01", output_dir=out)
    # A store whose aggregated tables were never materialized: the store's own error, by view name.
    bare = FeatureStore(tmp_path / "bare")
    bare.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    (tmp_path / "bare" / fr.TRANSACTIONS_PATH).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "bare" / fr.TRANSACTIONS_PATH).symlink_to(
        tiny_platform.store.repo_path / fr.TRANSACTIONS_PATH
    )
    with pytest.raises(NotMaterializedError, match="user_transaction_stats"):
        score_partition_spark(spark, bare, champion, last_day, output_dir=tmp_path / "bare_out")
