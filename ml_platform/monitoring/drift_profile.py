"""The reference side of drift detection, prepared once: each column's kind, its sorted values
(numeric) or category counts (categorical), null count, plot bins and summary figures.

`ReferenceProfile.from_frame(df)` is what `detect_drift(df, current)` computes internally; building
it once per model and passing it instead of the frame skips re-reading and re-sorting the reference
every day (`save`/`load` keep it in one .npz file). Also here: how a column's kind is inferred and
how values of either side are read as numbers or categories (`numeric_values`, `category_counts`).
One module of ~400 lines: kind inference, value reading and the profile's save/load are one
format (a profile stores what these readers produce), and splitting would separate the writer of
each field from its reader.

Kind inference (the reference's dtype decides; `numeric=` / `categorical=` override):
- bool, category, complex and other non-numeric dtypes: categorical (values compared as text);
- numeric dtypes, integers included: numeric (KS is valid for ordered discrete values, its p-value
  then conservative; an int-coded category such as a country code should be named in
  `categorical=`); timedelta: numeric, in seconds;
- text/object: numeric when every non-null value parses as a number ("numbers stored as text"),
  categorical otherwise (mixed-type objects compared as text, via str);
- datetime: skipped with a note (a later window always differs in time); `numeric=[col]` compares
  it as epoch microseconds;
- a categorical column that is identifier-like (more than `identifier_min_distinct` distinct values
  that are at least `identifier_unique_share` of its rows) is skipped with a note unless named in
  `categorical=`: every window would be "new categories" only.

About 400 lines on purpose: inference, reading and the stored profile share one per-column record.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from ml_platform.atomic_files import write_atomic
from ml_platform.monitoring import drift_stats

NUMERIC, CATEGORICAL = "numeric", "categorical"
# how a numeric column's values are read: plain numbers, parsed from text, datetimes as epoch µs, timedeltas as s
NUMBER, TEXT, DATETIME, TIMEDELTA = "number", "text", "datetime", "timedelta"
_NUMERIC_OBJECT_TYPES = ("integer", "floating", "mixed-integer-float", "decimal")
INVALID_EXAMPLES = 3


@dataclass
class ColumnProfile:
    """One reference column, ready to be compared with any number of current windows."""

    name: str
    kind: str | None  # numeric | categorical | None (skipped)
    dtype: str
    n_rows: int
    n_null: int
    read_as: str = NUMBER  # numeric only: number | text | datetime | timedelta
    values: np.ndarray | None = None  # numeric: sorted non-null values (inf kept)
    categories: np.ndarray | None = None  # categorical: labels (text), most frequent first
    counts: np.ndarray | None = None  # categorical: counts per label
    edges: np.ndarray | None = None  # numeric: bin edges (continuous) or the distinct values (discrete)
    discrete: bool = False  # numeric with at most `bins` distinct values: one bin per value
    n_invalid: int = 0  # reference values that are not numbers (excluded)
    notes: list[str] = field(default_factory=list)
    skip_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_values(self) -> int:
        """Non-null values the distribution test uses."""
        if self.kind == NUMERIC and self.values is not None:
            return len(self.values)
        if self.kind == CATEGORICAL and self.counts is not None:
            return int(self.counts.sum())
        return 0


def plot_counts(profile: ColumnProfile, sorted_values: np.ndarray) -> np.ndarray:
    """Counts of a sorted numeric array in the column's plot bins: discrete -> one per reference
    value, then "other values"; continuous -> below the first edge, the bins, above the last edge."""
    edges = profile.edges
    if edges is None or len(edges) == 0:
        return np.array([len(sorted_values)], dtype=np.int64)
    if profile.discrete or len(edges) == 1:
        per_value = drift_stats.value_counts_sorted(sorted_values, edges)
        return np.concatenate([per_value, [len(sorted_values) - per_value.sum()]])
    return drift_stats.bin_counts_sorted(sorted_values, edges)


# ----------------------------------------------------------------------------- reading values
def sorted_numeric_values(series: pd.Series, read_as: str) -> tuple[np.ndarray, int, int, list[str], list[str]]:
    """`numeric_values` with the values sorted (in place when they are already a private copy)."""
    values, n_null, n_invalid, examples, notes = numeric_values(series, read_as)
    private = values.flags.writeable and values.flags.owndata
    if private and isinstance(series.dtype, np.dtype):
        private = not np.may_share_memory(values, series.to_numpy())
    if private:
        values.sort()
    else:
        values = np.sort(values)
    return values, n_null, n_invalid, examples, notes


def numeric_values(series: pd.Series, read_as: str) -> tuple[np.ndarray, int, int, list[str], list[str]]:
    """(non-null values as a 1-D int64/float64 array, nulls, values that are not numbers, examples of
    those, notes) of `series` read as numbers the way the reference column was (`read_as`). The array
    may be the series' own memory: copy before changing it."""
    dtype = series.dtype
    notes: list[str] = []
    if read_as == DATETIME:  # epoch µs, naive times taken as UTC (as ml_platform.timestamps does)
        if ptypes.is_datetime64_any_dtype(dtype):
            parsed = pd.to_datetime(series, utc=True)
        else:
            parsed = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
            notes.append(f"{dtype} values parsed as datetimes")
        utc = parsed.dt.tz_localize(None).dt.as_unit("us")
        was_null = series.isna().to_numpy()
        bad = utc.isna().to_numpy() & ~was_null
        examples = [str(v) for v in series[bad].head(INVALID_EXAMPLES)]
        values = utc[~(was_null | bad)].to_numpy().view(np.int64)
        return values, int(was_null.sum()), int(bad.sum()), examples, notes
    if ptypes.is_bool_dtype(dtype):
        notes.append("booleans read as 0/1")
        nulls = series.isna().to_numpy()
        return series[~nulls].to_numpy(dtype=np.int64), int(nulls.sum()), 0, [], notes
    if ptypes.is_datetime64_any_dtype(dtype):
        nulls = int(series.isna().sum())
        examples = [str(v) for v in series.dropna().head(INVALID_EXAMPLES)]
        notes.append(f"{dtype} values where numbers were expected")
        return np.empty(0), nulls, len(series) - nulls, examples, notes
    if ptypes.is_timedelta64_dtype(dtype):
        return _finish(series, series.dt.total_seconds(), notes)
    if ptypes.is_numeric_dtype(dtype) and not ptypes.is_complex_dtype(dtype):
        if isinstance(dtype, np.dtype):
            arr = series.to_numpy()
            if dtype.kind == "f":
                nan = np.isnan(arr)
                n_null = int(np.count_nonzero(nan))
                return (arr[~nan] if n_null else arr), n_null, 0, [], notes
            target = np.float64 if dtype == np.uint64 else np.int64
            return arr.astype(target, copy=False), 0, 0, [], notes
        nulls = series.isna().to_numpy()
        target = np.float64 if ptypes.is_float_dtype(dtype) or "uint64" in str(dtype) else np.int64
        values = series[~nulls].to_numpy(dtype=target)
        if target is np.float64:
            values = values[~np.isnan(values)]
        return values, int(len(series) - len(values)), 0, [], notes
    if read_as != TEXT:
        notes.append(f"{dtype} values read as numbers")
    return _finish(series, pd.to_numeric(series, errors="coerce"), notes)


