"""Batch scoring of one day on Spark, for the day that does not fit one machine: the same
predictions as `serving.batch.score_partition`, computed from the same public pieces.

1. The day's raw events (`<repo>/raw/transactions/date=D/*.parquet`) are read by Spark, checked
   for NULLs in the required columns, numbered and kept (memory and disk) for the joins below.
2. Looked-up features, per feature view the model reads, with the offline store's point-in-time
   rule at `features.feature_lookup_time(event_timestamp)` (1 µs before the event): the latest
   feature row with the same keys and `lookup - ttl <= event_timestamp <= lookup`, equal times
   broken by the latest `created_timestamp` (a row without one loses), nothing -> NULL. On Spark
   this is one sort per view instead of DuckDB's ASOF JOIN: the view's feature rows and the
   day's events are unioned and ordered by (keys, time, feature rows before events at equal
   times, created time), and each event takes the last feature row before it (`last(...,
   ignorenulls)` over a running frame), then the ttl is applied. Feature rows that cannot match
   any event of the day (later than its last lookup, or older than its first lookup - ttl) are
   dropped first. The feature tables are the store's (`FeatureStore.feature_table` checks each
   is materialized from the current definition) or the view's raw source.
3. `mapInPandas` scores each Arrow batch: `scoring.assemble_features` (request-time features)
   -> `LoadedModel.predict_proba` -> `decide`, the model shipped to the Python workers; each
   batch comes out as the day's prediction log rows (`prediction_log.batch_log_rows`: the
   transaction, score, decision and the model's inputs), kept (memory and disk) for two writes.
4. The predictions (the columns of `predictions_db.PREDICTION_COLUMNS`, a projection of the log
   rows) are written as Parquet to `output_dir`, and the log rows to the prediction log's
   `source=batch/date=D/` folder, each a scratch folder renamed into place; with `duckdb_path`
   the predictions are also published into the predictions table by
   `predictions_db.swap_partition` (one transaction per day, as `score_partition` does). The
   writes are `spark_batch_output`'s.
"""

from __future__ import annotations

import contextlib
import os
import time
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.featurestore.definitions import FEATURE_LOOKUP_OFFSET, FeatureView, parse_feature_ref
from ml_platform.featurestore.spark_offline import prepare_session, read_parquet_source
from ml_platform.featurestore.spark_sql import SPARK_TYPES
from ml_platform.serving.prediction_log import DECISIONS, batch_log_rows, batch_log_schema, day_dir
from ml_platform.serving.predictions_db import (
    PREDICTION_COLUMNS,
    PREDICTIONS_TABLE,
    TRANSACTION_ID,
    as_day,
    log_dir_beside,
    partition_record,
)
from ml_platform.serving.scoring import LoadedModel, assemble_features
from ml_platform.serving.spark_batch_output import publish, write_log, write_predictions
from ml_platform.timestamps import span_us

SPARK_OUTPUT_DIR = "predictions_spark"  # default output: <repo>/predictions_spark/date=D/

_ROW = "__row"
_T = "__t_us"  # ordering time (µs): a feature row's event time, an event's lookup time
_KIND = "__kind"  # 0: feature row, 1: event (feature rows first at equal times)
_C = "__c_us"  # a feature row's created time (µs), the tie-break; NULL -> the smallest
_VALUE = "__value"
_MATCH = "__match"
_MATCH_TS = "__match_us"
_MIN_US, _MAX_US = -(2**63), 2**63 - 1
_REQUIRED = [TRANSACTION_ID, "user_id", "merchant_id", fr.EVENT_TS]


