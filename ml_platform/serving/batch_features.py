"""Batch scoring's day-level point-in-time features, inside one staging DuckDB connection.

* `events_relation`: the day's raw Parquet files as a relation numbered 0..n-1 in file order
  (rows of the files before + the row number within the file: no sort, no copy).
* `stage_features`: per feature view the model reads, the offline store's own point-in-time SQL
  (`offline.point_in_time_sql`, what `get_historical_features` runs for training sets) at
  `features.feature_lookup_time(event_timestamp)`, over the store's checked feature table cut to
  the rows that can answer the day: event time in [first lookup - ttl, last lookup]. A row older
  than that is past the TTL of every lookup of the day (it would be answered null either way) and
  a younger one is after every lookup, so the answers do not change. Each view's answers are
  stored ordered by row number; a view with no rows in that range answers null without a join.
  A view read from Parquet files (its materialized table, or a raw source) is joined carrying
  only the matched row's number, and its values are then read by that number
  (`batch_positions`: ~6x less CPU for a view of many features); the others (a CSV source, a
  column stored in another type than declared) carry their features through the join.
* `chunk_reader`: the events and every view's answers side by side (DuckDB's POSITIONAL JOIN of
  relations that are all in row order, plus the by-number views' row ranges), streamed in Arrow
  batches of `chunk_rows`, each checked to line up (the row numbers of every view equal the
  events', and the events' are consecutive).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.featurestore.definitions import parse_feature_ref
from ml_platform.serving.batch_positions import PositionalView, stage_positional, usable_types
from ml_platform.serving.predictions_db import TRANSACTION_ID

ROW = "__row"  # the events' row number (file order)
EVENT_US = "__event_us"  # the event time as int64 µs since the epoch, UTC
ENTITY_VIEW = offline.ENTITY_TABLE  # the entity-rows relation point_in_time_sql joins from
ENTITY_ROW_ID = offline.ROW_ID
REQUIRED = (TRANSACTION_ID, "user_id", "merchant_id", fr.EVENT_TS)


@dataclass(frozen=True)
class StagedView:
    """One feature view's answers for the day: `table` (ordered by row number), or `positional`
    (read by row range), or neither when the view had no row that could answer (every answer
    null); its features and their DuckDB types."""

    view: str
    table: str | None
    features: tuple[str, ...]
    types: tuple[str, ...]
    seconds: float = 0.0  # the join's wall time
    positional: PositionalView | None = None


def events_relation(con, files: Sequence[Path], request_columns: Sequence[str]) -> tuple[str, int, list[str]]:
    """(SQL of the day's events numbered in file order, number of rows, columns read). Checks the
    columns exist and that the required ones hold no NULL (ValueError naming them)."""
    what = f"raw transactions {files[0].parent}"
    needed = list(dict.fromkeys([*REQUIRED, *request_columns]))
    paths = [str(f) for f in files]
    scan = f"read_parquet([{', '.join(offline.quote_literal(p) for p in paths)}], filename = true, file_row_number = true)"
    available = offline.relation_columns(con, scan, what=what)
    offline.require_columns(
        available, needed, what=what, hint="The raw data contract is documented in ml_platform/sources."
    )
    row, total = offline.file_row_sql(paths)
    ts = f"CAST({offline.quote_identifier(fr.EVENT_TS)} AS TIMESTAMPTZ)"
    cols = ", ".join(
        f"{ts} AS {fr.EVENT_TS}" if c == fr.EVENT_TS else offline.quote_identifier(c) for c in needed
    )
    sql = f"(SELECT {row} AS {ROW}, {cols}, epoch_us({ts}) AS {EVENT_US} FROM {scan})"
    checks = ", ".join(f"count(*) FILTER (WHERE {offline.quote_identifier(c)} IS NULL)" for c in REQUIRED)
    nulls = dict(zip(REQUIRED, con.execute(f"SELECT {checks} FROM {sql}").fetchall()[0]))
    bad = {c: n for c, n in nulls.items() if n}
    if bad:
        raise ValueError(
            f"{what} has NULLs in required columns {bad} (column: rows); fix the partition (the "
            "validation asset names the rows) and score again"
        )
    return sql, total, needed


def stage_features(
    con, store, feature_refs: Sequence[str], events_sql: str, columns_dir: Path | None = None
) -> list[StagedView]:
    """Run the point-in-time join of every view the refs read for all events of the day, into
    staging tables in row order, or (views read from Parquet files, when `columns_dir` is given)
    into column files under `columns_dir` (see the module docstring)."""
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
    lookup_ts = f"{fr.EVENT_TS} - {offline.interval_sql(fr.FEATURE_LOOKUP_OFFSET)}"
    con.execute(
        f"CREATE TEMP TABLE {ENTITY_VIEW} AS SELECT {ROW} AS {ENTITY_ROW_ID}, "
        f"{', '.join(offline.quote_identifier(k) for k in keys)}, {lookup_ts} AS {offline.ENTITY_TS} FROM {events_sql}"
    )
    first, last, n_events = con.execute(
        f"SELECT min({offline.ENTITY_TS}), max({offline.ENTITY_TS}), count(*) FROM {ENTITY_VIEW}"
    ).fetchall()[0]
    staged = []
    for i, (view, features) in enumerate(zip(views, by_view.values())):
        started = time.perf_counter()
        types = {f.name: f.dtype.duckdb_type for f in view.schema}
        numbered = store.numbered_feature_table(con, view) if columns_dir is not None else None
        arrow_types = numbered and usable_types(numbered[1], features, types)
        # the table's checks (materialized from the current definition) run in either call
        table = numbered[0] if arrow_types else store.feature_table(con, view)
        window = _answering_rows(table, first, last)
        name, positional = None, None
        try:
            if con.execute(f"SELECT count(*) FROM {window.sql}").fetchall()[0][0]:
                if arrow_types:  # joined by row number, the values gathered by it
                    folder = columns_dir / f"view_{i}"
                    positional = stage_positional(
                        con, view, window, numbered[1], features, arrow_types, n_events, folder, _threads(con)
                    )
                else:  # the join carries the features
                    name = f"features_{i}"
                    sql = offline.point_in_time_sql(window, [(f, f) for f in features])
                    con.execute(f"CREATE TABLE {name} AS SELECT * FROM ({sql}) ORDER BY {ENTITY_ROW_ID}")
        except duckdb.Error as exc:
            raise RuntimeError(f"point-in-time join for feature view {view.name!r} failed: {exc}") from exc
        staged.append(
            StagedView(
                view.name,
                name,
                tuple(features),
                tuple(types[f] for f in features),
                time.perf_counter() - started,
                positional,
            )
        )
    return staged


def _threads(con) -> int:
    """DuckDB's threads on this connection (the gathers use as many)."""
    return int(con.execute("SELECT current_setting('threads')").fetchall()[0][0])


def _answering_rows(table: offline.FeatureTable, first, last) -> offline.FeatureTable:
    """The feature table cut to the rows that can answer a lookup in [first, last]."""
    if first is None:  # no events
        return table
    bounds = [f"{offline.FEATURE_TS} <= {_ts_literal(last)}"]
    if table.view.ttl:
        bounds.append(
            f"{offline.FEATURE_TS} >= {_ts_literal(first)} - {offline.interval_sql(table.view.ttl)}"
        )
    sql = f"(SELECT * FROM {table.sql} WHERE {' AND '.join(bounds)})"
    return offline.FeatureTable(table.view, sql, table.has_ties)


def _ts_literal(value) -> str:
    return f"{offline.quote_literal(value.isoformat())}::TIMESTAMPTZ"


def chunk_reader(
    con, events_sql: str, columns: Sequence[str], staged: Sequence[StagedView], chunk_rows: int
) -> Iterator[pa.RecordBatch]:
    """Batches of the events (`ROW`, `columns`, `EVENT_US`) with every staged feature column, in
    row order, of `chunk_rows` rows (the last one shorter)."""
    select = [f"e.{ROW}", *(f"e.{offline.quote_identifier(c)}" for c in columns), f"e.{EVENT_US}"]
    joins, checks = [f"{events_sql} e"], []
    positional = [sv for sv in staged if sv.positional is not None]
    for i, sv in enumerate(staged):
        if sv.positional is not None:
            continue  # read by row range below
        if sv.table is None:
            select += [
                f"CAST(NULL AS {t}) AS {offline.quote_identifier(f)}" for f, t in zip(sv.features, sv.types)
            ]
            continue
        alias = f"f{i}"
        joins.append(f"{sv.table} {alias}")
        select += [f"{alias}.{offline.quote_identifier(f)}" for f in sv.features]
        select.append(f"{alias}.{ENTITY_ROW_ID} AS __check_{i}")
        checks.append((f"__check_{i}", sv.view))
    sql = f"SELECT {', '.join(select)} FROM {' POSITIONAL JOIN '.join(joins)}"
    names = [ROW, *columns, EVENT_US, *(f for sv in staged for f in sv.features)]  # the SQL's order

    def whole(batch: pa.RecordBatch) -> pa.RecordBatch:
        batch = _checked(batch, checks)
        if not positional:
            return batch
        arrays = dict(zip(batch.schema.names, batch.columns))
        lo = _consecutive_rows(batch)
        for sv in positional:
            arrays.update(zip(sv.features, sv.positional.read(lo, lo + batch.num_rows)))
        return pa.RecordBatch.from_arrays([arrays[n] for n in names], names=names)

    reader = con.sql(sql).to_arrow_reader(chunk_rows)
    pending: list[pa.RecordBatch] = []
    size = 0
    try:
        for batch in reader:
            pending.append(batch)
            size += batch.num_rows
            while size >= chunk_rows:
                chunk, pending, size = _take(pending, chunk_rows)
                yield whole(chunk)
        if size:
            yield whole(pa.Table.from_batches(pending).combine_chunks().to_batches()[0])
    finally:
        for sv in positional:
            sv.positional.close()


def _consecutive_rows(batch: pa.RecordBatch) -> int:
    """The first row number of a chunk whose rows are consecutive (RuntimeError otherwise)."""
    rows = batch.column(ROW).to_numpy()
    lo = int(rows[0]) if len(rows) else 0
    if not np.array_equal(rows, np.arange(lo, lo + len(rows), dtype=rows.dtype)):
        raise RuntimeError(
            f"the day's events came out of order (rows {rows[0]}..{rows[-1]}); this is a bug in batch scoring"
        )
    return lo


def _take(batches: list[pa.RecordBatch], n: int) -> tuple[pa.RecordBatch, list[pa.RecordBatch], int]:
    table = pa.Table.from_batches(batches)
    head = table.slice(0, n).combine_chunks().to_batches()
    rest = table.slice(n).to_batches()
    return head[0], [b for b in rest if b.num_rows], table.num_rows - n


def _checked(batch: pa.RecordBatch, checks: list[tuple[str, str]]) -> pa.RecordBatch:
    rows = batch.column(ROW)
    for column, view in checks:
        if not batch.column(column).equals(rows):
            raise RuntimeError(
                f"staged features of view {view!r} do not line up with the events of rows "
                f"{rows[0]}..{rows[-1]}; this is a bug in batch scoring"
            )
    names = [n for n in batch.schema.names if not n.startswith("__check_")]
    return batch.select(names)
