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
these one by one (count: +1 per row, sum/mean: running sums, min/max: extremes over the window).
The query is one template for every engine: a `Dialect` names what an engine spells differently
(identifier quoting, the UTC timestamp type, how the window is ordered and its frame bounded).
`DUCKDB` is the offline store's; `featurestore.spark_sql` defines Spark's from the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from ml_platform.featurestore.definitions import Aggregation, FeatureView
from ml_platform.featurestore.offline import CREATED_TS, FEATURE_TS, interval_sql, quote_identifier
from ml_platform.timestamps import US_PER_SECOND, span_us

_TS = "__source_ts"
_CREATED = "__source_created_ts"
_NEXT_TS = "__next_ts"
_PEERS = "same_time"  # window of the rows with the same keys and time
_ORDER = "by_time"


# --- One function per aggregation function: its SQL over a named window (`w`). --------------
# `quote` quotes an identifier in the engine's dialect. The type names used (DOUBLE here, BIGINT
# and DOUBLE for the declared types) are spelled the same in DuckDB and Spark SQL.


def count_sql(column: str | None, w: str, quote: Callable[[str], str] = quote_identifier) -> str:
    """Rows in the window (column None) or rows whose `column` is not NULL."""
    return f"count(*) OVER {w}" if column is None else f"count({quote(column)}) OVER {w}"


def sum_sql(column: str, w: str, quote: Callable[[str], str] = quote_identifier) -> str:
    """Sum of the non-NULL values; NULL when there are none."""
    return f"sum(CAST({quote(column)} AS DOUBLE)) OVER {w}"


def mean_sql(column: str, w: str, quote: Callable[[str], str] = quote_identifier) -> str:
    """Mean of the non-NULL values (sum / count, the same running totals a stream keeps); NULL when none.

    Written as sum/count rather than avg so DuckDB shares the window sums with sum/count features.
    With no value the sum is NULL, so the division is never NULL / 0 (also under Spark's ANSI mode)."""
    return f"({sum_sql(column, w, quote)} / {count_sql(column, w, quote)})"


def min_sql(column: str, w: str, quote: Callable[[str], str] = quote_identifier) -> str:
    """Smallest non-NULL value; NULL when there are none."""
    return f"min(CAST({quote(column)} AS DOUBLE)) OVER {w}"


def max_sql(column: str, w: str, quote: Callable[[str], str] = quote_identifier) -> str:
    """Largest non-NULL value; NULL when there are none."""
    return f"max(CAST({quote(column)} AS DOUBLE)) OVER {w}"


AGGREGATE_SQL = {"count": count_sql, "sum": sum_sql, "mean": mean_sql, "min": min_sql, "max": max_sql}


def window_name(window: timedelta) -> str:
    """The SQL name of the window clause for `window` (one per distinct window length)."""
    micros = span_us(window)
    return f"w_{micros // US_PER_SECOND}s" if micros % US_PER_SECOND == 0 else f"w_{micros}us"


@dataclass(frozen=True)
class Dialect:
    """What one engine spells differently in the compiled query (everything else is shared)."""

    name: str
    quote: Callable[[str], str]  # an identifier
    timestamp_type: str  # the type of a UTC instant, which source times are cast to
    order_by: Callable[[str], str]  # the window's ORDER BY expression for the time column
    preceding: Callable[[timedelta], str]  # the frame's lower bound: `window` before the current row


DUCKDB = Dialect(
    name="duckdb",
    quote=quote_identifier,
    timestamp_type="TIMESTAMPTZ",
    order_by=lambda ts: ts,  # DuckDB frames a timestamp order by an INTERVAL
    preceding=interval_sql,
)


def aggregation_sql(aggregation: Aggregation, dialect: Dialect = DUCKDB) -> str:
    """The windowed SQL of one declaration, cast to the feature's declared type."""
    function = AGGREGATE_SQL[aggregation.function]
    expr = function(aggregation.column, window_name(aggregation.window), dialect.quote)
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
    value_columns = [q(c) for c in dict.fromkeys(a.column for a in view.aggregations if a.column)]
    not_null = " AND ".join([f"{ts} IS NOT NULL", *(f"{k} IS NOT NULL" for k in keys)])
    windows = sorted({a.window for a in view.aggregations})
    order = f"PARTITION BY {', '.join(keys)} ORDER BY {dialect.order_by(_TS)}"
    window_clauses = ",\n  ".join(
        [
            f"{window_name(w)} AS ({order} RANGE BETWEEN {dialect.preceding(w)} PRECEDING AND CURRENT ROW)"
            for w in windows
        ]
        + [f"{_PEERS} AS ({order} RANGE BETWEEN CURRENT ROW AND CURRENT ROW)", f"{_ORDER} AS ({order})"]
    )
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
