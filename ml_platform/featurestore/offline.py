"""Offline store: read feature tables with DuckDB and join them to entity rows point-in-time.

Every feature table, raw source or materialized aggregate, is seen through one normalized
relation: the view's join keys, `event_timestamp` (when the value became true),
`created_timestamp` (tie-break, may be NULL) and the features cast to their declared types.

Point-in-time rule (Feast's): an entity row at time T gets, per view, the latest feature row with
the same join keys and `T - ttl <= event_timestamp <= T` (no lower bound when ttl is None or 0);
equal event timestamps are broken by the latest `created_timestamp`; no such row -> nulls.
The join is a DuckDB `ASOF LEFT JOIN`, so every entity row is answered exactly once; the entity
rows are numbered, and the answer is put back in their order by that number (a scatter, no sort).

Why ~410 lines in one module: the scans, the normalized feature tables and the point-in-time SQL
are one contract (the join reads the columns the tables define, the tables the scans' columns);
split, the point-in-time rule would be read across modules. Each part is a few small functions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml_platform.featurestore.definitions import FeatureView, FileSource
from ml_platform.timestamps import US_PER_SECOND, from_us, span_us, to_us

ENTITY_TS = "event_timestamp"  # entity rows' time column (Feast convention)
FEATURE_TS = "event_timestamp"  # feature tables' normalized time column
CREATED_TS = "created_timestamp"  # feature tables' normalized tie-break column
# The entity rows relation `point_in_time_sql` joins from, and its row-number column: a caller
# that streams its own entity rows (batch scoring) registers them under these names.
ROW_ID = "__entity_row_id"
ENTITY_TABLE = "__entity_rows"
_ORDER_KEY = "__asof_order"

# Arrow -> pandas: integer and boolean features come back as pandas nullable dtypes (Int64,
# Int32, boolean) whether or not they hold nulls, so a column's dtype never depends on the data.
_PANDAS_NULLABLE = {
    pa.int8(): pd.Int8Dtype(),
    pa.int16(): pd.Int16Dtype(),
    pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(),
    pa.bool_(): pd.BooleanDtype(),
}


# --------------------------------------------------------------------------------------------
# SQL building blocks
# --------------------------------------------------------------------------------------------


def quote_identifier(name: str) -> str:
    """A DuckDB identifier, double-quoted."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """A DuckDB string literal, single-quoted."""
    return "'" + text.replace("'", "''") + "'"


def interval_sql(span: timedelta) -> str:
    """An exact DuckDB INTERVAL (seconds or microseconds, never calendar days, so no DST effects)."""
    micros = span_us(span)
    if micros % US_PER_SECOND == 0:
        return f"INTERVAL '{micros // US_PER_SECOND} seconds'"
    return f"INTERVAL '{micros} microseconds'"


def connect(threads: int | None = None, memory_limit: str | None = None, temp_directory: Path | None = None):
    """A fresh in-memory DuckDB connection with the offline store's settings (UTC session time zone)."""
    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    # Results are re-ordered by entity row number, never by scan order: let DuckDB stream freely.
    con.execute("SET preserve_insertion_order = false")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    if memory_limit:
        con.execute(f"SET memory_limit = {quote_literal(str(memory_limit))}")
    if temp_directory is not None:
        con.execute(f"SET temp_directory = {quote_literal(str(temp_directory))}")
    return con


# --------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------


def resolve_source_path(source: FileSource, repo_path: Path) -> str:
    """The source's path, relative to the repo path unless absolute."""
    path = Path(os.path.expanduser(source.path))
    return str(path if path.is_absolute() else Path(repo_path) / path)


def scan_sql(
    path: str | Sequence[str],
    file_format: str = "parquet",
    *,
    what: str = "source",
    file_row_number: bool = False,
) -> str:
    """A DuckDB table function reading `path`: one file, a glob, or a directory (all files below
    it, hive-style `key=value` folders included; the partition column itself is not added), or a
    list of Parquet files (`parquet_files`). `file_row_number`: Parquet only, adds each row's file
    (`filename`) and its number within it (`file_row_number`); `file_row_sql` numbers them across files."""
    if not isinstance(path, str):
        files = ", ".join(quote_literal(str(f)) for f in path)
        numbered = ", filename = true, file_row_number = true" if file_row_number else ""
        return f"read_parquet([{files}], union_by_name = true, hive_partitioning = false{numbered})"
    ext = "csv" if file_format == "csv" else "parquet"
    path = _scan_path(path, ext, what)
    if file_format == "csv":
        return (
            f"read_csv({quote_literal(path)}, header = true, union_by_name = true, hive_partitioning = false)"
        )
    numbered = ", filename = true, file_row_number = true" if file_row_number else ""
    return f"read_parquet({quote_literal(path)}, union_by_name = true, hive_partitioning = false{numbered})"


