"""Fixed-point numbers: values that are whole multiples of 10^-decimals (an amount in cents).

A sum of floats depends on the order of its additions: DuckDB adds a window's values in
segment-tree order, Spark row by row, the stream updater per batch, so the last bits of a float
sum differ between them (a few 1e-16 relative). For a column declared fixed point, every engine
adds *units* instead (the value times 10^decimals, an integer): integer sums are exact, so they
are the same everywhere, and the one rounding left, from units back to a float, is an IEEE
division that every engine does alike. The rule, written once here for SQL and for numpy:

    units(x) = round_half_away_from_zero(x * 10^decimals)        a 64-bit integer
    sum      = float(sum of units) / 10^decimals
    mean     = (float(sum of units) / 10^decimals) / float(count)

Exact while the sum of units stays below 2^53 (9e15 units: 90 trillion in cents in one window).
A value off the grid is rounded to it, half away from zero (SQL's round in DuckDB and Spark, and
`units` below, agree on every double); the transaction contract refuses such amounts where they
enter (`NumberField.decimals`), so the rounding never changes a real amount.
"""

from __future__ import annotations

import math

import numpy as np

MAX_DECIMALS = 9  # 10^9 units per 1.0 keeps values up to ~9e6 exact in one window's sum


def check_decimals(decimals: int) -> int:
    """`decimals` when it is an int in [0, MAX_DECIMALS]; ValueError naming it otherwise."""
    if type(decimals) is not int or not 0 <= decimals <= MAX_DECIMALS:
        raise ValueError(f"decimals must be an integer in [0, {MAX_DECIMALS}], got {decimals!r}")
    return decimals


def factor(decimals: int) -> float:
    """Units per 1.0: 10^decimals, exactly, as a float."""
    return float(10**decimals)


# --- Python floats and numpy arrays ----------------------------------------------------------


def round_half_away(v: float) -> float:
    """`v` rounded to a whole number, halves away from zero (C's round, SQL's round)."""
    t = float(math.trunc(v))
    return t + math.copysign(1.0, v) if abs(v - t) >= 0.5 else t


def on_grid(value: float, decimals: int) -> bool:
    """`value` is the float nearest to a multiple of 10^-decimals (12.34 is; 12.345 and
    0.1 + 0.2 are not). What a contract field with `decimals` accepts."""
    f = factor(decimals)
    return round_half_away(value * f) / f == value


def units(values: np.ndarray, decimals: int) -> np.ndarray:
    """int64 units of float `values` (NaN, a NULL, gives 0: callers count values apart)."""
    v = np.asarray(values, dtype=np.float64) * factor(decimals)
    t = np.trunc(v)
    rounded = t + np.where(np.abs(v - t) >= 0.5, np.sign(v), 0.0)  # v - t is exact
    return np.where(np.isnan(rounded), 0.0, rounded).astype(np.int64)


def off_grid(values: np.ndarray, decimals: int) -> np.ndarray:
    """Boolean mask of the values `on_grid` refuses (NaN is not off the grid: it is missing)."""
    v = np.asarray(values, dtype=np.float64)
    return ~np.isnan(v) & (units(v, decimals) / factor(decimals) != v)


def sum_from_units(unit_sums: np.ndarray, decimals: int) -> np.ndarray:
    """The float sums of int64 `unit_sums`."""
    return unit_sums.astype(np.float64) / factor(decimals)


def mean_from_units(unit_sums: np.ndarray, counts: np.ndarray, decimals: int) -> np.ndarray:
    """The float means of int64 `unit_sums` over `counts` values (counts > 0)."""
    return sum_from_units(unit_sums, decimals) / counts.astype(np.float64)


# --- SQL (the same text in DuckDB and Spark SQL) ---------------------------------------------


def _factor_sql(decimals: int) -> str:
    return f"CAST({10**decimals} AS DOUBLE)"


def units_sql(expr: str, decimals: int) -> str:
    """The BIGINT units of the numeric SQL expression `expr` (NULL stays NULL)."""
    return f"CAST(round(CAST({expr} AS DOUBLE) * {_factor_sql(decimals)}) AS BIGINT)"


def sum_from_units_sql(unit_sum: str, decimals: int) -> str:
    """The DOUBLE sum of the integer SQL expression `unit_sum` (NULL stays NULL)."""
    return f"(CAST({unit_sum} AS DOUBLE) / {_factor_sql(decimals)})"


def mean_from_units_sql(unit_sum: str, count: str, decimals: int) -> str:
    """The DOUBLE mean of `unit_sum` over `count` values. With no value the sum is NULL, so this
    is never NULL / 0 (also under Spark's ANSI mode)."""
    return f"({sum_from_units_sql(unit_sum, decimals)} / CAST({count} AS DOUBLE))"
