"""The raw data on disk: the transaction contract's columns and Parquet types, the daily-partition layout
(raw/transactions/date=YYYY-MM-DD/part-*.parquet, raw/users/users.parquet), writing a partition
atomically and reading the events back (DuckDB). The generator and the file importer both write
through `write_partition`; training, batch scoring and the stream worker read through here.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from collections.abc import Iterable
from datetime import date, datetime
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml_platform import features as fr
from ml_platform.transactions import (
    LABEL_EVENT,
    LABEL_EVENT_OPTIONAL,
    TABLE_ONLY_COLUMNS,
    TRANSACTION,
    IntegerField,
    NumberField,
    TextField,
    TimestampField,
)

# --- The raw transaction table: the transaction contract's fields, then the table-only columns ---
_TS = pa.timestamp("us", tz="UTC")
_ARROW_OF = {TextField: pa.string(), IntegerField: pa.int64(), NumberField: pa.float64(), TimestampField: _TS}
TRANSACTIONS_ARROW_SCHEMA = pa.schema(
    [(spec.name, _ARROW_OF[type(spec)]) for spec in TRANSACTION.fields]
    + [(fr.CREATED_TS, _TS), (fr.LABEL, pa.int64()), (fr.LABEL_TS, _TS)]
)
assert tuple(TRANSACTIONS_ARROW_SCHEMA.names[len(TRANSACTION.fields) :]) == TABLE_ONLY_COLUMNS
TRANSACTION_COLUMNS = list(TRANSACTIONS_ARROW_SCHEMA.names)
# The label feed (raw/labels/date=<arrival day>/labels.parquet, see sources.labels): the label event
# contract's fields, then its optional ones, typed as in the raw table.
LABEL_COLUMNS: tuple[str, ...] = tuple(f.name for f in (*LABEL_EVENT.fields, *LABEL_EVENT_OPTIONAL))
LABELS_ARROW_SCHEMA = pa.schema([TRANSACTIONS_ARROW_SCHEMA.field(name) for name in LABEL_COLUMNS])
USERS_ARROW_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("home_country", pa.string()),
        ("account_age_days", pa.int64()),
        ("updated_at", _TS),
    ]
)


def parse_date(value, what: str) -> date:
    """A date from a date, datetime or YYYY-MM-DD string, with an error naming `what` otherwise."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not a date; use YYYY-MM-DD") from None


# --- Writing ---


def transactions_partition(raw_dir: str | Path, day: date) -> Path:
    """raw_dir/transactions/date=YYYY-MM-DD: the daily partition directory."""
    return Path(raw_dir) / "transactions" / f"date={day.isoformat()}"


def labels_root(raw_dir: str | Path) -> Path:
    return Path(raw_dir) / "labels"


def labels_partition(raw_dir: str | Path, day: date) -> Path:
    """raw_dir/labels/date=YYYY-MM-DD: the labels that arrived that day."""
    return labels_root(raw_dir) / f"date={day.isoformat()}"


