"""Where a day scored on Spark lands (`spark_batch.score_partition_spark`), each write whole or not
at all:

- `write_predictions`: the predictions (PREDICTION_COLUMNS) as Parquet, into a scratch folder
  renamed over the output folder;
- `write_log`: the day's prediction log rows (`prediction_log.batch_log_schema`: what monitoring
  reads) into the log's `source=batch/date=D/` folder the same way: the folder is replaced as a
  whole, so a day scored again (on Spark or by `batch.score_partition`) leaves one scorer's rows;
- `publish`: the day's rows swapped into the predictions database in one transaction
  (`predictions_db.swap_partition`, as `batch.score_partition` does).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

import duckdb

from ml_platform.featurestore import offline
from ml_platform.serving.predictions_db import (
    PREDICTION_COLUMNS,
    PREDICTIONS_TABLE,
    columns_sql,
    swap_partition,
)


def write_predictions(predictions, output_dir: Path) -> tuple[int, int]:
    """Write the predictions over `output_dir`; (rows, rows flagged)."""
    replace_folder(predictions, output_dir)
    with contextlib.closing(offline.connect()) as con:
        rows, flagged = con.sql(
            f"SELECT count(*), count(*) FILTER (WHERE decision) FROM {offline.scan_sql(str(output_dir), what='Spark predictions')}"
        ).fetchall()[0]
    return int(rows), int(flagged)


def write_log(log_rows, folder: Path) -> Path:
    """Write the day's log rows over the log's day folder `folder`; the folder."""
    replace_folder(log_rows, folder)
    return folder


def replace_folder(frame, target: Path) -> None:
    """Write the Spark DataFrame `frame` as Parquet (zstd) to a scratch folder next to `target`, then
    rename it over `target` (a failed write leaves the previous folder as it was)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    old = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old")
    try:
        frame.write.mode("overwrite").option("compression", "zstd").parquet(str(scratch))
        if target.exists():
            os.replace(target, old)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def publish(duckdb_path: Path, output_dir: Path, record: dict, lock_timeout_s: float) -> None:
    """Replace the day's rows of the predictions database with those written to `output_dir` (one
    transaction); `record` is the day's `prediction_partitions` row."""
    staging_dir = duckdb_path.parent / f".{duckdb_path.name}.staging"
    staging_dir.mkdir(parents=True, exist_ok=True)
    staging = staging_dir / f"{record['day'].isoformat()}-spark-{uuid.uuid4().hex[:12]}.duckdb"
    try:
        with contextlib.closing(duckdb.connect(str(staging))) as con:
            con.execute("SET TimeZone = 'UTC'")
            con.execute(f"CREATE TABLE {PREDICTIONS_TABLE} ({columns_sql(PREDICTION_COLUMNS)})")
            cols = ", ".join(offline.quote_identifier(c) for c in PREDICTION_COLUMNS)
            scan = offline.scan_sql(str(output_dir), what="Spark predictions")
            con.execute(f"INSERT INTO {PREDICTIONS_TABLE} SELECT {cols} FROM {scan}")
            con.execute("CHECKPOINT")
        swap_partition(duckdb_path, staging, record, lock_timeout_s)
    finally:
        for leftover in (staging, staging.with_name(staging.name + ".wal")):
            leftover.unlink(missing_ok=True)