def _scan_path(path: str, ext: str, what: str) -> str:
    """`path` as DuckDB reads it: a glob or a file as given, a directory as every `.ext` file below it."""
    if any(ch in path for ch in "*?["):
        return path
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what}: path {path} does not exist")
    if p.is_dir():
        if not any(p.rglob(f"*.{ext}")):
            raise FileNotFoundError(f"{what}: no .{ext} files under directory {path}")
        return str(p / "**" / f"*.{ext}")
    return path


def parquet_files(con, path: str, *, what: str = "source") -> list[str]:
    """The Parquet files `scan_sql(path)` reads, as DuckDB's own glob lists them, in a fixed order."""
    pattern = _scan_path(path, "parquet", what)
    files = [row[0] for row in con.execute("SELECT file FROM glob(?) ORDER BY file", [pattern]).fetchall()]
    if not files:
        raise FileNotFoundError(f"{what}: no Parquet file matches {path}")
    return files


def file_row_sql(files: Sequence[str | Path]) -> tuple[str, int]:
    """(the SQL numbering the rows of a scan of the Parquet `files`, read with `filename` and
    `file_row_number`, 0..n-1 in this file order: the rows of the files before + the row within
    its file; n). No sort and no copy: batch scoring numbers the day's events with it, and the
    feature rows it reads back by number (`FILE_ROW`)."""
    if len(files) == 1:
        return "file_row_number", pq.ParquetFile(files[0]).metadata.num_rows
    bases, total = [], 0
    for path in files:
        bases.append(f"WHEN {quote_literal(str(path))} THEN {total}")
        total += pq.ParquetFile(path).metadata.num_rows
    return f"(CASE filename {' '.join(bases)} END + file_row_number)", total


def relation_columns(con, relation_sql: str, *, what: str) -> dict[str, str]:
    """Column name -> DuckDB type of a relation (reads file metadata only)."""
    try:
        rows = con.execute(f"DESCRIBE SELECT * FROM {relation_sql}").fetchall()
    except duckdb.Error as exc:
        raise ValueError(f"{what}: cannot read it with DuckDB: {exc}") from exc
    return {row[0]: row[1] for row in rows}


def require_columns(available: dict[str, str], needed: list[str], *, what: str, hint: str = "") -> None:
    """Raise a ValueError naming every needed column the relation lacks."""
    missing = [c for c in needed if c not in available]
    if missing:
        raise ValueError(
            f"{what} lacks column(s) {missing}; it has {sorted(available)}.{(' ' + hint) if hint else ''}"
        )


# --------------------------------------------------------------------------------------------
# Feature tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureTable:
    """One feature view's values as the offline store reads them.

    `sql` is a parenthesized SELECT with columns: join keys, `event_timestamp`,
    `created_timestamp` and the view's features cast to their declared types; rows without
    an event timestamp are left out. `has_ties` says whether equal (keys, event_timestamp) pairs
    may occur and must be broken by `created_timestamp` (raw sources with a created column).
    """

    view: FeatureView
    sql: str
    has_ties: bool


def raw_feature_table(view: FeatureView, source_scan: str, extra: Sequence[str] = ()) -> FeatureTable:
    """Normalize a view's raw source (it already holds the feature values) to a FeatureTable.
    `extra`: more SQL select items of the scan (e.g. the row's number, `FILE_ROW`, for batch scoring)."""
    src = view.source
    keys = [f"{quote_identifier(k)}" for k in view.join_keys]
    created = (
        f"CAST({quote_identifier(src.created_timestamp_column)} AS TIMESTAMPTZ)"
        if src.created_timestamp_column
        else "CAST(NULL AS TIMESTAMPTZ)"
    )
    feats = [
        f"CAST({quote_identifier(f.name)} AS {f.dtype.duckdb_type}) AS {quote_identifier(f.name)}"
        for f in view.schema
    ]
    ts = quote_identifier(src.timestamp_field)
    sql = (
        f"(SELECT {', '.join(keys)}, CAST({ts} AS TIMESTAMPTZ) AS {FEATURE_TS}, {created} AS {CREATED_TS}, "
        f"{', '.join([*extra, *feats])} FROM {source_scan} WHERE {ts} IS NOT NULL)"
    )
    return FeatureTable(view, sql, has_ties=src.created_timestamp_column is not None)


FILE_ROW = "__file_row"  # numbered_feature_table's extra column: the row's number in its files (file_row_sql)


