"""Offline materialization on Spark: the same FeatureView declarations, another engine.

`SparkOfflineEngine(spark).materialize_offline(store, view_name)` computes an aggregated view's
table with the Spark SQL `spark_sql.compile_spark_sql` compiles (the DuckDB query's template) and
writes it where `FeatureStore.materialize_offline` does: `<repo>/offline/<view>.parquet`, one
Parquet file with the view's fingerprint, so `get_historical_features`, batch scoring and the
online store read it as they read DuckDB's table.

How the table is written (atomically: a failed run leaves the previous table intact):
1. Spark reads the view's Parquet source (a file, a glob or a folder read recursively, like the
   DuckDB scan; hive folder names are not turned into columns) and writes the query's result as
   part files into a scratch folder next to the table;
2. DuckDB copies the part files into one temp file with the store's types and fingerprint
   (`offline.materialized_feature_table`'s casts: the file is DuckDB's own format byte for byte
   in its types), which is then renamed over the table. The scratch folder is always removed.

Engines are selected per store by name (`offline_engine("duckdb" | "spark", ...)`): both expose
`materialize_offline(store, view_name)` and `aggregation_sql(store, view_name)`. pyspark is
imported only when a Spark session is built, so this module loads without the `spark` extra.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ml_platform.atomic_files import write_atomic
from ml_platform.featurestore import offline
from ml_platform.featurestore.aggregation import source_columns
from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.spark_sql import SPARK_SESSION_CONF, compile_spark_sql
from ml_platform.featurestore.store import FINGERPRINT_KEY, FeatureStore, view_fingerprint
from ml_platform.settings import OFFLINE_ENGINES

ENGINES = OFFLINE_ENGINES
DEFAULT_MASTER = "local[2]"
DEFAULT_DRIVER_MEMORY = "1g"


# --------------------------------------------------------------------------- sessions


def spark_conf(
    master: str = DEFAULT_MASTER,
    driver_memory: str = DEFAULT_DRIVER_MEMORY,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The session configuration the platform uses: master, driver memory, the settings the
    compiled SQL relies on (`SPARK_SESSION_CONF`) and quiet local defaults (no web UI, few shuffle
    partitions for local mode), then `extra` (which wins)."""
    conf = {
        "spark.master": master,
        "spark.app.name": "ml_platform",
        "spark.driver.memory": driver_memory,
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "8" if master.startswith("local") else "200",
        **SPARK_SESSION_CONF,
    }
    conf.update({str(k): str(v) for k, v in (extra or {}).items()})
    return conf


def use_this_python() -> None:
    """Make Spark's Python workers run this interpreter (its venv, its pyarrow and model classes);
    by default pyspark starts `python3` from PATH. An explicit PYSPARK_PYTHON is kept."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)


def build_spark_session(conf: Mapping[str, str] | None = None):
    """A SparkSession from `conf` (default: `spark_conf()`), reusing a running one (Spark allows one
    per process). Outside Dagster; `defs/spark.py` builds it through dagster-pyspark's resource."""
    from pyspark.sql import SparkSession

    use_this_python()
    builder = SparkSession.builder
    for key, value in (conf or spark_conf()).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    prepare_session(spark)
    return spark


def prepare_session(spark) -> None:
    """Set the SQL settings the compiled queries rely on (UTC session time, µs UTC Parquet times)
    on a session built elsewhere; they are runtime settings, so an existing session takes them."""
    for key, value in SPARK_SESSION_CONF.items():
        spark.conf.set(key, value)


# --------------------------------------------------------------------------- engines


class OfflineEngine(Protocol):
    name: str

    def materialize_offline(self, store: FeatureStore, view_name: str) -> dict: ...

    def aggregation_sql(self, store: FeatureStore, view_name: str) -> str: ...


class DuckDBOfflineEngine:
    """The store's own engine (`FeatureStore.materialize_offline`), behind the engine interface."""

    name = "duckdb"

    def materialize_offline(self, store: FeatureStore, view_name: str) -> dict:
        return {**store.materialize_offline(view_name), "engine": self.name}

    def aggregation_sql(self, store: FeatureStore, view_name: str) -> str:
        return store.aggregation_sql(view_name)


