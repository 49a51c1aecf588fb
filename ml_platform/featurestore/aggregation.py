"""Compile a feature view's `Aggregation` declarations to one DuckDB SQL query over its raw source.

The value of an aggregation at a source row with time t is `function(column)` over the same
entity's source rows with time in [t - window, t] (both ends included, the row itself and rows
with the same time included): a window `RANGE BETWEEN <window> PRECEDING AND CURRENT ROW` ordered
by the source's timestamp field. Rows whose timestamp is NULL (e.g. a label not arrived yet) or
whose join key is NULL are skipped. The result has one row per (join keys, time): rows with equal
times are window peers with equal values, so they collapse to one. Columns: join keys,
`event_timestamp`, `created_timestamp` (latest created time among the collapsed rows; NULL when
the source has none) and the features.

Each aggregation function maps to SQL in one small function below; the stream updater mirrors
these one by one (count: +1 per row, sum/mean: sums over the window, min/max: its extremes). A sum
or mean declared with `decimals` adds the column's integer units (`ml_platform.fixed_point`,
computed once per row in `source_rows`), so every engine's sum is exact and the same.
The query is one template for every engine: a `Dialect` names what an engine spells differently
(identifier quoting, the UTC timestamp type, how the window is ordered and its frame bounded, and
whether counts and fixed-point sums are written over growing frames: `Frame`).
`DUCKDB` is the offline store's; `featurestore.spark_sql` defines Spark's from the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from ml_platform import fixed_point
from ml_platform.featurestore.definitions import Aggregation, FeatureView
from ml_platform.featurestore.offline import CREATED_TS, FEATURE_TS, interval_sql, quote_identifier
from ml_platform.timestamps import US_PER_SECOND, span_us

_TS = "__source_ts"
_CREATED = "__source_created_ts"
_NEXT_TS = "__next_ts"
_PEERS = "same_time"  # window of the rows with the same keys and time
_ORDER = "by_time"
_ONE_US = timedelta(microseconds=1)  # the time resolution (µs): the first instant outside a window


# --- One function per aggregation function: its SQL over one window length (a `Frame`). -----
# `decimals` is the declaration's (sum and mean only). The type names used (DOUBLE, BIGINT) are
# spelled the same in DuckDB and Spark SQL.

_RUNNING = "running"  # growing frames: every earlier row of the entity, the current time's peers included


@dataclass(frozen=True)
class Frame:
    """How an aggregate over one window length [t - window, t] is written in one dialect.

    `over` is the sliding frame (`RANGE BETWEEN <window> PRECEDING AND CURRENT ROW`), right for
    any aggregate. `additive` is for counts and integer sums, which can also be written as the
    difference of two *growing* frames: everything up to t (`running`) minus everything older
    than the window (`<name>_before`, up to t - window - 1 µs). Exact for integers (there is no
    rounding to cancel), and an engine computes a growing frame incrementally, where a sliding
    frame costs some engines (Spark) the whole frame on every row: O(rows x rows per window)."""

    name: str  # the sliding window's name in the WINDOW clause (`window_name`)
    quote: Callable[[str], str] = quote_identifier
    growing: bool = False  # additive aggregates as running minus before

    @property
    def before(self) -> str:
        """The WINDOW name of the growing frame of the rows older than the window."""
        return f"{self.name}_before"

    def over(self, aggregate: str) -> str:
        """`aggregate` over the sliding frame."""
        return f"{aggregate} OVER {self.name}"

    def additive(self, aggregate: str) -> str:
        """An additive aggregate (a count, an integer sum) over the window. Growing, an empty
        window's count is 0 and its sum 0, not NULL: `integer_sum` says NULL itself."""
        if not self.growing:
            return self.over(aggregate)
        return f"({aggregate} OVER {_RUNNING} - coalesce({aggregate} OVER {self.before}, 0))"

    def integer_sum(self, column: str) -> str:
        """The sum of an integer column's non-NULL values over the window; NULL when there are none."""
        total = f"sum({self.quote(column)})"
        if not self.growing:
            return self.over(total)
        return f"CASE WHEN {self.additive(f'count({self.quote(column)})')} > 0 THEN {self.additive(total)} END"