def write_partition(frames: Iterable[pd.DataFrame], raw_dir: str | Path, day: date) -> Path:
    """Write frames as part-0..part-k of `day`'s partition, replacing the partition as a whole.

    Parts are written into a staging directory next to the data (same file system), then the
    staged directory takes the partition's place: readers see the old or the new partition."""
    raw_dir = Path(raw_dir)
    final = transactions_partition(raw_dir, day)
    staging_root = raw_dir / "_staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staged = staging_root / f"{final.name}-{uuid.uuid4().hex}"
    staged.mkdir()
    try:
        n = 0
        for i, frame in enumerate(frames):
            table = pa.Table.from_pandas(
                frame[TRANSACTION_COLUMNS], schema=TRANSACTIONS_ARROW_SCHEMA, preserve_index=False
            )
            pq.write_table(table, staged / f"part-{i}.parquet", compression="zstd")
            n += 1
        if n == 0:
            raise ValueError(f"no rows to write for {day}")
        final.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if final.exists():
            old = staging_root / f"old-{final.name}-{uuid.uuid4().hex}"
            os.replace(final, old)
        os.replace(staged, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    return final


# --- Reading ---


def connect() -> duckdb.DuckDBPyConnection:
    """A connection as this module reads with (UTC session time zone); `read_days` takes one."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def _sql_text(value) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join(_sql_text(p) for p in paths) + "]"


def read_days(raw_dir: Path, days: list[dt.date], con: duckdb.DuckDBPyConnection | None = None) -> pd.DataFrame:
    """All events of the given days, as written (the `date` partition column is not returned).
    `con`: a connection of the caller's to read with (one per call otherwise; ~12 ms to open)."""
    missing = [d.isoformat() for d in days if not any(transactions_partition(raw_dir, d).glob("*.parquet"))]
    if missing:
        raise FileNotFoundError(
            f"no raw transaction partition for {missing} under {Path(raw_dir) / 'transactions'}"
        )
    globs = [transactions_partition(raw_dir, d) / "*.parquet" for d in days]
    sql = (f"SELECT * EXCLUDE (date) FROM read_parquet({_sql_list(globs)}, hive_partitioning = true) "
           f"ORDER BY {fr.EVENT_TS}, transaction_id")
    if con is not None:
        return con.execute(sql).df()
    with connect() as own:
        return own.execute(sql).df()


def all_partition_days(raw_dir: Path) -> list[dt.date]:
    root = Path(raw_dir) / "transactions"
    days = []
    for d in sorted(root.glob("date=*")):
        if any(d.glob("*.parquet")):
            days.append(dt.date.fromisoformat(d.name.split("=", 1)[1]))
    return days


def _label_feed_files(raw_dir: Path) -> str | None:
    """The label feed's files as a DuckDB glob, or None while the feed is empty."""
    root = labels_root(raw_dir)
    return _sql_text(root / "*" / "*.parquet") if any(root.glob("date=*/*.parquet")) else None


def _known_labels_sql(raw_dir: Path, days: list[dt.date] | None = None) -> str | None:
    """SQL of every label known by `$as_of`, one row per transaction (LABEL_COLUMNS; the latest
    arrival wins): the labels the raw events (of `days`; None: every day) carry, and the label
    feed's arrivals. None when there is neither."""
    columns = ", ".join(LABEL_COLUMNS)
    parts = []
    if days is None or days:
        raw = (_sql_text(Path(raw_dir) / "transactions" / "*" / "*.parquet") if days is None
               else _sql_list([transactions_partition(raw_dir, d) / "*.parquet" for d in days]))
        parts.append(f"SELECT {columns} FROM read_parquet({raw}, hive_partitioning = true) "
                     f"WHERE {fr.LABEL} IS NOT NULL AND {fr.LABEL_TS} <= $as_of")
    feed = _label_feed_files(raw_dir)
    if feed:
        parts.append(f"SELECT {columns} FROM read_parquet({feed}) WHERE {fr.LABEL_TS} <= $as_of")
    if not parts:
        return None
    return (f"SELECT * FROM ({' UNION ALL '.join(parts)}) "
            f"QUALIFY row_number() OVER (PARTITION BY transaction_id ORDER BY {fr.LABEL_TS} DESC) = 1")


def known_labels(raw_dir: Path, as_of: dt.datetime, days: list[dt.date] | None = None) -> pd.DataFrame:
    """Every label known by `as_of` (see `_known_labels_sql`), oldest arrival first."""
    sql = _known_labels_sql(raw_dir, days)
    if sql is None:
        return LABELS_ARROW_SCHEMA.empty_table().to_pandas()
    with connect() as con:
        table = con.sql(f"SELECT * FROM ({sql}) ORDER BY {fr.LABEL_TS}, transaction_id",
                        params={"as_of": as_of}).to_arrow_table()
    return table.cast(LABELS_ARROW_SCHEMA).to_pandas()


def labelled_events(raw_dir: Path, as_of: dt.datetime) -> pd.DataFrame:
    """Events whose label had arrived by `as_of`, oldest first, with that label: the label the raw
    event carried when it was written, or a later one from the label feed (a chargeback arriving
    after the day was ingested); the latest arrival by `as_of` wins."""
    days = all_partition_days(raw_dir)
    if not days:
        raise FileNotFoundError(
            f"no raw transactions under {Path(raw_dir) / 'transactions'}: materialize raw_transactions first"
        )
    glob = Path(raw_dir) / "transactions" / "*" / "*.parquet"
    with connect() as con:
        return con.execute(
            f"WITH known AS ({_known_labels_sql(raw_dir)}) "
            f"SELECT e.* EXCLUDE (date, {fr.LABEL}, {fr.LABEL_TS}), k.{fr.LABEL}, k.{fr.LABEL_TS} "
            f"FROM read_parquet('{glob}', hive_partitioning = true) e JOIN known k USING (transaction_id) "
            f"ORDER BY {fr.EVENT_TS}, transaction_id",
            {"as_of": as_of},
        ).df()


def latest_label_time(raw_dir: Path) -> dt.datetime | None:
    """When the newest known label arrived (raw events or the label feed): the natural `as_of` of a
    training run."""
    days = all_partition_days(raw_dir)
    if not days:
        return None
    glob = Path(raw_dir) / "transactions" / "*" / "*.parquet"
    newest = f"SELECT max({fr.LABEL_TS}) AS t FROM read_parquet('{glob}', hive_partitioning = true)"
    feed = _label_feed_files(raw_dir)
    if feed:
        newest += f" UNION ALL SELECT max({fr.LABEL_TS}) FROM read_parquet({feed})"
    with connect() as con:
        (value,) = con.execute(
            f"SELECT max(t) FROM ({newest})"
        ).fetchall()[0]
    return value