def _finish(original: pd.Series, parsed: pd.Series, notes: list[str]):
    """Split `parsed` (numbers, NA where `original` held no number) into values, nulls, invalid."""
    was_null = original.isna().to_numpy()
    bad = parsed.isna().to_numpy() & ~was_null
    n_invalid = int(bad.sum())
    examples = [str(v) for v in original[bad].head(INVALID_EXAMPLES)] if n_invalid else []
    keep = ~(was_null | bad)
    values = parsed[keep].to_numpy(dtype=np.int64 if ptypes.is_integer_dtype(parsed.dtype) else np.float64)
    return values, int(was_null.sum()), n_invalid, examples, notes


def category_counts(series: pd.Series) -> tuple[np.ndarray, np.ndarray, int]:
    """(labels as text, counts, nulls) of `series`, most frequent first. Values are compared as
    text (str): True and "True" are one category, as are 1 and "1"; nulls are not a category."""
    nulls = int(series.isna().sum())
    values = series.dropna()
    if ptypes.is_object_dtype(values.dtype):
        values = values.map(str)  # mixed types, unhashable values: one label per text
    counts = values.value_counts(sort=False)
    counts = counts[counts.to_numpy() > 0]
    labels = counts.index
    if not (ptypes.is_string_dtype(labels.dtype) and not ptypes.is_object_dtype(labels.dtype)):
        labels = pd.Index([str(v) for v in labels], dtype=object)
        if not labels.is_unique:
            counts = pd.Series(counts.to_numpy(), index=labels).groupby(level=0, sort=False).sum()
            labels = counts.index
    order = np.argsort(-counts.to_numpy(), kind="stable")
    return (np.asarray(labels, dtype=object)[order], counts.to_numpy(dtype=np.int64)[order], nulls)