def score_partition_spark(
    spark,
    store,
    loaded_model: LoadedModel,
    day: date | str,
    *,
    output_dir: str | os.PathLike | None = None,
    duckdb_path: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    lock_timeout_s: float = 120.0,
) -> dict[str, Any]:
    """Score every transaction of `day` on `spark` with `loaded_model` (see the module doc).

    Writes the predictions as Parquet to `output_dir` (default <repo>/predictions_spark/date=D),
    replacing a previous run's; given `duckdb_path`, replaces the day's rows of that predictions
    database in one transaction; and writes the day's prediction log (`source=batch`) under
    `log_dir` (default with `duckdb_path`: the data directory's log, as `score_partition` does;
    without either, no log). Returns rows, seconds, rows_per_s, positives_flagged, model_version,
    decision_threshold, day, output_dir, duckdb_path, table, log_path. Raises FileNotFoundError if
    the day has no raw partition, ValueError for NULLs in a required column."""
    from pyspark import StorageLevel

    prepare_session(spark)
    day = as_day(day)
    started = time.perf_counter()
    scored_at = datetime.now(UTC)
    contract = loaded_model.contract
    output_dir = Path(output_dir or store.repo_path / SPARK_OUTPUT_DIR / f"date={day.isoformat()}")
    if log_dir is None and duckdb_path is not None:
        log_dir = log_dir_beside(duckdb_path)
    events = _day_events(spark, store, day, contract.request_columns).persist(StorageLevel.MEMORY_AND_DISK)
    scored = None
    try:
        looked_up = _point_in_time_features(spark, store, events, contract.feature_refs)
        event_columns = [c for c in events.columns if c != _ROW]
        feature_columns = [c for c in looked_up.columns if c != _ROW]
        joined = events.join(looked_up, on=_ROW, how="left")
        log_schema = batch_log_schema(contract)
        scored = joined.mapInPandas(
            _scorer(loaded_model, event_columns, feature_columns, scored_at), _spark_schema(log_schema)
        ).persist(StorageLevel.MEMORY_AND_DISK)  # written twice: the predictions, the log
        rows, flagged = write_predictions(_predictions(scored, day), output_dir)
        log_path = None if log_dir is None else write_log(scored, day_dir(log_dir, "batch", day))
    finally:
        if scored is not None:
            scored.unpersist()
        events.unpersist()
    if duckdb_path is not None:
        publish(
            Path(duckdb_path).expanduser().resolve(),
            output_dir,
            partition_record(day, rows, flagged, loaded_model, scored_at, time.perf_counter() - started),
            lock_timeout_s,
        )
    seconds = time.perf_counter() - started
    return {
        "day": day.isoformat(),
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "positives_flagged": flagged,
        "model_version": int(loaded_model.version),
        "decision_threshold": float(contract.decision_threshold),
        "output_dir": str(output_dir),
        "duckdb_path": None if duckdb_path is None else str(duckdb_path),
        "table": PREDICTIONS_TABLE,
        "log_path": None if log_path is None else str(log_path),
        "engine": "spark",
    }


def read_spark_predictions(output_dir: str | os.PathLike) -> pd.DataFrame:
    """The predictions `score_partition_spark` wrote to `output_dir`, as a DataFrame (the columns
    of PREDICTION_COLUMNS, tz-aware UTC times)."""
    with contextlib.closing(offline.connect()) as con:
        cols = ", ".join(offline.quote_identifier(c) for c in PREDICTION_COLUMNS)
        return con.sql(
            f"SELECT {cols} FROM {offline.scan_sql(str(output_dir), what='Spark predictions')}"
        ).df()


# --------------------------------------------------------------------------- events


def _day_events(spark, store, day: date, request_columns):
    from pyspark.sql import functions as F

    folder = Path(store.repo_path) / fr.TRANSACTIONS_PATH / f"date={day.isoformat()}"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no raw transactions for {day} at {folder}: ingest that day first (the raw_transactions "
            "asset, or ml_platform.sources.generator.write_day)"
        )
    needed = list(dict.fromkeys([*_REQUIRED, *request_columns]))
    frame = spark.read.parquet(*[str(f) for f in files])
    what = f"raw transactions {folder}"
    available = {f.name: f.dataType.simpleString() for f in frame.schema.fields}
    offline.require_columns(
        available, needed, what=what, hint="The raw data contract is documented in ml_platform/sources."
    )
    frame = frame.select(*needed)
    nulls = frame.select([F.sum(F.col(c).isNull().cast("long")).alias(c) for c in _REQUIRED]).first().asDict()
    bad = {c: int(n) for c, n in nulls.items() if n}
    if bad:
        raise ValueError(
            f"{what} have NULLs in required columns {bad} (column: rows); fix the partition (the "
            "validation asset names the rows) and score again"
        )
    return frame.withColumn(_ROW, F.monotonically_increasing_id())


