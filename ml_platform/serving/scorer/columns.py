"""Column assembly: request rows or columns + looked-up features -> the model's input columns.

The request-time features themselves come from the one definition, `features.request_features`;
this module only brings the inputs into its form (float64 / int64 µs / object columns) and the
contract's columns out of it, as `contract.model_input(assemble_features(...))` would give them
(numeric -> float64, NaN for null; categorical -> str or NaN), without pandas on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ml_platform import features as fr
from ml_platform.serving.scoring import assemble_features
from ml_platform.timestamps import from_us, to_us
from ml_platform.training.contract import ModelContract
from ml_platform.values import is_missing

# The columnar form's event-time column: int64 microseconds since the epoch, UTC.
EVENT_US = "event_us"


def float_value(value: Any) -> float:
    """pd.to_numeric(errors="coerce") for one value: None / unparsable -> NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def float_column(values: Sequence | np.ndarray, n: int) -> np.ndarray:
    """`values` as a float64 array of n values: a numeric array as it is; other values through
    numpy's conversion (float() of each, None -> NaN) when it takes the whole column, else value
    by value (unparsable values and sequences -> NaN, as `float_value` reads them)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        out = np.asarray(values, dtype=np.float64)
    else:
        try:
            out = np.array(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            out = None
    if out is None or out.shape != (n,):  # e.g. a sequence among the values: numpy would nest it
        out = np.fromiter((float_value(v) for v in values), dtype=np.float64, count=n)
    return out


def _float_columns(columns: list, n: int) -> list[np.ndarray]:
    """`float_column` of each column, converted in one numpy call when all of them allow it (a
    batch of few rows spends its time in per-call overhead, not in the conversion)."""
    try:
        block = np.array(columns, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        block = None
    if block is not None and block.shape == (len(columns), n):
        return list(block)
    return [float_column(values, n) for values in columns]


def model_input_columns(
    contract: ModelContract,
    request: Mapping[str, Any],
    looked_up: Mapping[str, Any],
    numeric_features: Sequence[str] | None = None,
    categorical_features: Sequence[str] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Sequence]]:
    """(numeric input column -> float64 array, NaN for null; categorical input column -> its raw
    values, None = null) for a batch given column-wise.

    `request` holds "amount" (float64), `EVENT_US` (int64 µs since the epoch, UTC) and the
    request's other columns (e.g. "country") as sequences; `looked_up` maps a feature to a float64
    array (NaN = null) or a sequence of values (None = null). `numeric_features` /
    `categorical_features`: the contract's, precomputed by a caller that scores many batches."""
    amount = np.asarray(request["amount"], dtype=np.float64)
    n = len(amount)
    mean_30d = looked_up.get("amount_mean_30d")
    computed = fr.request_features(
        amount=amount,
        event_us=request[EVENT_US],
        country=request["country"],
        amount_mean_30d=np.full(n, math.nan) if mean_30d is None else float_column(mean_30d, n),
        home_country=looked_up.get("home_country", [None] * n),
    )
    names = contract.numeric_features if numeric_features is None else numeric_features
    looked = [c for c in names if c not in computed and c in looked_up]
    numeric: dict[str, np.ndarray] = dict(zip(looked, _float_columns([looked_up[c] for c in looked], n)))
    for col in names:
        if col in computed:
            numeric[col] = np.asarray(computed[col], dtype=np.float64)
        elif col in numeric:
            continue
        elif col in request:
            numeric[col] = float_column(request[col], n)
        else:
            numeric[col] = np.full(n, math.nan)
    numeric = {col: numeric[col] for col in names}
    categorical = {
        col: looked_up[col] if col in looked_up else request.get(col, [None] * n)
        for col in (contract.categorical_features if categorical_features is None else categorical_features)
    }
    return numeric, categorical


def category_values(values: Sequence) -> list:
    """A categorical column as the model reads it: str of each value, NaN for null."""
    return [math.nan if is_missing(v) else v if isinstance(v, str) else str(v) for v in values]


def logged_inputs(numeric: Mapping[str, np.ndarray], categorical: Mapping[str, Sequence]) -> dict[str, list]:
    """The model inputs as lists (numeric float, NaN for null; categorical str or NaN): what a
    prediction reports and logs."""
    out: dict[str, list] = {c: v.tolist() for c, v in numeric.items()}
    out.update({c: category_values(v) for c, v in categorical.items()})
    return out


def request_columns_from_rows(
    contract: ModelContract,
    transactions: Sequence[Mapping[str, Any]],
    looked_up: Mapping[str, Sequence],
    float_arrays: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request rows + looked-up lists in the columnar form: "amount" as float64, the event time
    as `EVENT_US` (int64), the request's other columns as lists; the looked-up features named in
    `float_arrays` as float64 arrays (None -> NaN), the others as they are."""
    names = dict.fromkeys(
        c for c in (*contract.request_columns, "country") if c not in ("amount", fr.EVENT_TS)
    )
    n = len(transactions)
    request: dict[str, Any] = {
        "amount": np.fromiter((float(t["amount"]) for t in transactions), dtype=np.float64, count=n),
        EVENT_US: np.fromiter((to_us(t[fr.EVENT_TS]) for t in transactions), dtype=np.int64, count=n),
    }
    request.update({c: [t.get(c) for t in transactions] for c in names})
    columns = {c: float_column(v, n) if c in float_arrays else v for c, v in looked_up.items()}
    return request, columns


def rows_from_columns(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Columnar request columns as row dicts (`fr.EVENT_TS` a UTC datetime)."""
    names = [c for c in request if c != EVENT_US]
    columns = [v.tolist() if isinstance(v, np.ndarray) else v for v in (request[c] for c in names)]
    stamps = [from_us(us) for us in np.asarray(request[EVENT_US]).tolist()]
    return [{**dict(zip(names, values)), fr.EVENT_TS: ts} for *values, ts in zip(*columns, stamps)]


def reference_model_input(
    contract: ModelContract, transactions: Sequence[Mapping[str, Any]], looked_up: Mapping[str, Sequence]
) -> pd.DataFrame:
    """The reference: the shared serving code (`assemble_features`) then the contract's shaping."""
    frame = assemble_features(pd.DataFrame(list(transactions)), looked_up)
    return contract.model_input(frame)
