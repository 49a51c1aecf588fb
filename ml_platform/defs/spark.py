"""Dagster resource for the Spark engine: dagster-pyspark's resource, configured for the platform,
handing its session to the plain-Python engines.

    SparkResource()                                   # local[2], 1g driver, UTC, no web UI
    SparkResource(spark_config=spark_conf(master="spark://host:7077", driver_memory="8g",
                                          extra={"spark.executor.memory": "16g"}))

`offline_engine()` gives `featurestore.spark_offline.SparkOfflineEngine` (offline feature tables)
and `score_partition(...)` runs `serving.spark_batch.score_partition_spark` (a day of batch
scoring). The work is all in those modules; this file only builds the session from config.

It is dagster-pyspark's lazy variant (`LazyPySparkResource`, PySparkResource's sibling): the JVM
starts when a step first asks for the session, so an asset can declare the resource and still run
on DuckDB (ML_PLATFORM_OFFLINE_ENGINE=duckdb) without starting Spark.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
from dagster_pyspark import LazyPySparkResource

from ml_platform.featurestore.spark_offline import (
    SparkOfflineEngine,
    prepare_session,
    spark_conf,
    use_this_python,
)


class SparkResource(LazyPySparkResource):
    """A SparkSession from `spark_config` (default: `spark_offline.spark_conf()`, local[2]).

    Spark's Python workers are pointed at this interpreter when a step starts; the session is built
    on first use, and the SQL settings the compiled queries rely on (UTC session time, µs UTC
    Parquet timestamps) are set on it whatever the config says."""

    spark_config: dict[str, Any] = spark_conf()

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        use_this_python()

    @property
    def spark_session(self) -> Any:
        session = super().spark_session
        prepare_session(session)
        return session

    def offline_engine(self) -> SparkOfflineEngine:
        """The offline engine on this resource's session."""
        return SparkOfflineEngine(self.spark_session)

    def score_partition(self, store, loaded_model, day, **kwargs) -> dict:
        """`serving.spark_batch.score_partition_spark` on this resource's session."""
        from ml_platform.serving.spark_batch import score_partition_spark

        return score_partition_spark(self.spark_session, store, loaded_model, day, **kwargs)
