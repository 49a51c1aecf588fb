"""Batch scoring's looked-up features by row number: the point-in-time join answers with the
matching feature row's number, and the values are then read by that number.

Why: DuckDB's ASOF join carries every feature column through both of its sorts, and the answers
must be sorted back into event order and stored; for the user view of a 10M-row day (16 features)
that is ~37 CPU seconds, while the same join carrying one number is ~6 (measured alone; the
day's figures are in docs/batch.md).
So, for a view read from Parquet files (`FeatureStore.numbered_feature_table`: an aggregated
view's materialized table, or a raw source such as the card holders' profile):

1. the offline store's own point-in-time SQL (`offline.point_in_time_sql`, what
   `get_historical_features` runs) answers each event with ONE "feature": the matched row's number
   in the files (`offline.FILE_ROW`: the rows of the files before + the row within its file). The
   same keys, time order, ties, TTL (an expired match answers null) and null rules as every other
   consumer: nothing of the join is re-implemented here;
2. each feature column is read from the Parquet files (only the row groups that hold a matched
   row) and gathered by those numbers into event order, on as many threads as DuckDB has: the
   value of the matched row, null where the join answered null or the value is null. A text
   column is read as a dictionary and its codes are gathered (the dictionary stays in memory);
3. the gathered columns are written to raw files (values and validity) in the staging folder, and
   each chunk of events reads its row range back (`PositionalView.read`): memory is a few columns
   of the day, not the day's features.

A column whose type in a file is not the view's declared one (DuckDB's CAST would convert it),
or that is not numeric, boolean or text, makes the view take the wide join instead (`batch_features`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml_platform.featurestore import offline

# The view's declared DuckDB type -> the Arrow type DuckDB returns it as (the wide join's types).
ARROW_TYPES = {
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "VARCHAR": pa.string(),  # gathered as dictionary codes
}


_ANSWER_BATCH_ROWS = 1_000_000  # the join's answers are put in event order this many at a time
_BLOCK_BITS = 6  # 2**6 = 64 rows per entry of the map of matched rows (`_row_groups`)


@dataclass
class PositionalView:
    """One view's answers for the day as raw column files (`folder/<i>.values`, `.valid`), in
    event order; `read(lo, hi)` gives the rows [lo, hi) as Arrow arrays. A text column's values
    are codes into its entry of `dictionaries`."""

    features: tuple[str, ...]
    types: tuple[pa.DataType, ...]
    folder: Path
    dictionaries: dict[int, pa.Array] = field(default_factory=dict)
    _files: list = field(default_factory=list, repr=False)

    def read(self, lo: int, hi: int) -> list[pa.Array]:
        if not self._files:
            self._files = [
                (open(self.folder / f"{i}.values", "rb"), open(self.folder / f"{i}.valid", "rb"))  # noqa: SIM115 (closed by close())
                for i in range(len(self.features))
            ]
        out = []
        for i, ((values_file, valid_file), arrow_type) in enumerate(zip(self._files, self.types)):
            values = _read(values_file, _numpy_type(arrow_type), lo, hi)
            valid = _read(valid_file, np.bool_, lo, hi)
            if i in self.dictionaries:
                out.append(self.dictionaries[i].take(pa.array(values, mask=~valid)))
            else:
                out.append(pa.array(values, type=arrow_type, mask=~valid))
        return out

    def close(self) -> None:
        for values_file, valid_file in self._files:
            values_file.close()
            valid_file.close()
        self._files = []


def usable_types(files: list[Path], features: list[str], declared: dict[str, str]) -> tuple | None:
    """The Arrow types of `features` if every one is stored in every file as the view declares it
    and is numeric, boolean or text (else None: the wide join)."""
    schemas = [pq.ParquetFile(f).schema_arrow for f in files]
    types = []
    for f in features:
        wanted = ARROW_TYPES.get(declared[f])
        if wanted is None or any(s.get_field_index(f) < 0 or s.field(f).type != wanted for s in schemas):
            return None
        types.append(wanted)
    return tuple(types)


def stage_positional(
    con,
    view,
    table: offline.FeatureTable,
    files: list[Path],
    features: list[str],
    types: tuple,
    n_events: int,
    folder: Path,
    threads: int = 1,
) -> PositionalView:
    """Join the day's entity rows (`offline.ENTITY_TABLE` on `con`) to the numbered table
    `table` (already cut to the rows that can answer the day; its `offline.FILE_ROW` numbers the
    rows of `files` in that order), then gather every feature into event order under `folder`
    (see the module docstring)."""
    sql = offline.point_in_time_sql(table, [(offline.FILE_ROW, offline.FILE_ROW)])
    by_row = np.full(n_events, -2, dtype=np.int64)  # each event's matched file row, -1 for none
    answered = 0
    # put in event order batch by batch as DuckDB streams them (no table of the day's answers)
    for batch in con.sql(sql).to_arrow_reader(_ANSWER_BATCH_ROWS):
        by_row[batch.column(offline.ROW_ID).to_numpy()] = pc.fill_null(
            batch.column(offline.FILE_ROW), -1
        ).to_numpy()
        answered += batch.num_rows
    if answered != n_events:
        raise RuntimeError(
            f"point-in-time join for feature view {view.name!r} answered {answered} of {n_events} "
            "events; this is a bug in batch scoring"
        )
    if (by_row == -2).any():
        raise RuntimeError(
            f"point-in-time join for feature view {view.name!r} did not answer every event once; "
            "this is a bug in batch scoring"
        )
    parquets = [pq.ParquetFile(f) for f in files]
    picks, index = _row_groups(parquets, by_row)
    folder.mkdir(parents=True, exist_ok=True)
    answered = by_row >= 0
    dictionaries: dict[int, pa.Array] = {}

    def gather(i: int) -> None:
        text = types[i] == pa.string()
        if any(picks):
            column = _read_column(files, picks, features[i], text)
            if text:  # the codes are gathered; the values stay in the dictionary
                dictionaries[i] = column.dictionary.cast(pa.string())
                column = column.indices
            if column.null_count:  # null where the join answered null or the value is null
                valid = column.is_valid().to_numpy(zero_copy_only=False)
                fill = False if types[i] == pa.bool_() else 0
                values = pc.fill_null(column, fill).to_numpy(zero_copy_only=False)
                ok = valid[index] & answered
            else:  # no null value (the common case): null where the join answered null
                values, ok = column.to_numpy(zero_copy_only=False), answered
            del column
            gathered = values[index]
        else:  # no event matched a row: every answer is null
            gathered, ok = np.zeros(n_events, dtype=_numpy_type(types[i])), np.zeros(n_events, dtype=bool)
            if text:
                dictionaries[i] = pa.array([], pa.string())
        gathered.tofile(folder / f"{i}.values")
        ok.tofile(folder / f"{i}.valid")

    # reading, gathering and writing release the GIL: one column per thread
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="batch-gather") as pool:
        list(pool.map(gather, range(len(features))))
    return PositionalView(tuple(features), types, folder, dictionaries)


def _read_column(files: list[Path], picks: list[list[int]], name: str, text: bool) -> pa.Array:
    """Column `name` of the picked row groups of `files`, one after the other (a text column as a
    dictionary array with one dictionary)."""
    chunks = []
    for path, groups in zip(files, picks):
        if groups:
            parquet = pq.ParquetFile(path, read_dictionary=[name] if text else None)
            chunks += parquet.read_row_groups(groups, columns=[name]).column(name).chunks
    column = pa.chunked_array(chunks)
    return (column.unify_dictionaries() if text else column).combine_chunks()


def _row_groups(parquets: list[pq.ParquetFile], by_row: np.ndarray) -> tuple[list[list[int]], np.ndarray]:
    """(per file, the row groups holding a matched row; each event's index into those groups' rows
    read one after the other, file after file; 0 for an unmatched event). `by_row` numbers the
    rows of the files one after the other. Only these groups are read: on a long history the
    day's matches sit in a few of them. Which groups hold a match is found on a map of blocks of
    64 rows (a block across two groups counts for both: one group too many may be read);
    when every group is read (a short history) the file row is the index, no division needed."""
    sizes = np.array(
        [p.metadata.row_group(g).num_rows for p in parquets for g in range(p.metadata.num_row_groups)],
        dtype=np.int64,
    )
    starts = np.concatenate([[0], np.cumsum(sizes)])
    answered = by_row >= 0
    position = np.where(answered, by_row, 0)
    blocks = np.zeros((int(starts[-1]) >> _BLOCK_BITS) + 1, dtype=bool)
    blocks[by_row[answered] >> _BLOCK_BITS] = True
    needed = np.array(
        [
            n > 0 and blocks[a >> _BLOCK_BITS : ((a + n - 1) >> _BLOCK_BITS) + 1].any()
            for a, n in zip(starts[:-1], sizes)
        ],
        dtype=bool,
    )
    groups = np.flatnonzero(needed)
    if len(groups) == len(sizes):
        index = position
    else:
        if len(sizes) and (sizes[:-1] == sizes[0]).all():  # equal groups (as writers make them): divide
            group_of = np.minimum(position // max(int(sizes[0]), 1), len(sizes) - 1)
        else:
            group_of = np.searchsorted(starts, position, side="right") - 1
        compact = np.zeros(len(sizes), dtype=np.int64)  # where each kept group starts, kept rows
        compact[groups] = np.concatenate([[0], np.cumsum(sizes[groups])[:-1]]) if len(groups) else []
        index = np.where(answered, by_row - starts[group_of] + compact[group_of], 0)
    picks, first = [], 0  # the kept groups, by file, numbered within their file
    for p in parquets:
        n = p.metadata.num_row_groups
        picks.append([int(g) - first for g in groups if first <= g < first + n])
        first += n
    return picks, index


def _numpy_type(arrow_type: pa.DataType):
    """How a column is stored in its staging file (a text column: its dictionary codes)."""
    if arrow_type == pa.string():
        return np.int32
    return np.bool_ if arrow_type == pa.bool_() else arrow_type.to_pandas_dtype()


def _read(handle, dtype, lo: int, hi: int) -> np.ndarray:
    itemsize = np.dtype(dtype).itemsize
    handle.seek(lo * itemsize)
    out = np.fromfile(handle, dtype=dtype, count=hi - lo)
    if len(out) != hi - lo:
        raise RuntimeError(f"{handle.name}: read {len(out)} of rows {lo}..{hi}; the staging file is short")
    return out
