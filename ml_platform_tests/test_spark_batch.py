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
def reference_db(tiny_platform, champion, last_day, tmp_path_factory):
    """The platform's batch path on the day: score_partition into a fresh predictions database
    (and its prediction log, next to it)."""
    db = tmp_path_factory.mktemp("batch") / "predictions.duckdb"
    score_partition(tiny_platform.store, champion, last_day, db, chunk_rows=100)
    return db


@pytest.fixture(scope="module")
def reference(reference_db, last_day):
    return by_id(read_predictions(reference_db, last_day))


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


def test_the_spark_day_is_in_the_prediction_log_as_the_platform_path_logs_it(spark_scored, reference_db, last_day):
    """Monitoring reads the log: a day scored on Spark is logged with the same rows, scores,
    decisions and model inputs as `score_partition` logs it."""
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    result, _, db = spark_scored

    def logged(log_dir):
        frame = read_prediction_log(log_dir, start=last_day, end=last_day, sources=["batch"])
        return frame.sort_values("transaction_id").reset_index(drop=True)

    ours, theirs = logged(db.parent / "predictions_log"), logged(reference_db.parent / "predictions_log")
    assert result["log_path"] == str(db.parent / "predictions_log" / "source=batch" / f"date={last_day}")
    assert len(ours) == len(theirs) == result["rows"] > 200
    assert list(ours.columns) == list(theirs.columns)
    inputs = [c for c in theirs.columns if c.startswith("feature.")]
    assert len(inputs) > 10 and theirs[inputs].notna().to_numpy().any()
    run_specific = {"predicted_at", "latency_ms", "scorer"}  # when and how fast each path ran
    for column in [c for c in theirs.columns if c not in run_specific]:
        pd.testing.assert_series_equal(ours[column], theirs[column], check_dtype=False, check_exact=True,
                                       obj=column)
    published = read_predictions(db, last_day)
    assert set(ours["predicted_at"]) == set(published["scored_at"])  # one time: the run's


def test_a_day_scored_again_by_either_path_keeps_one_scorers_log_rows(spark, tiny_platform, champion, last_day, tmp_path):
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    log_dir = tmp_path / "log"
    folder = log_dir / "source=batch" / f"date={last_day}"

    def logged() -> pd.DataFrame:
        return read_prediction_log(log_dir, start=last_day, end=last_day, sources=["batch"])

    spark_day = score_partition_spark(spark, tiny_platform.store, champion, last_day, output_dir=tmp_path / "out",
                                      log_dir=log_dir)
    assert len(logged()) == spark_day["rows"] and all(p.name.startswith("part-") for p in folder.glob("*.parquet"))
    score_partition(tiny_platform.store, champion, last_day, tmp_path / "p.duckdb", log_dir=log_dir)
    assert [p.name for p in folder.glob("*.parquet")] == ["predictions.parquet"]  # Spark's parts removed
    assert len(logged()) == spark_day["rows"] and logged()["transaction_id"].is_unique
    score_partition_spark(spark, tiny_platform.store, champion, last_day, output_dir=tmp_path / "out", log_dir=log_dir)
    assert not (folder / "predictions.parquet").exists() and len(logged()) == spark_day["rows"]


def test_the_platforms_batch_asset_scores_on_spark_when_the_setting_says_so(spark, tiny_platform, last_day, reference):
    """ML_PLATFORM_BATCH_ENGINE=spark is all a deployment changes: `batch_predictions`, with the
    platform's resources, scores the day on the `spark` resource's session into the predictions
    database and the prediction log, with score_partition's scores."""
    import dagster as dg

    from ml_platform.defs.assets import batch_predictions
    from ml_platform.defs.resources import default_resources
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    settings = tiny_platform.settings.model_copy(update={"batch_engine": "spark"})
    run = dg.materialize([batch_predictions], partition_key=last_day.isoformat(), resources=default_resources(settings))
    assert run.success
    (mat,) = run.asset_materializations_for_node("batch_predictions")
    assert mat.metadata["days"].value[last_day.isoformat()]["engine"] == "spark"
    published = by_id(read_predictions(settings.data_dir / "predictions.duckdb", last_day))
    np.testing.assert_array_equal(published["score"].to_numpy(), reference["score"].to_numpy())
    logged = read_prediction_log(settings.predictions_log_dir, start=last_day, end=last_day, sources=["batch"])
    assert sorted(logged["transaction_id"]) == reference["transaction_id"].tolist()
    with pytest.raises(ValueError, match=r"ML_PLATFORM_BATCH_ENGINE must be one of \['duckdb', 'spark'\], got 'ray'"):
        from ml_platform.settings import load_settings

        load_settings({"ML_PLATFORM_BATCH_ENGINE": "ray"})


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
    assert names == [".spark.duckdb.staging", "predictions_log", "spark.duckdb", "spark_predictions"]  # no scratch
    assert [p.name for p in (out.parent / "predictions_log" / "source=batch").iterdir()] == [f"date={last_day}"]
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