# ----------------------------------------------------------------------------- kinds
def infer_kind(series: pd.Series) -> tuple[str | None, str, str | None]:
    """(kind, read_as, note) from the reference column; kind None means skipped (note says why)."""
    dtype = series.dtype
    if ptypes.is_bool_dtype(dtype) or isinstance(dtype, pd.CategoricalDtype) or ptypes.is_complex_dtype(dtype):
        return CATEGORICAL, NUMBER, None
    if ptypes.is_datetime64_any_dtype(dtype):
        return None, DATETIME, (f"skipped: {dtype} column (a later window always differs in time); "
                                "name it in numeric=[...] to compare it as epoch microseconds")
    if ptypes.is_timedelta64_dtype(dtype):
        return NUMERIC, TIMEDELTA, "durations compared in seconds"
    if ptypes.is_numeric_dtype(dtype):
        return NUMERIC, NUMBER, None
    if not (ptypes.is_string_dtype(dtype) or ptypes.is_object_dtype(dtype)):
        return CATEGORICAL, NUMBER, f"{dtype} values compared as text"
    sample = series.dropna().head(1000)
    if sample.empty:
        return CATEGORICAL, NUMBER, None
    inferred = ptypes.infer_dtype(sample, skipna=True)
    if inferred in ("string",) + _NUMERIC_OBJECT_TYPES:
        try:
            pd.to_numeric(sample)
        except (ValueError, TypeError):
            return CATEGORICAL, NUMBER, None
        parsed = pd.to_numeric(series, errors="coerce")
        if int(parsed.isna().sum()) == int(series.isna().sum()):
            what = "numbers stored as text" if inferred == "string" else "an object column of numbers"
            return NUMERIC, TEXT, f"{what}: compared as numbers"
        return CATEGORICAL, NUMBER, None
    if inferred.startswith("mixed"):
        kinds = sorted({type(v).__name__ for v in sample})
        return CATEGORICAL, NUMBER, f"mixed types ({', '.join(kinds)}) compared as text"
    return CATEGORICAL, NUMBER, None


