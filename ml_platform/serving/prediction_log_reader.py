"""Reading the prediction log (layout and schema: `prediction_log`): the one place monitoring and
label joining read predictions from, whichever path made them.

`read_prediction_log` selects files by their folders (source, day) before opening any, reads
them with pyarrow and unions them by column name: files of different model versions hold
different `feature.*` columns (a column a file lacks is null in its rows; a feature numeric in
one file and text in another is read as text). Files of the first layout
(`<log dir>/date=D/`, API only, inputs as one JSON column) that no drain has moved yet are read
as api rows in the current schema.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml_platform.serving.prediction_log import (
    FEATURE_PREFIX,
    LIVE,
    LOG_COLUMNS,
    LOG_SCHEMA,
    ROLE_COLUMN,
    SOURCE_COLUMN,
    SOURCES,
    check_source,
    legacy_table,
    source_dir,
)
from ml_platform.sources.raw_events import parse_date

DATE_COLUMN = "date"  # the file's day folder: log day (api, stream), scored day (batch)
FEATURES_COLUMN = "features"  # with expand_features=False: the model inputs as one JSON object
_INTEGERS = {pa.int64(): pd.Int64Dtype()}  # integer columns stay integers when some rows are null


def read_prediction_log(
    log_dir: str | os.PathLike,
    *,
    start: date | str | None = None,
    end: date | str | None = None,
    sources: Sequence[str] | None = None,
    expand_features: bool = True,
    with_features: bool = True,
    roles: Sequence[str] | None = (LIVE,),
) -> pd.DataFrame:
    """Every logged prediction of the `sources` (default: all of SOURCES) whose day folder is in
    [start, end] (both included; None: unbounded), as one frame: LOG_SCHEMA's columns (`source`
    first), `date` (the day folder: the log day for api/stream, the scored day for batch; select
    by the transaction's day with `event_timestamp`), then the model inputs.

    expand_features=True: one column per model input, named `FEATURE_PREFIX + input`
    ("feature.amount": the log's request columns and the inputs share names, the prefix keeps
    them apart), float64 or text, null where a row's model did not read it. False: the inputs as
    one `features` column of JSON objects (each row's own inputs, nulls included).
    with_features=False: no model inputs at all (not even read from disk): for readers of the
    predictions alone (latency, counts), which would otherwise pay for every input column.
    roles: the predictions' roles to keep (default: the live ones, what callers were answered
    with; a file without roles holds live ones only); None: every row, shadow ones included.
    Rows come source by source (SOURCES' order), day by day, in log order within a day.
    An empty selection gives an empty frame with the same columns (no feature columns)."""
    first = parse_date(start, "start") if start is not None else None
    last = parse_date(end, "end") if end is not None else None
    if isinstance(sources, str):  # one source
        sources = [sources]
    wanted = [check_source(s) for s in (SOURCES if sources is None else sources)]
    tables = []
    for source, day, path in _files(Path(log_dir), wanted, first, last):
        columns = None
        if not with_features:
            columns = [n for n in pq.read_schema(path).names if not n.startswith(FEATURE_PREFIX)]
        table = pq.read_table(path, columns=columns)
        if SOURCE_COLUMN not in table.column_names:  # the first layout
            table = legacy_table(table, source)
        if not with_features:
            table = table.select([n for n in table.column_names if not n.startswith(FEATURE_PREFIX)])
        table = table.append_column(DATE_COLUMN, pa.repeat(pa.scalar(day, pa.date32()), table.num_rows))
        tables.append(table if expand_features or not with_features else _features_as_json(table))
    table = _union(tables, expand_features or not with_features)
    if roles is not None and table.num_rows:
        role = pc.fill_null(table.column(ROLE_COLUMN), LIVE)
        table = table.filter(pc.is_in(role, value_set=pa.array(list(roles), pa.string())))
    return table.to_pandas(types_mapper=_INTEGERS.get)


def model_input_frame(log: pd.DataFrame, input_columns: Sequence[str]) -> pd.DataFrame:
    """A model's inputs from a `read_prediction_log` frame (expand_features=True), under their own
    names (`FEATURE_PREFIX` dropped), in `input_columns`' order; inputs no row logged are left out."""
    present = [c for c in input_columns if FEATURE_PREFIX + c in log.columns]
    frame = log[[FEATURE_PREFIX + c for c in present]].reset_index(drop=True)
    return frame.set_axis(present, axis=1)


def logged_days(log_dir: str | os.PathLike) -> dict[str, list[date]]:
    """The days each source has files for ({source: sorted days}, every source of SOURCES)."""
    found: dict[str, set[date]] = {s: set() for s in SOURCES}
    for source, day, _path in _files(Path(log_dir), list(SOURCES), None, None):
        found[source].add(day)
    return {s: sorted(days) for s, days in found.items()}


# --------------------------------------------------------------------------- internals


def _files(log_dir: Path, sources: list[str], first: date | None, last: date | None):
    """(source, day, path) of the selected files, in reading order."""
    for source in SOURCES:
        if source not in sources:
            continue
        folders = list(source_dir(log_dir, source).glob("date=*"))
        if source == "api":
            folders += list(log_dir.glob("date=*"))  # the first layout, not migrated yet
        by_day: dict[date, dict[str, Path]] = {}
        for folder in sorted(folders, key=lambda f: f.parent == log_dir):  # migrated copies win
            try:
                day = date.fromisoformat(folder.name.removeprefix("date="))
            except ValueError:
                continue
            if (first is None or day >= first) and (last is None or day <= last):
                files = by_day.setdefault(day, {})
                for path in folder.glob("*.parquet"):  # (a file migrated but not yet deleted: once)
                    files.setdefault(path.name, path)
        for day in sorted(by_day):
            for path in sorted(by_day[day].values(), key=_file_order):
                yield source, day, path


def _file_order(path: Path) -> tuple:
    """Drained files in stream id order (`part-<ms>-<seq>_<ms>-<seq>`), others by name."""
    try:
        ms, seq = path.stem.removeprefix("part-").split("_", 1)[0].split("-")
        return (0, int(ms), int(seq), path.name)
    except ValueError:
        return (1, 0, 0, path.name)


def _features_as_json(table: pa.Table) -> pa.Table:
    names = [n for n in table.column_names if n.startswith(FEATURE_PREFIX)]
    keys = [n.removeprefix(FEATURE_PREFIX) for n in names]
    rows = (
        zip(*(table.column(n).to_pylist() for n in names)) if names else ([] for _ in range(table.num_rows))
    )
    text = [orjson.dumps(dict(zip(keys, row))).decode() for row in rows]
    return table.drop_columns(names).append_column(FEATURES_COLUMN, pa.array(text, pa.string()))


def _union(tables: list[pa.Table], expand_features: bool) -> pa.Table:
    """The tables in one schema: LOG_SCHEMA, date, then the other columns by first appearance."""
    fixed = [*LOG_SCHEMA, pa.field(DATE_COLUMN, pa.date32())]
    if not expand_features:
        fixed.append(pa.field(FEATURES_COLUMN, pa.string()))
    extra: dict[str, pa.DataType] = {}
    for table in tables:
        for field in table.schema:
            if field.name in LOG_COLUMNS or field.name in (DATE_COLUMN, FEATURES_COLUMN):
                continue
            known = extra.get(field.name)
            if known is None or pa.types.is_null(known):
                extra[field.name] = field.type
            elif not pa.types.is_null(field.type) and field.type != known:
                extra[field.name] = pa.string()  # numeric here, text there: read as text
    # a feature null in every selected row: float64 (NaN), the type of most model inputs
    extra = {n: pa.float64() if pa.types.is_null(t) else t for n, t in extra.items()}
    schema = pa.schema([*fixed, *(pa.field(n, t) for n, t in extra.items())])
    if not tables:
        return schema.empty_table()
    conformed = []
    for table in tables:
        columns = []
        for field in schema:
            if field.name in table.column_names:
                column = table.column(field.name)
                if column.type != field.type:
                    column = (
                        column.cast(field.type) if not pa.types.is_string(field.type) else _as_text(column)
                    )
                columns.append(column)
            else:
                columns.append(pa.nulls(table.num_rows, field.type))
        conformed.append(pa.Table.from_arrays(columns, schema=schema))
    return pa.concat_tables(conformed)


def _as_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pa.chunked_array(
            [pa.array([None if v is None else str(v) for v in column.to_pylist()], pa.string())]
        )
