"""`is_in(values, among)`: `Series.isin` for id columns at Arrow's speed.

pandas 3's string columns are Arrow-backed, and their `isin` turns every value of `among` into a
Python scalar first: 0.16 s for 2,000 ids among 40,000 here, where `pyarrow.compute.is_in` takes
2 ms. Monitoring asks it several times a day (labels that arrived among the predictions, the
transactions that exist, the labels seen before), so it goes through here. Same answers as
`values.isin(among)` (a null matches a null), the same index.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def is_in(values: pd.Series, among: pd.Series | pd.Index | Iterable) -> pd.Series:
    """A boolean Series on `values`' index: each value is one of `among`."""
    if not isinstance(among, pd.Series | pd.Index):
        among = pd.Series(list(among), dtype=object)
    try:
        left, right = pa.array(values, from_pandas=True), pa.array(among, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # not one Arrow type (mixed objects): pandas' way
        return values.isin(among)
    if not (left.type == right.type or (_text(left.type) and _text(right.type)) or len(right) == 0):
        return values.isin(among)  # Arrow would cast one side ("2" to 2); pandas compares as they are
    found = pc.is_in(left, value_set=right.cast(left.type) if len(right) else pa.array([], left.type))
    return pd.Series(pc.fill_null(found, False).to_numpy(zero_copy_only=False), index=values.index, dtype=bool)


def _text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)