# ----------------------------------------------------------------------------- building
def profile_column(series: pd.Series, name: str, *, kind: str | None = None, bins: int = 20,
                   identifier_unique_share: float = 0.5, identifier_min_distinct: int = 1000) -> ColumnProfile:
    """The profile of one reference column; `kind` forces numeric or categorical."""
    inferred, read_as, note = infer_kind(series)
    forced = kind is not None
    if forced:
        if kind == NUMERIC and inferred != NUMERIC:
            read_as = DATETIME if ptypes.is_datetime64_any_dtype(series.dtype) else TEXT
            note = "datetimes compared as epoch microseconds" if read_as == DATETIME else None
        elif kind == CATEGORICAL:
            note = None
        inferred = kind
    prof = ColumnProfile(name=str(name), kind=inferred, dtype=str(series.dtype), n_rows=len(series),
                         n_null=int(series.isna().sum()), read_as=read_as)
    if note:
        prof.notes.append(note)
    if inferred is None:
        prof.skip_reason = note
        return prof
    if inferred == NUMERIC:
        values, n_null, n_invalid, examples, notes = sorted_numeric_values(series, read_as)
        prof.values = values
        prof.n_null, prof.n_invalid = n_null, n_invalid
        prof.notes.extend(n for n in notes if n not in prof.notes)
        if n_invalid:
            prof.notes.append(f"{n_invalid} reference values are not numbers (excluded), e.g. {examples}")
        _numeric_layout(prof, bins)
        return prof
    labels, counts, n_null = category_counts(series)
    prof.categories, prof.counts, prof.n_null = labels, counts, n_null
    n_values = int(counts.sum())
    prof.stats = category_stats(labels, counts)
    if (not forced and len(labels) >= identifier_min_distinct
            and len(labels) >= identifier_unique_share * n_values):
        prof.skip_reason = (f"skipped: identifier-like ({len(labels):,} distinct values in {n_values:,} rows); "
                            "name it in categorical=[...] to compare it")
    return prof


def _numeric_layout(prof: ColumnProfile, bins: int) -> None:
    values = prof.values
    finite = finite_part(values)
    if len(finite) == 0:
        prof.edges = np.empty(0)
        prof.stats = numeric_stats(finite)
        return
    steps = finite[1:] != finite[:-1]
    if int(np.count_nonzero(steps)) + 1 <= bins:
        prof.edges = finite[np.concatenate([[0], np.flatnonzero(steps) + 1])]
        prof.discrete = True
    else:
        prof.edges = drift_stats.quantile_edges(finite, bins)
    prof.stats = numeric_stats(finite)


def finite_part(sorted_values: np.ndarray) -> np.ndarray:
    """The finite slice of a sorted NaN-free array (infinities sit at its ends)."""
    if sorted_values.dtype.kind != "f" or len(sorted_values) == 0:
        return sorted_values
    lo = int(np.searchsorted(sorted_values, -np.inf, side="right"))
    hi = int(np.searchsorted(sorted_values, np.inf, side="left"))
    return sorted_values[lo:hi]