def units_column(column: str, decimals: int) -> str:
    """The `source_rows` column holding `column`'s fixed-point units at `decimals`."""
    return f"__units{decimals}_{column}"


def count_sql(column: str | None, frame: Frame, decimals=None) -> str:
    """Rows in the window (column None) or rows whose `column` is not NULL."""
    return frame.additive("count(*)" if column is None else f"count({frame.quote(column)})")


def sum_sql(column: str, frame: Frame, decimals: int | None = None) -> str:
    """Sum of the non-NULL values (exact over units with `decimals`); NULL when there are none."""
    if decimals is None:
        return frame.over(f"sum(CAST({frame.quote(column)} AS DOUBLE))")
    return fixed_point.sum_from_units_sql(frame.integer_sum(units_column(column, decimals)), decimals)


def mean_sql(column: str, frame: Frame, decimals: int | None = None) -> str:
    """Mean of the non-NULL values (sum / count, the same sums a stream keeps); NULL when none.

    Written as sum/count rather than avg so DuckDB shares the window sums with sum/count features.
    With no value the sum is NULL, so the division is never NULL / 0 (also under Spark's ANSI mode)."""
    if decimals is None:
        return f"({sum_sql(column, frame)} / {count_sql(column, frame)})"
    units = units_column(column, decimals)  # NULL exactly where the column is
    return fixed_point.mean_from_units_sql(frame.integer_sum(units), count_sql(units, frame), decimals)


def min_sql(column: str, frame: Frame, decimals=None) -> str:
    """Smallest non-NULL value; NULL when there are none."""
    return frame.over(f"min(CAST({frame.quote(column)} AS DOUBLE))")


def max_sql(column: str, frame: Frame, decimals=None) -> str:
    """Largest non-NULL value; NULL when there are none."""
    return frame.over(f"max(CAST({frame.quote(column)} AS DOUBLE))")


AGGREGATE_SQL = {"count": count_sql, "sum": sum_sql, "mean": mean_sql, "min": min_sql, "max": max_sql}


def window_name(window: timedelta) -> str:
    """The SQL name of the window clause for `window` (one per distinct window length)."""
    micros = span_us(window)
    return f"w_{micros // US_PER_SECOND}s" if micros % US_PER_SECOND == 0 else f"w_{micros}us"


@dataclass(frozen=True)
class Dialect:
    """What one engine spells differently in the compiled query (everything else is shared), and
    whether counts and fixed-point sums use growing frames (`Frame`: for an engine whose sliding
    RANGE frames cost the whole frame per row)."""

    name: str
    quote: Callable[[str], str]  # an identifier
    timestamp_type: str  # the type of a UTC instant, which source times are cast to
    order_by: Callable[[str], str]  # the window's ORDER BY expression for the time column
    preceding: Callable[[timedelta], str]  # the frame's lower bound: `window` before the current row
    growing_frames: bool = False

    def frame(self, window: timedelta) -> Frame:
        return Frame(window_name(window), self.quote, self.growing_frames)


DUCKDB = Dialect(
    name="duckdb",
    quote=quote_identifier,
    timestamp_type="TIMESTAMPTZ",
    order_by=lambda ts: ts,  # DuckDB frames a timestamp order by an INTERVAL
    preceding=interval_sql,
)  # sliding frames throughout: DuckDB's segment trees make them O(rows log rows)


def aggregation_sql(aggregation: Aggregation, dialect: Dialect = DUCKDB) -> str:
    """The windowed SQL of one declaration, cast to the feature's declared type."""
    function = AGGREGATE_SQL[aggregation.function]
    expr = function(aggregation.column, dialect.frame(aggregation.window), aggregation.decimals)
    return f"CAST({expr} AS {aggregation.dtype.duckdb_type})"