class SparkOfflineEngine:
    """Materializes aggregated views on a SparkSession (local or a cluster); see the module doc."""

    name = "spark"

    def __init__(self, spark) -> None:
        prepare_session(spark)
        self.spark = spark

    def aggregation_sql(self, store: FeatureStore, view_name: str) -> str:
        """The Spark SQL of an aggregated view, over its source registered as the temp view `source_<view>`."""
        view = _aggregated_view(store, view_name)
        return compile_spark_sql(view, f"source_{view.name}")

    def materialize_offline(self, store: FeatureStore, view_name: str) -> dict:
        """Compute the view's table on Spark and write it atomically to offline/<view>.parquet.

        Returns {"rows", "path", "seconds", "engine", "mode", "spark_seconds", "write_seconds"}; raises
        RuntimeError("... previous table kept ...") when Spark or the copy fails."""
        view = _aggregated_view(store, view_name)
        started = time.perf_counter()
        target = store.offline_table_path(view_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        scratch = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.spark")
        temp_view = f"source_{view.name}_{uuid.uuid4().hex[:8]}"
        try:
            try:
                source = read_parquet_source(self.spark, view, store.repo_path)
                what = f"feature view {view.name!r} source {view.source.path!r}"
                available = {f.name: f.dataType.simpleString() for f in source.schema.fields}
                offline.require_columns(available, source_columns(view), what=what)
                source.createOrReplaceTempView(temp_view)
                result = self.spark.sql(compile_spark_sql(view, temp_view))
                result.write.mode("overwrite").option("compression", "snappy").parquet(str(scratch))
            except (ValueError, FileNotFoundError):  # our own errors, naming the view and the field
                raise
            except Exception as exc:  # py4j / pyspark errors: the previous table is untouched
                raise RuntimeError(
                    f"materialize_offline({view_name!r}) on Spark failed; previous table kept: {exc}"
                ) from exc
            finally:
                self.spark.catalog.dropTempView(temp_view)
            spark_done = time.perf_counter()
            rows = _copy_into_table(store, view, scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        done = time.perf_counter()
        return {
            "rows": rows,
            "path": str(target),
            "seconds": round(done - started, 3),
            "engine": self.name,
            "mode": "full",  # Spark always runs the whole query (incremental runs are DuckDB's)
            "spark_seconds": round(spark_done - started, 3),
            "write_seconds": round(done - spark_done, 3),
        }


def offline_engine(name: str, spark_session: Callable[[], Any] | None = None) -> OfflineEngine:
    """The engine called `name` ("duckdb" or "spark"); "spark" builds its session with
    `spark_session()` (e.g. the Dagster resource's, or `build_spark_session`)."""
    key = (name or "").strip().lower()
    if key == "duckdb":
        return DuckDBOfflineEngine()
    if key == "spark":
        return SparkOfflineEngine((spark_session or build_spark_session)())
    raise ValueError(f"offline engine {name!r} is not one of {list(ENGINES)} (ML_PLATFORM_OFFLINE_ENGINE)")


# --------------------------------------------------------------------------- pieces


def read_parquet_source(spark, view: FeatureView, repo_path: Path):
    """The view's Parquet source as a Spark DataFrame: a file, a glob, or a folder read
    recursively (hive `key=value` folder names are not added as columns, as in the DuckDB scan)."""
    src = view.source
    if src.file_format != "parquet":
        raise ValueError(
            f"feature view {view.name!r}: the Spark engine reads Parquet sources; source {src.path!r} has "
            f"file_format={src.file_format!r} (import it as Parquet, e.g. `ml_platform.sources.files`)"
        )
    path = offline.resolve_source_path(src, repo_path)
    if not any(ch in path for ch in "*?["):
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"feature view {view.name!r} source: path {path} does not exist")
        if p.is_dir() and not any(p.rglob("*.parquet")):
            raise FileNotFoundError(
                f"feature view {view.name!r} source: no .parquet files under directory {path}"
            )
    reader = spark.read.option("mergeSchema", "true")
    if Path(path).is_dir():
        reader = reader.option("recursiveFileLookup", "true").option("pathGlobFilter", "*.parquet")
    return reader.parquet(path)


def _aggregated_view(store: FeatureStore, view_name: str) -> FeatureView:
    view = store.get_feature_view(view_name)
    if not view.aggregations:
        raise ValueError(
            f"FeatureView {view_name!r} declares no aggregations: it is read from its source directly "
            "and needs no materialize_offline"
        )
    return view


def _copy_into_table(store: FeatureStore, view: FeatureView, scratch: Path, target: Path) -> int:
    """Copy Spark's part files into `target` (atomically) as one Parquet file in the store's
    layout: the store's normalized columns and types, zstd, the view's fingerprint (the options
    of `FeatureStore.materialize_offline`'s COPY)."""
    scan = offline.scan_sql(str(scratch), what=f"feature view {view.name!r} Spark output")
    table = offline.materialized_feature_table(view, scan)
    options = (
        f"FORMAT parquet, COMPRESSION zstd, KV_METADATA {{{FINGERPRINT_KEY}: '{view_fingerprint(view)}'}}"
    )
    copied: list[int] = []

    def write(tmp: Path) -> None:
        with store._connect() as con:  # the store's own DuckDB settings (threads, memory, temp dir)
            (row,) = con.execute(
                f"COPY {table.sql} TO {offline.quote_literal(str(tmp))} ({options})"
            ).fetchall()
            copied.append(row[0])

    try:
        write_atomic(target, write)
    except Exception as exc:
        raise RuntimeError(
            f"materialize_offline({view.name!r}) on Spark failed while writing {target}; previous table kept: {exc}"
        ) from exc
    return int(copied[0])