# --------------------------------------------------------------------------- point in time


def _point_in_time_features(spark, store, events, feature_refs):
    """One frame: the event row number and every looked-up feature (NULL when nothing matches)."""
    from pyspark.sql import functions as F

    by_view: dict[str, list[str]] = {}
    for ref in feature_refs:
        view_name, feature = parse_feature_ref(ref)
        by_view.setdefault(view_name, []).append(feature)
    lookup = F.unix_micros(F.col(fr.EVENT_TS)) - F.lit(span_us(FEATURE_LOOKUP_OFFSET))
    lookups = events.select(
        _ROW, *{k for n in by_view for k in store.get_feature_view(n).join_keys}, lookup.alias(_T)
    )
    bounds = lookups.agg(F.min(_T), F.max(_T)).first()
    result = events.select(_ROW)
    for view_name, features in by_view.items():
        view = store.get_feature_view(view_name)
        unknown = [f for f in features if f not in view.feature_names]
        if unknown:
            raise ValueError(
                f"the model reads {unknown} from feature view {view.name!r}, which has {view.feature_names}; "
                "the model was trained on another definition of the view: retrain or restore the view"
            )
        table = _feature_rows(spark, store, view, features)
        answered = _as_of(table, lookups, view, features, bounds[0], bounds[1])
        result = result.join(answered, on=_ROW, how="left")
    return result


def _feature_rows(spark, store, view: FeatureView, features: list[str]):
    """The view's feature rows: keys, event_timestamp, created_timestamp, `features` (declared types).
    The store checks first that the table exists and is computed from the current definition."""
    from pyspark.sql import functions as F

    with contextlib.closing(offline.connect()) as con:
        store.feature_table(con, view)  # NotMaterializedError / missing columns, as the DuckDB path raises
    if view.aggregations:
        table = spark.read.parquet(str(store.offline_table_path(view.name)))
        created = F.col(offline.CREATED_TS)
    else:
        table = read_parquet_source(spark, view, store.repo_path)
        src = view.source
        table = table.withColumn(offline.FEATURE_TS, F.col(src.timestamp_field).cast("timestamp"))
        created = (
            F.col(src.created_timestamp_column).cast("timestamp")
            if src.created_timestamp_column
            else F.lit(None).cast("timestamp")
        )
    dtypes = {f.name: f.dtype for f in view.schema}
    return table.where(F.col(offline.FEATURE_TS).isNotNull()).select(
        *view.join_keys,
        F.col(offline.FEATURE_TS),
        created.alias(offline.CREATED_TS),
        *(F.col(f).cast(SPARK_TYPES[dtypes[f]]).alias(f) for f in features),
    )


