"""Batch scoring: score every transaction of one day with a model version and publish the
predictions to a DuckDB table that applications read, replacing that day atomically.

How a day is scored (memory bounded, whatever the day's size; design and figures in docs/batch.md):

1. The day's raw events (<data_dir>/raw/transactions/date=YYYY-MM-DD/*.parquet) are read in place,
   each row numbered by file order (`batch_features.events_relation`).
2. Looked-up features: per feature view, the offline store's point-in-time join
   (`offline.point_in_time_sql`, the SQL `get_historical_features` runs for training sets) at
   `features.feature_lookup_time(event_timestamp)`, run once for the whole day inside a staging
   DuckDB file (which spills to disk past its memory limit), over the feature rows that can answer
   the day (`batch_features.stage_features`). Calling `get_historical_features` per chunk gives the
   same values but rescans every feature table per chunk: O(chunks x history).
3. Chunks of `chunk_rows` rows, events and features side by side in Arrow
   (`batch_features.chunk_reader`) -> `batch_columns.ChunkScorer`: the model matrix built
   column-wise and the trees in `batch_trees` (scikit-learn's scores bit for bit, on `threads`
   threads), checked against the reference path (`scoring.assemble_features` +
   `LoadedModel.predict_proba`) on the day's first rows; models it cannot serve take the
   reference path -> staged predictions.
4. The swap: ONE transaction on the predictions database deletes the day's rows and inserts the
   staged ones. A failure anywhere before the commit leaves the previous rows of the day intact;
   re-scoring a day replaces it (`predictions_db.swap_partition`).

5. The prediction log: each chunk's rows (with the model inputs as typed columns, latency = the
   chunk's scoring time per row) go to `<log dir>/source=batch/date=D/predictions.parquet`, one
   file per day built and written in a background thread while the next chunk scores, renamed
   into place after the swap committed: re-scoring a day replaces its file
   (`prediction_log.DayFileWriter`, `batch_columns.log_rows`).

The published tables, the swap and the readers are in `serving.predictions_db` (re-exported here).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import duckdb
import pyarrow.compute as pc

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.serving.batch_columns import ChunkScorer, log_rows, prediction_rows
from ml_platform.serving.batch_features import chunk_reader, events_relation, stage_features
from ml_platform.serving.prediction_log import BATCH_FILE, DayFileWriter, batch_log_schema, day_dir
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
    log_dir_beside,
    partition_record,
    read_predictions,
    read_scored_days,
    swap_partition,
)
from ml_platform.serving.scoring import LoadedModel

__all__ = [
    "PARTITIONS_TABLE",
    "PARTITION_COLUMNS",
    "PREDICTIONS_SCHEMA",
    "PREDICTIONS_TABLE",
    "PREDICTION_COLUMNS",
    "TRANSACTION_ID",
    "PredictionsLockedError",
    "peak_rss_mb",
    "raw_partition_files",
    "read_predictions",
    "read_scored_days",
    "reset_peak_rss",
    "score_partition",
]

DEFAULT_MEMORY_LIMIT = "2GB"  # DuckDB's budget for the staging work when the store sets none
SCORING_MEMORY_LIMIT = "512MB"  # DuckDB's budget while it streams the staged chunks (bounds the peak RSS)
PATHS = ("auto", "reference")  # score_partition(path=...): the compiled path where it is exact, or not


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
    threads: int | None = None,
    path: str = "auto",
) -> dict[str, Any]:
    """Score every transaction of `day` with `loaded_model` and replace that day's rows of the
    predictions table in `duckdb_path` in one transaction, and the day's file of the prediction
    log under `log_dir` (default: `predictions_log` next to the database, the Settings layout).

    Returns metadata-ready values: rows, seconds, rows_per_s, peak_rss_mb (this process's peak
    resident memory during the call), cpu_s (its CPU seconds, all threads), table, positives_flagged, model_version, day, duckdb_path,
    log_path, scorer (how the model ran: "compiled+native", "compiled+sklearn" or
    "reference+sklearn") with scorer_reasons, and per-phase seconds (load_s, features_s, score_s,
    swap_s; features_by_view_s; their CPU seconds in cpu_by_phase_s). `memory_limit` bounds DuckDB (default: the store's duckdb_memory_limit, else 2GB);
    `chunk_rows` bounds the rows scored at once; `threads` the trees' threads (default: the
    store's duckdb_threads, else the CPUs this process may use); `path="reference"` scores with
    `assemble_features` + `LoadedModel.predict_proba` only. Raises FileNotFoundError if the day
    has no raw partition.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 (the trees' threads), got {threads}")
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    day = as_day(day)
    duckdb_path = Path(duckdb_path).expanduser().resolve()
    files = raw_partition_files(store, day)
    started, cpu_started = time.perf_counter(), time.process_time()
    reset_peak_rss()
    scored_at = datetime.now(UTC)
    contract = loaded_model.contract
    if threads is None:
        threads = getattr(store, "duckdb_threads", None) or len(os.sched_getaffinity(0))
    scorer = ChunkScorer(loaded_model, threads=threads, path=path)
    staging_dir = duckdb_path.parent / f".{duckdb_path.name}.staging"
    staging_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(staging_dir)
    staging = staging_dir / f"{day.isoformat()}-{uuid.uuid4().hex[:12]}.duckdb"
    columns_dir = staging_dir / f"{staging.stem}.columns"  # the by-number views' answers
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # the same phases' CPU seconds (all threads of the process)
    if log_dir is None:
        log_dir = log_dir_beside(duckdb_path)
    log = DayFileWriter(day_dir(log_dir, "batch", day) / BATCH_FILE, batch_log_schema(contract))
    try:
        with contextlib.closing(_staging_connection(store, staging, memory_limit)) as con:
            t, c = time.perf_counter(), time.process_time()
            events_sql, rows, event_columns = events_relation(con, files, contract.request_columns)
            timings["load_s"] = time.perf_counter() - t
            cpu["load_s"] = time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            staged = stage_features(con, store, contract.feature_refs, events_sql, columns_dir)
            timings["features_s"] = time.perf_counter() - t
            cpu["features_s"] = time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            # the staged predictions are read once, by the swap: stored uncompressed (DuckDB's
            # compression of a 10M-row day is ~2 CPU s; the staging file is ~0.6 GB instead of 0.2)
            con.execute("SET force_compression = 'uncompressed'")
            con.execute(f"CREATE TABLE {PREDICTIONS_TABLE} ({columns_sql(PREDICTION_COLUMNS)})")
            # the joins are done: the scoring's chunks, not DuckDB's cache, get the memory from here on
            _lower_memory_limit(con, SCORING_MEMORY_LIMIT)
            flagged = scored_rows = 0
            chunks = chunk_reader(con, events_sql, event_columns, staged, chunk_rows)
            # DuckDB reads the next chunk and stages the last one's rows while this thread scores
            with contextlib.closing(con.cursor()) as writer, _Background() as staging_rows:
                for batch in _prefetched(chunks):
                    scored = scorer.score(batch)
                    predictions = prediction_rows(loaded_model, batch, scored.scores, day, scored_at)
                    # the chunk's log rows are built and written in the log's thread while the next chunk scores
                    log.write_built(
                        log_rows,
                        loaded_model,
                        scorer.name,
                        predictions,
                        batch,
                        scored.inputs,
                        scored_at,
                        scored.latency_ms,
                    )
                    flagged += int(pc.sum(predictions.column("decision")).as_py() or 0)
                    scored_rows += predictions.num_rows
                    staging_rows.submit(_insert_predictions, writer, predictions)
            if scored_rows != rows:
                raise RuntimeError(
                    f"scored {scored_rows} of the day's {rows} events; this is a bug in batch scoring"
                )
            timings["score_s"] = time.perf_counter() - t
            cpu["score_s"] = time.process_time() - c
            con.execute("CHECKPOINT")
        seconds_before_swap = time.perf_counter() - started
        t, c = time.perf_counter(), time.process_time()
        record = partition_record(day, rows, flagged, loaded_model, scored_at, seconds_before_swap)
        # The log file after the commit (it never shows rows that were not published) and before the
        # database is let go (another run's swap of the day cannot come in between).
        log_path = swap_partition(duckdb_path, staging, record, lock_timeout_s,
                                  after_commit=lambda: _commit_day_log(log))
        timings["swap_s"] = time.perf_counter() - t
        cpu["swap_s"] = time.process_time() - c
    finally:
        log.discard()  # (after a commit: nothing left to discard)
        for leftover in (staging, staging.with_name(staging.name + ".wal")):
            leftover.unlink(missing_ok=True)
        shutil.rmtree(staging_dir / f"{staging.stem}.tmp", ignore_errors=True)
        shutil.rmtree(columns_dir, ignore_errors=True)
    seconds = time.perf_counter() - started
    return {
        "day": day.isoformat(),
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
        "cpu_s": round(time.process_time() - cpu_started, 3),  # this process's CPU time, every thread
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "table": PREDICTIONS_TABLE,
        "duckdb_path": str(duckdb_path),
        "log_path": str(log_path),
        "positives_flagged": flagged,
        "model_version": int(loaded_model.version),
        "decision_threshold": float(contract.decision_threshold),
        "scorer": scorer.name,
        "scorer_reasons": list(scorer.reasons),
        "threads": int(threads),
        "features_by_view_s": {v.view: round(v.seconds, 3) for v in staged},
        "cpu_by_phase_s": {k: round(v, 3) for k, v in cpu.items()},
        **{k: round(v, 3) for k, v in timings.items()},
    }

def _commit_day_log(log: DayFileWriter) -> Path:
    """The day's log file put in place as the folder's only file: another scorer's files of the
    day (a Spark run's parts, `spark_batch_output.write_log`) are removed after it (a reader in
    between sees the day's transactions twice; monitoring's reader keeps one row per transaction)."""
    path = log.commit()
    for other in path.parent.glob("*.parquet"):
        if other != path:
            other.unlink(missing_ok=True)
    return path


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


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark, so peak_rss_mb() measures this call (Linux only)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


# --------------------------------------------------------------------------- staging


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


_UNITS = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _memory_limit_bytes(con) -> float:
    """The connection's memory_limit in bytes (DuckDB reports it as e.g. '1.8 GiB')."""
    value, unit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0].split()
    return float(value) * _UNITS[unit]


def _lower_memory_limit(con, limit: str) -> None:
    """Set DuckDB's memory_limit to `limit` unless it is already lower."""
    before = _memory_limit_bytes(con)
    con.execute(f"SET memory_limit = {offline.quote_literal(limit)}")
    if _memory_limit_bytes(con) > before:
        con.execute(f"SET memory_limit = '{int(before)}B'")


def _insert_predictions(con, predictions) -> None:
    con.register("chunk_predictions", predictions)
    try:
        con.execute(f"INSERT INTO {PREDICTIONS_TABLE} SELECT * FROM chunk_predictions")
    finally:
        con.unregister("chunk_predictions")


class _Background:
    """One task at a time in a worker thread: `submit` waits for the previous task first (so one
    chunk is in flight) and raises its error; leaving the block waits for the last one."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-stage")
        self._pending: Future | None = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, tb) -> None:
        try:
            if kind is None:
                self.wait()
            elif self._pending is not None:
                with contextlib.suppress(BaseException):
                    self._pending.result()
        finally:
            self._pool.shutdown()


def _prefetched(items: Iterator) -> Iterator:
    """`items`, each produced in a worker thread while the caller works on the previous one."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-read") as pool:
        it = iter(items)
        sentinel = object()
        ahead = [pool.submit(next, it, sentinel) for _ in range(1)]
        try:
            while True:
                item = ahead.pop(0).result()
                if item is sentinel:
                    return
                ahead.append(pool.submit(next, it, sentinel))
                yield item
        finally:
            for f in ahead:
                f.cancel()
                with contextlib.suppress(BaseException):
                    f.result()


def _remove_stale_staging(staging_dir: Path, older_than: timedelta = timedelta(days=1)) -> None:
    """Delete staging files a killed run left behind (a live run finishes well within a day)."""
    cutoff = time.time() - older_than.total_seconds()
    for path in staging_dir.iterdir():
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
