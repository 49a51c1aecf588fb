"""The published predictions: the DuckDB tables batch scoring writes and applications read.

`predictions` holds one row per scored transaction, `prediction_partitions` one row per scored
day (which model, when, how many). `swap_partition` replaces one day in ONE transaction (all or
nothing). DuckDB allows one writer process per database file, and a process holding it open
read-write keeps other processes out, so the database is opened only for the swap (seconds) and
readers use short-lived read-only connections (`read_predictions`, `read_scored_days`), retried
while a swap holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.sources.raw_events import parse_date

PREDICTIONS_TABLE = "predictions"
PARTITIONS_TABLE = "prediction_partitions"  # one row per scored day: which model, when, how many
TRANSACTION_ID = "transaction_id"

# The predictions table applications read. `decision` is True when the transaction is flagged as
# fraud (score >= the model contract's decision_threshold).
PREDICTION_COLUMNS: dict[str, str] = {
    TRANSACTION_ID: "VARCHAR",
    "user_id": "BIGINT",
    "merchant_id": "BIGINT",
    fr.EVENT_TS: "TIMESTAMPTZ",
    "score": "DOUBLE",
    "decision": "BOOLEAN",
    "model_version": "INTEGER",
    "scored_at": "TIMESTAMPTZ",
    "day": "DATE",
}
PARTITION_COLUMNS: dict[str, str] = {
    "day": "DATE",
    "rows": "BIGINT",
    "positives_flagged": "BIGINT",
    "model_version": "INTEGER",
    "decision_threshold": "DOUBLE",
    "scored_at": "TIMESTAMPTZ",
    "seconds": "DOUBLE",
}
_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "BIGINT": pa.int64(),
    "INTEGER": pa.int32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "DATE": pa.date32(),
}
PREDICTIONS_SCHEMA = pa.schema([(name, _ARROW_TYPES[t]) for name, t in PREDICTION_COLUMNS.items()])


class PredictionsLockedError(RuntimeError):
    """The predictions database stayed locked by another process for longer than the timeout."""


def read_predictions(
    duckdb_path: str | os.PathLike,
    day: date | str | None = None,
    *,
    columns: Sequence[str] | None = None,
    timeout_s: float = 30.0,
) -> pd.DataFrame:
    """The predictions of `day` (all days if None), ordered by event time then transaction id,
    read through a short-lived read-only connection (retried while a swap holds the write lock)."""
    duckdb_path = Path(duckdb_path).expanduser()
    if not duckdb_path.exists():
        raise FileNotFoundError(
            f"no predictions database at {duckdb_path}: score a day first (batch scoring writes it)"
        )
    wanted = list(columns) if columns else list(PREDICTION_COLUMNS)
    unknown = [c for c in wanted if c not in PREDICTION_COLUMNS]
    if unknown:
        raise ValueError(f"unknown prediction columns {unknown}; the table has {list(PREDICTION_COLUMNS)}")
    select = ", ".join(offline.quote_identifier(c) for c in wanted)
    sql = f"SELECT {select} FROM {PREDICTIONS_TABLE}"
    params: list[Any] = []
    if day is not None:
        sql += " WHERE day = ?"
        params.append(as_day(day))
    sql += f" ORDER BY {fr.EVENT_TS}, {TRANSACTION_ID}"
    with contextlib.closing(_connect_with_retry(duckdb_path, read_only=True, timeout_s=timeout_s)) as con:
        con.execute("SET TimeZone = 'UTC'")
        tables = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if PREDICTIONS_TABLE not in tables:
            raise ValueError(f"{duckdb_path} has no {PREDICTIONS_TABLE!r} table yet: score a day first")
        return con.execute(sql, params).df()


def read_scored_days(duckdb_path: str | os.PathLike, *, timeout_s: float = 30.0) -> pd.DataFrame:
    """One row per scored day (day, rows, positives_flagged, model_version, decision_threshold,
    scored_at, seconds): what was published, by which model, when."""
    duckdb_path = Path(duckdb_path).expanduser()
    if not duckdb_path.exists():
        raise FileNotFoundError(f"no predictions database at {duckdb_path}: score a day first")
    with contextlib.closing(_connect_with_retry(duckdb_path, read_only=True, timeout_s=timeout_s)) as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(f"SELECT * FROM {PARTITIONS_TABLE} ORDER BY day").df()


def log_dir_beside(duckdb_path: str | os.PathLike) -> Path:
    """The prediction log of the data directory holding the predictions database (the Settings
    layout: `<data dir>/predictions_log`), where batch scoring logs a day when told no other."""
    from ml_platform.settings import Settings

    return Settings.model_construct(data_dir=Path(duckdb_path).expanduser().resolve().parent).predictions_log_dir


def partition_record(day: date, rows: int, flagged: int, loaded_model, scored_at, seconds: float) -> dict[str, Any]:
    """The day's `prediction_partitions` row (PARTITION_COLUMNS) for `swap_partition`."""
    return {
        "day": day,
        "rows": int(rows),
        "positives_flagged": int(flagged),
        "model_version": int(loaded_model.version),
        "decision_threshold": float(loaded_model.contract.decision_threshold),
        "scored_at": scored_at,
        "seconds": round(seconds, 3),
    }


