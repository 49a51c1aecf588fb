"""Batch scoring: score every transaction of one day with a model version and publish the
predictions to a DuckDB table that applications read, replacing that day atomically.

How a day is scored (memory bounded, whatever the day's size):

1. The day's raw events (<data_dir>/raw/transactions/date=YYYY-MM-DD/*.parquet) are copied into
   a staging DuckDB file, each with a row number.
2. Looked-up features: per feature view, the offline store's point-in-time join
   (`offline.point_in_time_sql`, the SQL `get_historical_features` runs for training sets) at
   `features.feature_lookup_time(event_timestamp)`, run once for the whole day inside DuckDB
   (which spills to disk past its memory limit). Calling `get_historical_features` per chunk
   gives the same values but rescans every feature table per chunk: O(chunks x history).
3. Chunks of `chunk_rows` rows: events + features -> `scoring.assemble_features` (request-time
   features) -> `LoadedModel.predict_proba` (scikit-learn; for large batches it beats treelite's
   GTIL, see docs/batch.md) -> staged predictions.
4. The swap: ONE transaction on the predictions database deletes the day's rows and inserts the
   staged ones. A failure anywhere before the commit leaves the previous rows of the day intact;
   re-scoring a day replaces it (`predictions_db.swap_partition`).

5. The prediction log: each chunk's rows (with the model inputs as typed columns, latency = the
   chunk's scoring time per row) go to `<log dir>/source=batch/date=D/predictions.parquet`, one
   file per day built and written in a background thread while the next chunk scores, renamed
   into place after the swap committed: re-scoring a day replaces its file
   (`prediction_log.DayFileWriter`, `prediction_log.batch_log_rows`).

The published tables, the swap and the readers are in `serving.predictions_db` (re-exported here).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.featurestore.definitions import parse_feature_ref
from ml_platform.serving.prediction_log import (
    BATCH_FILE,
    DayFileWriter,
    batch_log_rows,
    batch_log_schema,
    day_dir,
)
from ml_platform.serving.predictions_db import (  # re-exported: the published table's API
    PARTITION_COLUMNS,
    PARTITIONS_TABLE,
    PREDICTION_COLUMNS,
    PREDICTIONS_SCHEMA,
    PREDICTIONS_TABLE,
    TRANSACTION_ID,
    PredictionsLockedError,
    as_day,
    columns_sql,
    read_predictions,
    read_scored_days,
    swap_partition,
)
from ml_platform.serving.scoring import LoadedModel, assemble_features
from ml_platform.settings import Settings
from ml_platform.timestamps import to_us

__all__ = [
    "PARTITIONS_TABLE",
    "PARTITION_COLUMNS",
    "PREDICTIONS_SCHEMA",
    "PREDICTIONS_TABLE",
    "PREDICTION_COLUMNS",
    "PredictionsLockedError",
    "peak_rss_mb",
    "raw_partition_files",
    "read_predictions",
    "read_scored_days",
    "reset_peak_rss",
    "score_partition",
]

DEFAULT_MEMORY_LIMIT = "2GB"  # DuckDB's budget for the staging work when the store sets none

_EVENTS = "day_events"
_ROW = "__row"
_ENTITY_TABLE = offline.ENTITY_TABLE  # the entity-rows relation point_in_time_sql joins from
_ENTITY_ROW_ID = offline.ROW_ID
_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}


# --------------------------------------------------------------------------- public API


def score_partition(
    store,
    loaded_model: LoadedModel,
    day: date | str,
    duckdb_path: str | os.PathLike,
    chunk_rows: int = 200_000,
    *,
    memory_limit: str | None = None,
    lock_timeout_s: float = 120.0,
    log_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Score every transaction of `day` with `loaded_model` and replace that day's rows of the
    predictions table in `duckdb_path` in one transaction, and the day's file of the prediction
    log under `log_dir` (default: `predictions_log` next to the database, the Settings layout).

    Returns metadata-ready values: rows, seconds, rows_per_s, peak_rss_mb (this process's peak
    resident memory during the call), table, positives_flagged, model_version, day, duckdb_path,
    log_path, and per-phase seconds (load_s, features_s, score_s, swap_s). `memory_limit` bounds
    DuckDB (default: the store's duckdb_memory_limit, else 2GB); `chunk_rows` bounds the rows
    scored at once. Raises FileNotFoundError if the day has no raw partition.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    day = as_day(day)
    duckdb_path = Path(duckdb_path).expanduser().resolve()
    files = raw_partition_files(store, day)
    started = time.perf_counter()
    reset_peak_rss()
    scored_at = datetime.now(UTC)
    contract = loaded_model.contract
    staging_dir = duckdb_path.parent / f".{duckdb_path.name}.staging"
    staging_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(staging_dir)
    staging = staging_dir / f"{day.isoformat()}-{uuid.uuid4().hex[:12]}.duckdb"
    timings: dict[str, float] = {}
    if log_dir is None:
        log_dir = Settings.model_construct(data_dir=duckdb_path.parent).predictions_log_dir
    log = DayFileWriter(day_dir(log_dir, "batch", day) / BATCH_FILE, batch_log_schema(contract))
    try:
        with contextlib.closing(_staging_connection(store, staging, memory_limit)) as con:
            t = time.perf_counter()
            rows = _load_events(con, files, contract.request_columns)
            timings["load_s"] = time.perf_counter() - t
            t = time.perf_counter()
            looked_up_tables = _stage_point_in_time_features(con, store, contract.feature_refs)
            timings["features_s"] = time.perf_counter() - t
            t = time.perf_counter()
            con.execute(f"CREATE TABLE {PREDICTIONS_TABLE} ({columns_sql(PREDICTION_COLUMNS)})")
            flagged = 0
            for events, looked_up in _chunks(con, looked_up_tables, rows, chunk_rows):
                predictions, frame, latency_ms = _score_chunk(loaded_model, events, looked_up, day, scored_at)
                # the chunk's log rows are built and written in the writer's thread while the next chunk scores
                log.write_built(batch_log_rows, loaded_model, predictions, events, frame, scored_at, latency_ms)
                flagged += int(pc.sum(predictions.column("decision")).as_py() or 0)
                con.register("chunk_predictions", predictions)
                con.execute(f"INSERT INTO {PREDICTIONS_TABLE} SELECT * FROM chunk_predictions")
                con.unregister("chunk_predictions")
            timings["score_s"] = time.perf_counter() - t
            con.execute("CHECKPOINT")
        seconds_before_swap = time.perf_counter() - started
        t = time.perf_counter()
        record = {
            "day": day,
            "rows": rows,
            "positives_flagged": flagged,
            "model_version": int(loaded_model.version),
            "decision_threshold": float(contract.decision_threshold),
            "scored_at": scored_at,
            "seconds": round(seconds_before_swap, 3),
        }
        # The log file after the commit (it never shows rows that were not published) and before the
        # database is let go (another run's swap of the day cannot come in between).
        log_path = swap_partition(duckdb_path, staging, record, lock_timeout_s, after_commit=log.commit)
        timings["swap_s"] = time.perf_counter() - t
    finally:
        log.discard()  # (after a commit: nothing left to discard)
        for leftover in (staging, staging.with_name(staging.name + ".wal")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(staging_dir / f"{staging.stem}.tmp", ignore_errors=True)
    seconds = time.perf_counter() - started
    return {
        "day": day.isoformat(),
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "table": PREDICTIONS_TABLE,
        "duckdb_path": str(duckdb_path),
        "log_path": str(log_path),
        "positives_flagged": flagged,
        "model_version": int(loaded_model.version),
        "decision_threshold": float(contract.decision_threshold),
        **{k: round(v, 3) for k, v in timings.items()},
    }


def raw_partition_files(store, day: date | str) -> list[Path]:
    """The Parquet files of `day`'s raw transaction partition (FileNotFoundError if none)."""
    day = as_day(day)
    folder = store.repo_path / fr.TRANSACTIONS_PATH / f"date={day.isoformat()}"
    files = sorted(folder.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no raw transactions for {day} at {folder}: ingest that day first (the raw_transactions "
            "asset, or ml_platform.sources.generator.write_day)"
        )
    return files


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB) since the last reset (Linux VmHWM), else ever."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- staging


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark, so peak_rss_mb() measures this call (Linux only)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _staging_connection(store, path: Path, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(str(path))
    con.execute("SET TimeZone = 'UTC'")
    limit = memory_limit or getattr(store, "duckdb_memory_limit", None) or DEFAULT_MEMORY_LIMIT
    con.execute(f"SET memory_limit = {offline.quote_literal(str(limit))}")
    threads = getattr(store, "duckdb_threads", None)
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    tmp = path.with_name(f"{path.stem}.tmp")
    con.execute(f"SET temp_directory = {offline.quote_literal(str(tmp))}")
    return con


def _remove_stale_staging(staging_dir: Path, older_than: timedelta = timedelta(days=1)) -> None:
    """Delete staging files a killed run left behind (a live run finishes well within a day)."""
    cutoff = time.time() - older_than.total_seconds()
    for path in staging_dir.iterdir():
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _load_events(con, files: list[Path], request_columns: Sequence[str]) -> int:
    """Copy the day's events into the staging table, numbered 0..n-1 in file order."""
    needed = list(dict.fromkeys([TRANSACTION_ID, "user_id", "merchant_id", *request_columns, fr.EVENT_TS]))
    paths = [str(f) for f in files]
    scan = f"read_parquet([{', '.join(offline.quote_literal(p) for p in paths)}], filename = true, file_row_number = true)"
    available = offline.relation_columns(con, scan, what=f"raw transactions {files[0].parent}")
    offline.require_columns(
        available,
        needed,
        what=f"raw transactions {files[0].parent}",
        hint="The raw data contract is documented in ml_platform/sources.",
    )
    # Row number = rows of the files before + row number within the file: no sort, no window.
    bases, total = [], 0
    for path in paths:
        bases.append(f"WHEN {offline.quote_literal(path)} THEN {total}")
        total += pq.ParquetFile(path).metadata.num_rows
    base = f"CASE filename {' '.join(bases)} END"
    cols = ", ".join(offline.quote_identifier(c) for c in needed)
    con.execute(f"CREATE TABLE {_EVENTS} AS SELECT {base} + file_row_number AS {_ROW}, {cols} FROM {scan}")
    required = [TRANSACTION_ID, "user_id", "merchant_id", fr.EVENT_TS]
    checks = ", ".join(f"count(*) FILTER (WHERE {offline.quote_identifier(c)} IS NULL)" for c in required)
    nulls = dict(zip(required, con.execute(f"SELECT {checks} FROM {_EVENTS}").fetchall()[0]))
    bad = {c: n for c, n in nulls.items() if n}
    if bad:
        raise ValueError(
            f"raw transactions {files[0].parent} have NULLs in required columns {bad} (column: rows); "
            "fix the partition (the validation asset names the rows) and score again"
        )
    return total


def _stage_point_in_time_features(con, store, feature_refs: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Run the offline point-in-time join for every event of the day, one feature view at a time,
    into staging tables ordered by row. Returns [(table, feature columns), ...]."""
    by_view: dict[str, list[str]] = {}
    for ref in feature_refs:
        view_name, feature = parse_feature_ref(ref)
        by_view.setdefault(view_name, []).append(feature)
    if not by_view:
        return []
    views = [store.get_feature_view(name) for name in by_view]
    for view, features in zip(views, by_view.values()):
        unknown = [f for f in features if f not in view.feature_names]
        if unknown:
            raise ValueError(
                f"the model reads {unknown} from feature view {view.name!r}, which has {view.feature_names}; "
                "the model was trained on another definition of the view: retrain or restore the view"
            )
    keys = list(dict.fromkeys(k for v in views for k in v.join_keys))
    lookup_ts = f"CAST({fr.EVENT_TS} AS TIMESTAMPTZ) - {offline.interval_sql(fr.FEATURE_LOOKUP_OFFSET)}"
    con.execute(
        f"CREATE TEMP VIEW {_ENTITY_TABLE} AS SELECT {_ROW} AS {_ENTITY_ROW_ID}, "
        f"{', '.join(offline.quote_identifier(k) for k in keys)}, {lookup_ts} AS {offline.ENTITY_TS} FROM {_EVENTS}"
    )
    staged = []
    for i, (view, features) in enumerate(zip(views, by_view.values())):
        # The store's own normalized view of the feature table (checks it is materialized and
        # computed from the current definition), joined with the training-set SQL.
        table = store.feature_table(con, view)
        sql = offline.point_in_time_sql(table, [(f, f) for f in features])
        name = f"features_{i}"
        try:
            con.execute(f"CREATE TABLE {name} AS SELECT * FROM ({sql}) ORDER BY {_ENTITY_ROW_ID}")
        except duckdb.Error as exc:
            raise RuntimeError(f"point-in-time join for feature view {view.name!r} failed: {exc}") from exc
        staged.append((name, features))
    return staged


def _chunks(con, feature_tables, rows: int, chunk_rows: int) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """(events, looked-up features) for consecutive row ranges, both in row order."""
    for lo in range(0, rows, chunk_rows):
        params = {"lo": lo, "hi": lo + chunk_rows}
        events = con.sql(
            f"SELECT * FROM {_EVENTS} WHERE {_ROW} >= $lo AND {_ROW} < $hi ORDER BY {_ROW}", params=params
        ).to_arrow_table()
        row_ids = events.column(_ROW)
        columns: dict[str, pa.ChunkedArray] = {}
        for name, features in feature_tables:
            part = con.sql(
                f"SELECT * FROM {name} WHERE {_ENTITY_ROW_ID} >= $lo AND {_ENTITY_ROW_ID} < $hi "
                f"ORDER BY {_ENTITY_ROW_ID}",
                params=params,
            ).to_arrow_table()
            if not part.column(_ENTITY_ROW_ID).equals(row_ids):
                raise RuntimeError(
                    f"staged features {name} do not line up with the events of rows {lo}..{lo + chunk_rows}; "
                    "this is a bug in batch scoring"
                )
            for f in features:
                columns[f] = part.column(f)
        looked_up = pa.table(columns).to_pandas(types_mapper=_NULLABLE.get)
        yield events.drop_columns([_ROW]).to_pandas(), looked_up


def _score_chunk(
    loaded_model: LoadedModel, events: pd.DataFrame, looked_up: pd.DataFrame, day: date, scored_at: datetime
) -> tuple[pa.Table, pd.DataFrame, float]:
    """A chunk's rows of the predictions table, the frame it was scored from (assemble_features'),
    and its scoring time per row in ms (request features + model: the log's `latency_ms`)."""
    started = time.perf_counter()
    frame = assemble_features(events, looked_up)
    scores = np.asarray(loaded_model.predict_proba(frame), dtype=np.float64)
    if len(scores) != len(events):
        raise RuntimeError(
            f"model v{loaded_model.version} returned {len(scores)} scores for {len(events)} rows"
        )
    latency_ms = (time.perf_counter() - started) * 1000.0 / max(len(events), 1)
    n = len(events)
    decisions = np.asarray(loaded_model.decide(scores), dtype=bool)
    predictions = pa.table(
        {
            TRANSACTION_ID: pa.array(events[TRANSACTION_ID], pa.string()),
            "user_id": pa.array(events["user_id"], pa.int64()),
            "merchant_id": pa.array(events["merchant_id"], pa.int64()),
            fr.EVENT_TS: pa.array(frame[fr.EVENT_TS], pa.timestamp("us", tz="UTC")),
            "score": pa.array(scores),
            "decision": pa.array(decisions),
            "model_version": pa.array(np.full(n, int(loaded_model.version), dtype=np.int32)),
            "scored_at": pa.array(np.full(n, to_us(scored_at), dtype=np.int64), pa.timestamp("us", tz="UTC")),
            "day": pa.array(np.full(n, np.datetime64(day.isoformat(), "D"))).cast(pa.date32()),
        },
        schema=PREDICTIONS_SCHEMA,
    )
    return predictions, frame, latency_ms