def materialized_feature_table(view: FeatureView, table_scan: str, extra: Sequence[str] = ()) -> FeatureTable:
    """A FeatureTable over a materialized aggregate table (already one row per keys and time).
    `extra`: more SQL select items of the scan (e.g. the file row number, for batch scoring)."""
    cols = [quote_identifier(k) for k in view.join_keys] + [FEATURE_TS, CREATED_TS, *extra]
    feats = [
        f"CAST({quote_identifier(f.name)} AS {f.dtype.duckdb_type}) AS {quote_identifier(f.name)}"
        for f in view.schema
    ]
    sql = f"(SELECT {', '.join(cols + feats)} FROM {table_scan} WHERE {FEATURE_TS} IS NOT NULL)"
    return FeatureTable(view, sql, has_ties=False)


# --------------------------------------------------------------------------------------------
# Entity rows
# --------------------------------------------------------------------------------------------


def entity_timestamps_utc(values: pd.Series) -> pd.Series:
    """The entity rows' `event_timestamp` as tz-aware UTC (microsecond resolution).

    tz-aware values are converted to UTC; all-naive values are taken to be UTC already; a mix of
    naive and tz-aware values is ambiguous and raises. Nulls stay null (such rows get null features).
    """
    if isinstance(values.dtype, pd.DatetimeTZDtype):
        out = values.dt.tz_convert("UTC")
    elif pd.api.types.is_datetime64_dtype(values.dtype):
        out = values.dt.tz_localize("UTC")
    else:
        fmt = "ISO8601" if pd.api.types.is_string_dtype(values.dtype) else None
        try:
            parsed = pd.to_datetime(values, format=fmt)
        except (ValueError, TypeError) as exc:
            # Mixed offsets are fine (all converted to UTC); naive mixed with aware is ambiguous.
            try:
                aware = values.dropna().map(lambda v: pd.Timestamp(v).tzinfo is not None).astype(bool)
            except (ValueError, TypeError):
                raise ValueError(
                    f"entity_df column '{ENTITY_TS}' cannot be read as timestamps: {exc}"
                ) from exc
            if not aware.any():
                raise ValueError(
                    f"entity_df column '{ENTITY_TS}' cannot be read as timestamps: {exc}"
                ) from exc
            if not aware.all():
                raise ValueError(
                    f"entity_df column '{ENTITY_TS}' mixes tz-naive and tz-aware timestamps "
                    f"({int((~aware).sum())} naive, {int(aware.sum())} aware): make them all tz-aware "
                    "(e.g. pd.to_datetime(..., utc=True)) or all naive (taken as UTC)"
                ) from exc
            parsed = pd.to_datetime(values, format=fmt, utc=True)
        if not (
            isinstance(parsed.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_dtype(parsed.dtype)
        ):
            raise ValueError(f"entity_df column '{ENTITY_TS}' has dtype {values.dtype}, not timestamps")
        return entity_timestamps_utc(parsed)
    return out.dt.as_unit("us")


def _entity_arrow(entity_df: pd.DataFrame, timestamps: pd.Series, key_columns: list[str]) -> pa.Table:
    """The columns the join needs (row number, join keys, timestamp) as an Arrow table."""
    n = len(entity_df)
    columns = {ROW_ID: pa.array(np.arange(n, dtype=np.int64))}
    for key in key_columns:
        columns[key] = pa.array(entity_df[key], from_pandas=True)
    columns[ENTITY_TS] = pa.array(timestamps, type=pa.timestamp("us", tz="UTC"), from_pandas=True)
    return pa.table(columns)


# --------------------------------------------------------------------------------------------
# Point-in-time join
# --------------------------------------------------------------------------------------------


def point_in_time_sql(table: FeatureTable, features: list[tuple[str, str]]) -> str:
    """The ASOF LEFT JOIN answering every entity row from one feature table.

    `features` lists (feature name, output column name). Ties on event time are broken inside the
    ASOF match itself by ordering on (event_timestamp, created_timestamp), so no pre-aggregation.
    """
    view = table.view
    on = [f"e.{quote_identifier(k)} = f.{quote_identifier(k)}" for k in view.join_keys]
    if table.has_ties:
        # A row with no created timestamp loses ties; an entity row matches every created time.
        order = f"{{'t': {FEATURE_TS}, 'c': coalesce({CREATED_TS}, '-infinity'::TIMESTAMPTZ)}}"
        right = f"(SELECT *, {order} AS {_ORDER_KEY} FROM {table.sql})"
        entity_order = f"CASE WHEN e.{ENTITY_TS} IS NOT NULL THEN {{'t': e.{ENTITY_TS}, 'c': 'infinity'::TIMESTAMPTZ}} END"
        on.append(f"{entity_order} >= f.{_ORDER_KEY}")
    else:
        right = table.sql
        on.append(f"e.{ENTITY_TS} >= f.{FEATURE_TS}")
    ttl = view.ttl
    cols = []
    for name, out in features:
        value = f"f.{quote_identifier(name)}"
        if ttl:
            value = f"CASE WHEN f.{FEATURE_TS} >= e.{ENTITY_TS} - {interval_sql(ttl)} THEN {value} END"
        cols.append(f"{value} AS {quote_identifier(out)}")
    return (
        f"SELECT e.{ROW_ID}, {', '.join(cols)}\n"
        f"FROM {ENTITY_TABLE} e ASOF LEFT JOIN {right} f\n"
        f"ON {' AND '.join(on)}"
    )


def _in_entity_order(result: pa.Table, n_rows: int, view_name: str) -> pa.Table:
    """Put one view's answers back in entity-row order by their row number (scatter, no sort)."""
    row_ids = result.column(ROW_ID).to_numpy()
    position = np.full(n_rows, -1, dtype=np.int64)
    position[row_ids] = np.arange(len(row_ids), dtype=np.int64)
    if len(row_ids) != n_rows or (n_rows and position.min() < 0):
        raise RuntimeError(
            f"point-in-time join for view {view_name!r} answered {len(row_ids)} of {n_rows} entity rows; "
            "this is a bug in the offline store"
        )
    return result.drop_columns([ROW_ID]).take(pa.array(position))


def point_in_time_join(
    con,
    entity_df: pd.DataFrame,
    requests: list[tuple[FeatureTable, list[tuple[str, str]]]],
    output_columns: list[str],
) -> pd.DataFrame:
    """Join `entity_df` to each requested feature table, point-in-time.

    `requests` pairs a FeatureTable with (feature name, output column) pairs; `output_columns`
    gives the order of the added columns. The result is a copy of entity_df (same index, order,
    columns, duplicates) with `event_timestamp` as tz-aware UTC and the feature columns appended.
    """
    timestamps = entity_timestamps_utc(entity_df[ENTITY_TS])
    keys = list(dict.fromkeys(k for table, _ in requests for k in table.view.join_keys))
    n = len(entity_df)
    con.register(ENTITY_TABLE, _entity_arrow(entity_df, timestamps, keys))
    answered: dict[str, pa.ChunkedArray] = {}
    try:
        for table, features in requests:
            sql = point_in_time_sql(table, features)
            try:
                result = con.sql(sql).to_arrow_table()
            except duckdb.Error as exc:
                raise RuntimeError(
                    f"point-in-time join for feature view {table.view.name!r} failed: {exc}"
                ) from exc
            ordered = _in_entity_order(result, n, table.view.name)
            for _, out in features:
                answered[out] = ordered.column(out)
    finally:
        con.unregister(ENTITY_TABLE)
    feature_frame = pa.table({name: answered[name] for name in output_columns}).to_pandas(
        types_mapper=_PANDAS_NULLABLE.get, self_destruct=True
    )
    base = entity_df.reset_index(drop=True)
    base[ENTITY_TS] = timestamps.reset_index(drop=True)
    out = pd.concat([base, feature_frame], axis=1)
    out.index = entity_df.index
    return out


# --------------------------------------------------------------------------------------------
# Latest value per entity (what the online store holds)
# --------------------------------------------------------------------------------------------


def as_of_utc(as_of: datetime | pd.Timestamp) -> datetime:
    """A tz-aware UTC datetime (µs resolution); a naive one is taken to be UTC (as for entity rows)."""
    us = to_us(as_of)
    if us is None:
        raise ValueError(f"as_of must be a timestamp, got {as_of!r}")
    return from_us(us)


def latest_sql(table: FeatureTable) -> str:
    """One row per entity: its latest feature row with event_timestamp <= $as_of (and within ttl)."""
    view = table.view
    keys = [quote_identifier(k) for k in view.join_keys]
    feats = [quote_identifier(f.name) for f in view.schema]
    where = f"{FEATURE_TS} <= $as_of"
    if view.ttl:
        where += f" AND {FEATURE_TS} >= $as_of - {interval_sql(view.ttl)}"
    return (
        f"SELECT {', '.join(keys)}, {FEATURE_TS}, {', '.join(feats)}\n"
        f"FROM {table.sql} f\nWHERE {where}\n"
        f"QUALIFY row_number() OVER (PARTITION BY {', '.join(keys)} "
        f"ORDER BY {FEATURE_TS} DESC, {CREATED_TS} DESC NULLS LAST) = 1\n"
        f"ORDER BY {', '.join(keys)}"
    )