def swap_partition(duckdb_path: Path, staging: Path, record: dict[str, Any], lock_timeout_s: float,
                   after_commit: Callable[[], Any] | None = None) -> Any:
    """Replace the day's rows with the staged ones in one transaction (all or nothing); then, still
    holding the database (the writers' lock), call `after_commit` and return what it returns: what
    must follow the published rows in the same order (the day's prediction-log file) cannot be
    overtaken by another run's swap of the same day."""
    duckdb_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.closing(
        _connect_with_retry(duckdb_path, read_only=False, timeout_s=lock_timeout_s)
    ) as con:
        con.execute("SET TimeZone = 'UTC'")
        _ensure_tables(con, duckdb_path)
        con.execute(f"ATTACH {offline.quote_literal(str(staging))} AS staged (READ_ONLY)")
        try:
            cols = ", ".join(offline.quote_identifier(c) for c in PREDICTION_COLUMNS)
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"DELETE FROM {PREDICTIONS_TABLE} WHERE day = ?", [record["day"]])
                con.execute(
                    f"INSERT INTO {PREDICTIONS_TABLE} ({cols}) SELECT {cols} FROM staged.{PREDICTIONS_TABLE}"
                )
                (published,) = con.execute(
                    f"SELECT count(*) FROM {PREDICTIONS_TABLE} WHERE day = ?", [record["day"]]
                ).fetchall()[0]
                if published != record["rows"]:
                    raise RuntimeError(
                        f"staged {published} predictions for {record['day']} but the day has {record['rows']} "
                        "transactions; the previous predictions are kept"
                    )
                con.execute(f"DELETE FROM {PARTITIONS_TABLE} WHERE day = ?", [record["day"]])
                con.execute(
                    f"INSERT INTO {PARTITIONS_TABLE} ({', '.join(PARTITION_COLUMNS)}) "
                    f"VALUES ({', '.join('?' for _ in PARTITION_COLUMNS)})",
                    [record[c] for c in PARTITION_COLUMNS],
                )
                con.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                raise
        finally:
            with contextlib.suppress(duckdb.Error):
                con.execute("DETACH staged")
        return after_commit() if after_commit is not None else None


def _ensure_tables(con, duckdb_path: Path) -> None:
    for table, columns in ((PREDICTIONS_TABLE, PREDICTION_COLUMNS), (PARTITIONS_TABLE, PARTITION_COLUMNS)):
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({columns_sql(columns)})")
        have = {
            name: dtype
            for name, dtype in con.execute(
                "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = ? AND schema_name = 'main'",
                [table],
            ).fetchall()
        }
        want = {name: "TIMESTAMP WITH TIME ZONE" if t == "TIMESTAMPTZ" else t for name, t in columns.items()}
        if have != want:
            raise ValueError(
                f"table {table!r} in {duckdb_path} has columns {have}, expected {want}: it was written by "
                "another version of batch scoring; migrate or drop it, or use another duckdb_path"
            )


def columns_sql(columns: dict[str, str]) -> str:
    return ", ".join(f"{offline.quote_identifier(n)} {t}" for n, t in columns.items())


def _connect_with_retry(path: Path, *, read_only: bool, timeout_s: float) -> duckdb.DuckDBPyConnection:
    """Open the database, waiting while another process holds a conflicting lock."""
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                mode = "read" if read_only else "write"
                raise PredictionsLockedError(
                    f"could not open {path} to {mode} within {timeout_s:.0f} s: another process holds it "
                    f"({exc}). Readers should use short-lived read-only connections (read_predictions); "
                    "retry when the other writer is done"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 2, 1.0)


def as_day(value: date | str) -> date:
    return parse_date(value, "day (a daily partition key)")
