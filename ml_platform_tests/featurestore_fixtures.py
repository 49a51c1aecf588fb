"""Test data helpers shared by the offline feature store tests: UTC times, small hand-made tables
written as Parquet (one file, or one hive-style `date=YYYY-MM-DD` folder per day like the raw
data), and the two entities the tests join on."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml_platform.featurestore import Entity

user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])


def T(text: str) -> pd.Timestamp:
    """A UTC timestamp from text ("2024-01-01 10:00")."""
    return pd.Timestamp(text, tz="UTC")


def table(
    columns: str,
    rows: Iterable[tuple],
    *,
    times: Iterable[str] = (),
    dtypes: dict[str, str] | None = None,
) -> pd.DataFrame:
    """A DataFrame written one row a line: `columns` space-separated, `rows` tuples in that order.

    Columns named in `times` hold text parsed as UTC timestamps (None -> NaT); `dtypes` casts others
    (e.g. {"is_fraud": "Int64"} keeps None as a null integer)."""
    frame = pd.DataFrame(list(rows), columns=columns.split())
    for column in times:
        frame[column] = pd.to_datetime(frame[column], utc=True, format="ISO8601")
    return frame.astype(dtypes) if dtypes else frame


def write_parquet(path: Path, frame: pd.DataFrame, schema: pa.Schema | None = None) -> None:
    """Write `frame` as one Parquet file at `path` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False), path)


def write_by_day(
    folder: Path, frame: pd.DataFrame, time_column: str, schema: pa.Schema | None = None
) -> None:
    """Write `frame` as `folder/date=YYYY-MM-DD/part-0.parquet`, one file per day of `time_column`
    (the raw data's layout)."""
    for day, part in frame.groupby(frame[time_column].dt.strftime("%Y-%m-%d")):
        write_parquet(folder / f"date={day}" / "part-0.parquet", part, schema)