def numeric_stats(finite_sorted: np.ndarray) -> dict[str, Any]:
    if len(finite_sorted) == 0:
        return {"mean": None, "std": None, "min": None, "median": None, "max": None}
    n = len(finite_sorted)
    mean = float(finite_sorted.sum(dtype=np.float64)) / n
    squares, chunk = 0.0, 1 << 16
    buffer = np.empty(min(chunk, n))
    for lo in range(0, n, chunk):  # two-pass variance in cache-sized pieces: no 8-byte-per-row temporary
        part = buffer[: min(chunk, n - lo)]
        np.subtract(finite_sorted[lo:lo + chunk], mean, out=part)
        np.multiply(part, part, out=part)  # not np.dot: BLAS may start threads for it
        squares += float(part.sum())
    return {
        "mean": mean,
        "std": math.sqrt(squares / n),
        "min": float(finite_sorted[0]),
        "median": float((finite_sorted[(len(finite_sorted) - 1) // 2] + finite_sorted[len(finite_sorted) // 2]) / 2),
        "max": float(finite_sorted[-1]),
    }


def category_stats(labels: np.ndarray, counts: np.ndarray, top: int = 5) -> dict[str, Any]:
    total = int(counts.sum())
    order = np.argsort(-counts, kind="stable")[:top]
    return {
        "distinct": len(labels),
        "top": [{"category": str(labels[i]), "share": float(counts[i] / total)} for i in order] if total else [],
    }


# ----------------------------------------------------------------------------- the profile
def select_columns(reference_columns: list[Any], columns, categorical, numeric) -> tuple[list[Any], dict[Any, str]]:
    """(columns to compare, forced kinds) after checking every name against the reference."""
    for arg, names in (("columns", columns), ("categorical", categorical), ("numeric", numeric)):
        if isinstance(names, str):
            raise TypeError(f"{arg} must be a list of column names, got the string {names!r}")
    known = list(reference_columns)
    duplicated = sorted({str(c) for c in known if known.count(c) > 1})
    if duplicated:
        raise ValueError(f"reference: duplicated column names {duplicated}")
    chosen = known if columns is None else list(columns)
    for arg, names in (("columns", chosen), ("categorical", categorical or []), ("numeric", numeric or [])):
        unknown = [c for c in names if c not in known]
        if unknown:
            raise ValueError(f"{arg}: {unknown} not in the reference columns {known[:20]}")
    both = sorted(set(categorical or []) & set(numeric or []), key=str)
    if both:
        raise ValueError(f"columns {both} are named in both categorical= and numeric=")
    forced = {c: CATEGORICAL for c in categorical or []} | {c: NUMERIC for c in numeric or []}
    return list(dict.fromkeys(chosen)), forced


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class ReferenceProfile:
    """Every reference column prepared for comparison (see the module docstring)."""

    columns: dict[str, ColumnProfile]
    n_rows: int
    bins: int

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, *, columns=None, categorical=None, numeric=None,
                   thresholds=None, workers: int | None = None) -> ReferenceProfile:
        """Profile `frame`'s columns (default all) with `thresholds` (a DriftThresholds)."""
        from ml_platform.monitoring.drift import DriftThresholds

        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"reference must be a pandas DataFrame, got {type(frame).__name__}")
        t = thresholds or DriftThresholds()
        names, forced = select_columns(list(frame.columns), columns, categorical, numeric)

        def one(name):
            return profile_column(frame[name], name, kind=forced.get(name), bins=t.numeric_bins,
                                  identifier_unique_share=t.identifier_unique_share,
                                  identifier_min_distinct=t.identifier_min_distinct)

        workers = workers or default_workers()
        if workers > 1 and len(names) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                profiles = list(pool.map(one, names))
        else:
            profiles = [one(n) for n in names]
        return cls(columns={p.name: p for p in profiles}, n_rows=len(frame), bins=t.numeric_bins)

    # ------------------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to one .npz file (numpy arrays, no pickle), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {"n_rows": self.n_rows, "bins": self.bins, "columns": []}
        for i, col in enumerate(self.columns.values()):
            entry = {k: getattr(col, k) for k in ("name", "kind", "dtype", "n_rows", "n_null", "read_as",
                                                  "discrete", "n_invalid", "notes", "skip_reason", "stats")}
            for key in ("values", "counts", "edges"):
                value = getattr(col, key)
                if value is not None:
                    arrays[f"{i}.{key}"] = value
            if col.categories is not None:
                arrays[f"{i}.categories"] = np.asarray([str(c) for c in col.categories], dtype=str)
            meta["columns"].append(entry)
        arrays["meta"] = np.asarray(json.dumps(meta))

        def savez(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a path
                np.savez(f, **arrays)

        return write_atomic(path, savez)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceProfile:
        with np.load(Path(path), allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            columns = {}
            for i, entry in enumerate(meta["columns"]):
                col = ColumnProfile(**entry)
                for key in ("values", "counts", "edges"):
                    if f"{i}.{key}" in data:
                        setattr(col, key, data[f"{i}.{key}"])
                if f"{i}.categories" in data:
                    col.categories = data[f"{i}.categories"].astype(object)
                columns[col.name] = col
        return cls(columns=columns, n_rows=int(meta["n_rows"]), bins=int(meta["bins"]))
