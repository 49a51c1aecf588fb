"""Bring your own events: read Parquet/CSV transactions, coerce them to the raw contract, and
write them into the same daily-partition layout the generator writes.

Type errors (a column missing, a value that cannot become its type) stop the import with the
column and an example value. Data-quality rules (amount > 0, unique ids, ...) are not checked
here but by the validation gate (ml_platform.validation), which reports all of them at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ml_platform.sources.generator import TRANSACTION_COLUMNS, write_partition

PARQUET_SUFFIXES = (".parquet", ".pq")
CSV_SUFFIXES = (".csv", ".csv.gz")
INTEGER_COLUMNS = ("user_id", "merchant_id")
STRING_COLUMNS = ("transaction_id", "merchant_category", "country", "device", "channel")
TIMESTAMP_COLUMNS = ("event_timestamp", "created_timestamp", "label_timestamp")
# Columns a user's file may leave out: no labels yet; ingestion time = event time.
OPTIONAL_COLUMNS = ("created_timestamp", "is_fraud", "label_timestamp")


class EventsFormatError(ValueError):
    """The events cannot be read as the raw transaction contract."""


def _event_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"No events at {path}: give a Parquet/CSV file or a directory of them")
    if path.is_file():
        return [path]
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        and p.name.lower().endswith(PARQUET_SUFFIXES + CSV_SUFFIXES)
    )
    if not files:
        raise EventsFormatError(f"No .parquet or .csv files under {path}")
    return files


def _read_file(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    if name.endswith(PARQUET_SUFFIXES):
        # Only the file's own columns: a hive partition key in the path (date=...) is derived data.
        return pq.ParquetFile(path).read().to_pandas()
    if name.endswith(CSV_SUFFIXES):
        # Everything as text first, so that each column is converted (and reported) by the same rules.
        return pd.read_csv(path, dtype=str, keep_default_na=True)
    raise EventsFormatError(f"{path}: unsupported file type; use .parquet or .csv")


def _fail(column: str, values: pd.Series, bad: np.ndarray, expected: str, source: str) -> None:
    examples = values[bad].head(3).tolist()
    raise EventsFormatError(
        f"{source}: column {column!r} has {int(bad.sum())} value(s) that are not {expected}, "
        f"e.g. {examples!r}; fix or remove those rows and import again"
    )


def _to_int(values: pd.Series, column: str, source: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = (numbers.isna() & values.notna()).to_numpy() | (numbers.notna() & (numbers % 1 != 0)).to_numpy()
    if bad.any():
        _fail(column, values, bad, "whole numbers", source)
    return numbers.astype("Int64") if numbers.isna().any() else numbers.astype("int64")


def _to_float(values: pd.Series, column: str, source: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy()
    if bad.any():
        _fail(column, values, bad, "numbers", source)
    return numbers.astype("float64")


def _to_label(values: pd.Series, column: str, source: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        values = values.astype("Int64")
    elif values.dtype == object or pd.api.types.is_string_dtype(values):
        lowered = values.str.strip().str.lower()
        values = lowered.replace({"true": "1", "false": "0"})
    numbers = pd.to_numeric(values, errors="coerce")
    bad = (numbers.isna() & values.notna()).to_numpy() | (numbers.notna() & ~numbers.isin([0, 1])).to_numpy()
    if bad.any():
        _fail(column, values, bad, "0, 1 or empty", source)
    return numbers.astype("Int64")


def _to_utc(values: pd.Series, column: str, source: str) -> pd.Series:
    """Any timestamp to UTC microseconds; a timestamp without a time zone is taken as UTC."""
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        out = values.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(values):
        out = values.dt.tz_localize("UTC")
    else:
        text = values.astype("str").where(values.notna())
        out = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        bad = (out.isna() & values.notna()).to_numpy()
        if bad.any():
            _fail(column, values, bad, "ISO-8601 timestamps (e.g. 2024-01-31T12:00:00Z)", source)
    return out.astype("datetime64[us, UTC]")


def coerce_events(frame: pd.DataFrame, source: str = "events") -> pd.DataFrame:
    """`frame` with exactly the contract's columns and types; raises EventsFormatError naming the
    column and example values when a column is missing or a value cannot be converted."""
    missing = [c for c in TRANSACTION_COLUMNS if c not in frame.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise EventsFormatError(
            f"{source}: missing required column(s) {missing}; found {list(frame.columns)}. "
            f"Rename your columns to the contract: {TRANSACTION_COLUMNS}"
        )
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame(index=frame.index)
    for column in STRING_COLUMNS:
        values = frame[column]
        out[column] = values.astype("str").where(values.notna()).astype("str")
    for column in INTEGER_COLUMNS:
        out[column] = _to_int(frame[column], column, source)
    out["amount"] = _to_float(frame["amount"], "amount", source)
    for column in TIMESTAMP_COLUMNS:
        if column in frame.columns:
            out[column] = _to_utc(frame[column], column, source)
    if "created_timestamp" not in out:
        out["created_timestamp"] = out["event_timestamp"]
    if "is_fraud" in frame.columns:
        out["is_fraud"] = _to_label(frame["is_fraud"], "is_fraud", source)
    else:
        out["is_fraud"] = pd.array([pd.NA] * len(out), dtype="Int64")
    if "label_timestamp" not in out:
        out["label_timestamp"] = pd.Series(pd.NaT, index=out.index, dtype="datetime64[us, UTC]")
    return out[TRANSACTION_COLUMNS]


def load_events(path: str | Path) -> pd.DataFrame:
    """Read a Parquet/CSV file, or every such file under a directory, as contract-typed events."""
    path = Path(path)
    frames = [coerce_events(_read_file(f), source=str(f)) for f in _event_files(path)]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _partitions(events: pd.DataFrame) -> Iterable[tuple[date, pd.DataFrame]]:
    no_time = events["event_timestamp"].isna()
    if no_time.any():
        examples = events.loc[no_time, "transaction_id"].head(3).tolist()
        raise EventsFormatError(
            f"{int(no_time.sum())} event(s) have no event_timestamp (transaction_id e.g. {examples!r}); "
            "every event needs one to be placed in its daily partition"
        )
    days = events["event_timestamp"].dt.date
    for day, part in events.groupby(days, sort=True):
        yield day, part.sort_values("event_timestamp", kind="stable").reset_index(drop=True)


def import_events(path: str | Path, raw_dir: str | Path) -> list[Path]:
    """Load events from `path` and write them to raw_dir/transactions/date=YYYY-MM-DD/part-0.parquet.

    Each day the events touch is replaced as a whole (atomically): importing the same file twice
    gives the same result, and a day's partition holds exactly the imported events of that day."""
    events = load_events(path)
    if events.empty:
        raise EventsFormatError(f"{path}: no events to import")
    return [write_partition([part], raw_dir, day) for day, part in _partitions(events)]
