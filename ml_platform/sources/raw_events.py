"""Reading the raw transaction events back from their daily Parquet partitions (DuckDB)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import duckdb
import pandas as pd

from ml_platform import features as fr


def partition_dir(raw_dir: Path, day: dt.date) -> Path:
    return Path(raw_dir) / "transactions" / f"date={day.isoformat()}"


def _connect() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    return con


def _sql_list(paths: list[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def read_days(raw_dir: Path, days: list[dt.date]) -> pd.DataFrame:
    """All events of the given days, as written (the `date` partition column is not returned)."""
    missing = [d.isoformat() for d in days if not any(partition_dir(raw_dir, d).glob("*.parquet"))]
    if missing:
        raise FileNotFoundError(
            f"no raw transaction partition for {missing} under {Path(raw_dir) / 'transactions'}"
        )
    globs = [partition_dir(raw_dir, d) / "*.parquet" for d in days]
    with _connect() as con:
        return con.execute(
            f"SELECT * EXCLUDE (date) FROM read_parquet({_sql_list(globs)}, hive_partitioning = true) "
            f"ORDER BY {fr.EVENT_TS}, transaction_id"
        ).df()


def all_partition_days(raw_dir: Path) -> list[dt.date]:
    root = Path(raw_dir) / "transactions"
    days = []
    for d in sorted(root.glob("date=*")):
        if any(d.glob("*.parquet")):
            days.append(dt.date.fromisoformat(d.name.split("=", 1)[1]))
    return days


def labelled_events(raw_dir: Path, as_of: dt.datetime) -> pd.DataFrame:
    """Events whose label had arrived by `as_of` (label_timestamp <= as_of), oldest first."""
    days = all_partition_days(raw_dir)
    if not days:
        raise FileNotFoundError(
            f"no raw transactions under {Path(raw_dir) / 'transactions'}: materialize raw_transactions first"
        )
    glob = Path(raw_dir) / "transactions" / "*" / "*.parquet"
    with _connect() as con:
        return con.execute(
            f"SELECT * EXCLUDE (date) FROM read_parquet('{glob}', hive_partitioning = true) "
            f"WHERE {fr.LABEL} IS NOT NULL AND {fr.LABEL_TS} <= ? "
            f"ORDER BY {fr.EVENT_TS}, transaction_id",
            [as_of],
        ).df()


def latest_label_time(raw_dir: Path) -> dt.datetime | None:
    """When the newest known label arrived: the natural `as_of` of a training run."""
    days = all_partition_days(raw_dir)
    if not days:
        return None
    glob = Path(raw_dir) / "transactions" / "*" / "*.parquet"
    with _connect() as con:
        (value,) = con.execute(
            f"SELECT max({fr.LABEL_TS}) FROM read_parquet('{glob}', hive_partitioning = true)"
        ).fetchall()[0]
    return value
