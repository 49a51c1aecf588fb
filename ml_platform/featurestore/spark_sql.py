"""Compile a feature view's `Aggregation` declarations to Spark SQL: the same query as DuckDB's.

The query is `aggregation.compile_aggregation_sql`'s one template (same per-function mapping,
window naming, NULL skipping, peer collapse keeping the latest created time, casts to the declared
types) in the Spark dialect below. What Spark spells differently:

- identifiers are quoted with backticks;
- times are cast to `TIMESTAMP` (Spark's UTC instant; the session time zone must be UTC, see
  `SPARK_SESSION_CONF`, so that a naive source time is read as UTC as DuckDB reads it);
- a RANGE frame needs a numeric order, so windows are ordered by `unix_micros(time)` (a BIGINT of
  µs since the epoch) and bounded by the window in µs: `[t - window, t]` stays exact to the
  microsecond, with no calendar or time zone arithmetic;
- counts and fixed-point sums over a window are the difference of two growing frames (all rows up
  to t, minus those up to t - window - 1 µs: `aggregation.Frame`), exact for integers: Spark
  recomputes a sliding RANGE frame's aggregate over the whole frame whenever the frame moves
  (O(rows x rows per window), hundreds of rows for a merchant's week), a growing one
  incrementally. min, max and float sums keep the sliding frame.

Spark keeps the semantics documented at the top of `aggregation.py` exactly; the parity test
(`ml_platform_tests/test_spark_features.py`) compares every row and value with DuckDB's table.
"""

from __future__ import annotations

from datetime import timedelta

from ml_platform.featurestore.aggregation import Dialect, compile_aggregation_sql
from ml_platform.featurestore.definitions import FeatureView, ValueType
from ml_platform.timestamps import span_us

# Session settings the compiled SQL and the Parquet round trip rely on.
SPARK_SESSION_CONF = {
    # Naive times are UTC, and TIMESTAMP values print and convert in UTC (as the offline store does).
    "spark.sql.session.timeZone": "UTC",
    # Parquet timestamps as INT64 µs adjusted to UTC: what DuckDB writes for TIMESTAMPTZ and reads
    # back as TIMESTAMPTZ (Spark's default INT96 would read back as a nanosecond naive time).
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}

# The declared value types in Spark SQL (for the casts of a raw feature source).
SPARK_TYPES = {
    ValueType.Int32: "INT",
    ValueType.Int64: "BIGINT",
    ValueType.Float32: "FLOAT",
    ValueType.Float64: "DOUBLE",
    ValueType.String: "STRING",
    ValueType.Bool: "BOOLEAN",
    ValueType.UnixTimestamp: "TIMESTAMP",
}


def quote_spark_identifier(name: str) -> str:
    """A Spark SQL identifier, back-quoted."""
    return "`" + name.replace("`", "``") + "`"


def spark_micros(ts: str) -> str:
    """A Spark TIMESTAMP expression as BIGINT µs since the epoch (the numeric order RANGE frames need)."""
    return f"unix_micros({ts})"


def spark_preceding(window: timedelta) -> str:
    """The RANGE frame's lower bound of `window` over a µs order: an exact BIGINT count of µs."""
    return str(span_us(window))


SPARK = Dialect(
    name="spark",
    quote=quote_spark_identifier,
    timestamp_type="TIMESTAMP",
    order_by=spark_micros,
    preceding=spark_preceding,
    growing_frames=True,
)


def compile_spark_sql(view: FeatureView, source_view: str) -> str:
    """One Spark SQL query computing `view`'s aggregations from `source_view` (a table or temp
    view name, or any FROM expression). Raises ValueError when the view declares no aggregations."""
    return compile_aggregation_sql(view, source_view, SPARK)
