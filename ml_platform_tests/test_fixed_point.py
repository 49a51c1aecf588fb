"""The fixed-point rule (`ml_platform.fixed_point`) against exact decimal arithmetic: which floats
are on the cent grid, how a float becomes units (half away from zero), that a sum of units read
back as a float is the correctly rounded exact sum, and that DuckDB's SQL for it gives the same
units as numpy on the values where rounding rules part (ties, the float just below a half)."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ml_platform import fixed_point

# Where rounding rules part: halves (0.5, 2.5: banker's rounding goes to even), the float just
# below a half (0.49999999999999994: floor(v + 0.5) gives 1), values whose product with 100 lands
# on or just off a half, negatives, and floats that are not the cent they print as (0.29 * 100 is
# 28.999999999999996).
TRICKY = [
    0.5, 1.5, 2.5, -2.5, -0.5, 0.49999999999999994, -0.49999999999999994, 0.005, 0.015, 0.025, -0.005,
    0.285, 1234.565, 0.29, 12.34, 999999.99, 0.1 + 0.2, 1e-9, 0.0, -0.0, 7.0, 4503599627370495.5 / 100,
]


def exact_units(x: float, decimals: int) -> int:
    """The rule restated with exact decimals: the float product x * 10^d, rounded half up."""
    product = x * float(10**decimals)  # the rule rounds the float product, as SQL's does
    return int(Decimal(product).to_integral_value(rounding=ROUND_HALF_UP))


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False), st.integers(0, 4))
def test_units_round_the_scaled_float_half_away_from_zero(x, decimals):
    assert fixed_point.units(np.array([x]), decimals)[0] == exact_units(x, decimals)
    assert fixed_point.round_half_away(x * fixed_point.factor(decimals)) == exact_units(x, decimals)


def test_units_of_the_values_where_rounding_rules_part():
    got = fixed_point.units(np.array(TRICKY), 2).tolist()
    assert got == [exact_units(x, 2) for x in TRICKY]
    assert got[:6] == [50, 150, 250, -250, -50, 50]  # 0.49999999999999994 * 100 is 49.99999999999999: 50
    assert fixed_point.units(np.array([0.5, 2.5, 0.49999999999999994]), 0).tolist() == [1, 3, 0]
    assert fixed_point.units(np.array([np.nan, 3.0]), 2).tolist() == [0, 300]  # NULL counts apart


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**12), 10**12), st.integers(0, 4))
def test_every_multiple_of_a_unit_is_on_the_grid(n, decimals):
    x = n / 10**decimals
    assert fixed_point.on_grid(x, decimals)
    assert fixed_point.units(np.array([x]), decimals)[0] == n
    assert not fixed_point.off_grid(np.array([x]), decimals)[0]


@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=-1e6, max_value=1e6, allow_nan=False), st.integers(0, 4))
def test_on_the_grid_means_at_most_that_many_decimal_places(x, decimals):
    """repr is the shortest decimal that reads back as x: it has at most `decimals` places
    exactly when x is the float of a number with that many."""
    places = -min(Decimal(repr(x)).normalize().as_tuple().exponent, 0)  # 7.0 has none
    assert fixed_point.on_grid(x, decimals) == (places <= decimals)
    assert bool(fixed_point.off_grid(np.array([x]), decimals)[0]) == (places > decimals)


def test_off_grid_examples():
    assert fixed_point.off_grid(np.array([12.34, 12.345, 0.1 + 0.2, 0.3, np.nan, 1e-05]), 2).tolist() == [
        False, True, True, False, False, True,
    ]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-(10**10), 10**10), min_size=1, max_size=50), st.integers(0, 4))
def test_a_sum_of_units_is_the_correctly_rounded_exact_sum_and_the_mean_its_quotient(cents, decimals):
    total = sum(cents)
    s = fixed_point.sum_from_units(np.array([total]), decimals)[0]
    assert s == float(Fraction(total, 10**decimals))  # one rounding: the exact sum's nearest float
    m = fixed_point.mean_from_units(np.array([total]), np.array([len(cents)]), decimals)[0]
    assert m == s / len(cents)


def test_duckdb_sql_gives_numpys_units_sums_and_means():
    con = duckdb.connect()
    values = [x for x in TRICKY]
    rows = con.execute(
        f"SELECT {fixed_point.units_sql('x', 2)} FROM unnest(?::DOUBLE[]) WITH ORDINALITY t(x, i) ORDER BY i",
        [values],
    ).fetchall()
    assert [r[0] for r in rows] == fixed_point.units(np.array(values), 2).tolist()
    total, count = 6003, 7
    s, m = con.execute(
        f"SELECT {fixed_point.sum_from_units_sql(str(total), 2)}, "
        f"{fixed_point.mean_from_units_sql(str(total), str(count), 2)}"
    ).fetchone()
    assert s == fixed_point.sum_from_units(np.array([total]), 2)[0] == 60.03
    assert m == fixed_point.mean_from_units(np.array([total]), np.array([count]), 2)[0] == 60.03 / 7
    assert con.execute(f"SELECT {fixed_point.units_sql('NULL', 2)}").fetchone() == (None,)


@pytest.mark.parametrize("bad", [-1, 10, 1.0, "2", None, True])
def test_decimals_out_of_range_are_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"decimals must be an integer in \[0, 9\], got"):
        fixed_point.check_decimals(bad)