def source_columns(view: FeatureView) -> list[str]:
    """The raw source columns the compiled query reads."""
    src = view.source
    cols = [*view.join_keys, src.timestamp_field]
    if src.created_timestamp_column:
        cols.append(src.created_timestamp_column)
    cols += [a.column for a in view.aggregations if a.column]
    return list(dict.fromkeys(cols))


def compile_aggregation_sql(view: FeatureView, source_scan: str, dialect: Dialect = DUCKDB) -> str:
    """One query computing `view`'s aggregations from `source_scan` (a FROM expression), in
    `dialect` (DuckDB's by default; `spark_sql.compile_spark_sql` passes Spark's).

    Raises ValueError when the view declares no aggregations.
    """
    if not view.aggregations:
        raise ValueError(f"FeatureView {view.name!r} declares no aggregations; it reads its source directly")
    q = dialect.quote
    src = view.source
    keys = [q(k) for k in view.join_keys]
    ts = q(src.timestamp_field)
    created = (
        f"CAST({q(src.created_timestamp_column)} AS {dialect.timestamp_type})"
        if src.created_timestamp_column
        else f"CAST(NULL AS {dialect.timestamp_type})"
    )
    # The raw columns the window functions read, and the units of the fixed-point ones (read
    # instead of the raw column, which then stays out of the window sort unless another uses it).
    value_columns = [
        q(c) for c in dict.fromkeys(a.column for a in view.aggregations if a.column and a.decimals is None)
    ]
    value_columns += [
        f"{fixed_point.units_sql(q(c), d)} AS {q(units_column(c, d))}"
        for c, d in dict.fromkeys((a.column, a.decimals) for a in view.aggregations if a.decimals is not None)
    ]
    not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)])
    windows = sorted({a.window for a in view.aggregations})
    order = f"PARTITION BY {', '.join(keys)} ORDER BY {dialect.order_by(_TS)}"
    clauses = [
        f"{window_name(w)} AS ({order} RANGE BETWEEN {dialect.preceding(w)} PRECEDING AND CURRENT ROW)"
        for w in windows
    ]
    if dialect.growing_frames:
        clauses.append(f"{_RUNNING} AS ({order} RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)")
        clauses += [  # the rows older than the window: up to t - window - 1 µs
            f"{dialect.frame(w).before} AS ({order} RANGE BETWEEN UNBOUNDED PRECEDING AND "
            f"{dialect.preceding(w + _ONE_US)} PRECEDING)"
            for w in windows
        ]
    clauses += [f"{_PEERS} AS ({order} RANGE BETWEEN CURRENT ROW AND CURRENT ROW)", f"{_ORDER} AS ({order})"]
    window_clauses = ",\n  ".join(clauses)
    features = ",\n    ".join(
        f"{aggregation_sql(a, dialect)} AS {q(a.feature_name)}" for a in view.aggregations
    )
    outputs = ", ".join(q(a.feature_name) for a in view.aggregations)
    return (
        f"WITH source_rows AS (\n"
        f"  SELECT {', '.join(keys)}, CAST({ts} AS {dialect.timestamp_type}) AS {_TS}, {created} AS {_CREATED}"
        f"{''.join(', ' + c for c in value_columns)}\n"
        f"  FROM {source_scan}\n"
        f"  WHERE {not_null}\n"
        f"),\n"
        f"windowed AS (\n"
        f"  SELECT {', '.join(keys)}, {_TS},\n"
        f"    max({_CREATED}) OVER {_PEERS} AS {CREATED_TS},\n"
        f"    lead({_TS}) OVER {_ORDER} AS {_NEXT_TS},\n"
        f"    {features}\n"
        f"  FROM source_rows\n"
        f"  WINDOW {window_clauses}\n"
        f")\n"
        f"-- rows with equal keys and time are window peers with equal values: keep the last of them\n"
        f"SELECT {', '.join(keys)}, {_TS} AS {FEATURE_TS}, {CREATED_TS}, {outputs}\n"
        f"FROM windowed\n"
        f"WHERE {_NEXT_TS} IS DISTINCT FROM {_TS}"
    )