def _as_of(table, lookups, view: FeatureView, features: list[str], lo_us, hi_us):
    """Per event row: the view's features at its lookup time (the offline store's rule)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    keys = list(view.join_keys)
    ttl_us = span_us(view.ttl) if view.ttl else None
    if lo_us is None:  # no events
        return lookups.select(_ROW, *(F.lit(None).alias(f) for f in features)).limit(0)
    # Feature rows no event of the day can match: later than the last lookup; older than the first
    # lookup - ttl (their value would be expired for every event of the day).
    keep = F.col(offline.FEATURE_TS) <= F.timestamp_micros(F.lit(int(hi_us)))
    if ttl_us is not None:
        keep = keep & (F.col(offline.FEATURE_TS) >= F.timestamp_micros(F.lit(int(lo_us - ttl_us))))
    feature_us = F.unix_micros(F.col(offline.FEATURE_TS))
    rows = table.where(keep & _all_not_null(keys)).select(
        *keys,
        F.lit(None).cast("long").alias(_ROW),
        feature_us.alias(_T),
        F.lit(0).alias(_KIND),
        F.coalesce(F.unix_micros(F.col(offline.CREATED_TS)), F.lit(_MIN_US)).alias(_C),
        F.struct(feature_us.alias(_MATCH_TS), *features).alias(_VALUE),
    )
    key_types = {f.name: f.dataType for f in rows.schema.fields if f.name in keys}
    value_type = rows.schema[_VALUE].dataType
    events = lookups.select(
        *(F.col(k).cast(key_types[k]).alias(k) for k in keys),
        F.col(_ROW),
        F.col(_T),
        F.lit(1).alias(_KIND),
        F.lit(_MAX_US).alias(_C),
        F.lit(None).cast(value_type).alias(_VALUE),
    )
    order = (
        Window.partitionBy(*keys)
        .orderBy(_T, _KIND, _C)
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    matched = (
        rows.unionByName(events)
        .withColumn(_MATCH, F.last(_VALUE, ignorenulls=True).over(order))
        .where(F.col(_KIND) == 1)
    )
    match = F.col(_MATCH)
    fresh = match[_MATCH_TS] >= F.col(_T) - F.lit(ttl_us) if ttl_us is not None else F.lit(True)
    return matched.select(_ROW, *(F.when(fresh, match[f]).alias(f) for f in features))


def _all_not_null(columns):
    from pyspark.sql import functions as F

    condition = F.lit(True)
    for c in columns:
        condition = condition & F.col(c).isNotNull()
    return condition


# --------------------------------------------------------------------------- scoring and output


def _scorer(loaded_model: LoadedModel, event_columns, feature_columns, scored_at: datetime):
    """The mapInPandas function: each batch of events + looked-up features -> the day's log rows
    (`prediction_log.batch_log_rows`: the transaction, the score and decision, the model's inputs;
    the predictions table's rows are a projection of them, `_predictions`)."""

    def score(batches):
        for batch in batches:
            started = time.perf_counter()
            events = batch[event_columns].reset_index(drop=True)
            looked_up = batch[feature_columns].reset_index(drop=True)
            frame = assemble_features(events, looked_up)
            scores = np.asarray(loaded_model.predict_proba(frame), dtype=np.float64)
            predictions = pa.table({
                TRANSACTION_ID: pa.array(events[TRANSACTION_ID].astype(object), pa.string()),
                fr.EVENT_TS: pa.array(frame[fr.EVENT_TS]),
                "score": scores,
                "decision": np.asarray(loaded_model.decide(scores), dtype=bool),
            })
            latency_ms = (time.perf_counter() - started) * 1000.0 / max(len(frame), 1)
            rows = batch_log_rows(loaded_model, predictions, events, frame, scored_at, latency_ms).to_pandas()
            for name, dtype in rows.dtypes.items():  # text as Python objects, as Spark converts them
                if not pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_datetime64_any_dtype(dtype):
                    rows[name] = rows[name].astype(object)
            yield rows

    return score


def _predictions(scored, day: date):
    """The predictions table's rows (PREDICTION_COLUMNS) of the day's log rows."""
    from pyspark.sql import functions as F

    return scored.select(
        F.col(TRANSACTION_ID),
        F.col("user_id"),
        F.col("merchant_id"),
        F.col(fr.EVENT_TS),
        F.col("probability").alias("score"),
        (F.col("decision") == F.lit(DECISIONS[0])).alias("decision"),
        F.col("model_version").cast("int").alias("model_version"),
        F.col("predicted_at").alias("scored_at"),
        F.lit(day).alias("day"),
    )


def _spark_schema(schema: pa.Schema):
    """The Spark StructType of an Arrow schema of the log's types (names kept as they are: the
    model inputs' `feature.<name>` hold a dot)."""
    from pyspark.sql import types as T

    kinds = {pa.string(): T.StringType(), pa.int64(): T.LongType(), pa.int32(): T.IntegerType(),
             pa.float64(): T.DoubleType(), pa.bool_(): T.BooleanType()}
    fields = []
    for f in schema:
        kind = T.TimestampType() if pa.types.is_timestamp(f.type) else kinds.get(f.type)
        if kind is None:
            raise TypeError(f"prediction log column {f.name!r} has type {f.type}, which the Spark path does not write")
        fields.append(T.StructField(f.name, kind, nullable=True))
    return T.StructType(fields)
