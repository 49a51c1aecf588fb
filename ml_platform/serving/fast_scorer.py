"""Fast scoring of a few request rows: what the HTTP API runs per request, in well under 1 ms.

The reference path (`scoring.assemble_features` -> `ModelContract.model_input` -> the scikit-learn
Pipeline) costs ~10 ms per call here whatever the row count: pandas per-call overhead plus
HistGradientBoosting's `predict_proba`. The fast path does the same three steps on plain lists:

1. request-time features computed row by row (`compiled_model_inputs`), the same formulas as
   `features.add_request_features`;
2. the Pipeline's preprocessing (ColumnTransformer: OrdinalEncoder + passthrough) as dict lookups;
3. the trees with treelite (`treelite.sklearn.import_model` + `treelite.gtil.predict`).

Batches (the stream worker's ~1000 events) have a columnar variant, `ScoringPath.score_columns`:
steps 1 and 2 on numpy columns (`columnar_model_inputs`, `PipelineLayout.encode_columns`), giving
the very matrix the row path would, at a fraction of its per-row cost.

Nothing is trusted blindly: `build_scoring_path` runs both paths on a sample of requests made to
cover every tree split, every category, unknown categories, nulls and all 24 hours, and keeps a fast
step only if it agrees with the reference (inputs exactly, probabilities within 1e-6); the columnar
variant is kept only if its matrix equals the row path's exactly. A model or feature definition the
fast path does not know (another estimator, a new request feature) falls back to the reference
path, and the reason is logged and reported by /health/ready and /metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from ml_platform import features as fr
from ml_platform.serving.scoring import LoadedModel, assemble_features
from ml_platform.training.contract import ModelContract

_log = logging.getLogger(__name__)

SCORERS = ("auto", "treelite", "sklearn")
PARITY_TOLERANCE = 1e-6
PARITY_SAMPLE_ROWS = 256

# Request-time features the row path knows how to compute (see features.add_request_features).
COMPILED_REQUEST_FEATURES = frozenset(
    {"amount", "amount_to_user_mean_30d", "hour_of_day", "is_night", "is_foreign"}
)
# The columnar form's event-time column: int64 microseconds since the epoch, UTC.
EVENT_US = "event_us"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US_PER_HOUR = 3_600_000_000


class UnsupportedModel(Exception):
    """The fast path cannot serve this model (the reason says why); the reference path will."""


# --------------------------------------------------------------------------- 1. request features


def _float(value: Any) -> float:
    """pd.to_numeric(errors="coerce") for one value: None / unparsable -> NaN."""
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _utc_hour(ts: Any) -> int:
    """The UTC hour of an event time (a naive time is taken as UTC, as pd.to_datetime(utc=True) does)."""
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if not isinstance(ts, datetime):
        ts = pd.Timestamp(ts).to_pydatetime()
    return (ts if ts.tzinfo is None else ts.astimezone(UTC)).hour


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def compiled_model_inputs(
    contract: ModelContract, transactions: Sequence[Mapping[str, Any]], looked_up: Mapping[str, Sequence]
) -> dict[str, list]:
    """The contract's input columns for these rows, as `contract.model_input(assemble_features(...))`
    would give them (numeric -> float, NaN for null; categorical -> str or NaN), without pandas."""
    n = len(transactions)
    cols: dict[str, list] = {}
    mean_30d = [_float(v) for v in looked_up.get("amount_mean_30d", [None] * n)]
    home = looked_up.get("home_country", [None] * n)
    amount = [float(t["amount"]) for t in transactions]
    request: dict[str, list] = {"amount": amount}
    request["amount_to_user_mean_30d"] = [a / m if m > 0 else math.nan for a, m in zip(amount, mean_30d)]
    hours = [_utc_hour(t[fr.EVENT_TS]) for t in transactions]
    request["hour_of_day"] = hours
    request["is_night"] = [1 if 0 <= h <= 5 else 0 for h in hours]
    request["is_foreign"] = [
        math.nan if _is_null(h) else float(t["country"] != h) for t, h in zip(transactions, home)
    ]
    for col in contract.numeric_features:
        if col in request:
            cols[col] = [float(v) for v in request[col]]
        elif col in looked_up:
            cols[col] = [_float(v) for v in looked_up[col]]
        else:
            cols[col] = [_float(t.get(col)) for t in transactions]
    for col in contract.categorical_features:
        values = looked_up[col] if col in looked_up else [t.get(col) for t in transactions]
        cols[col] = [math.nan if _is_null(v) else str(v) for v in values]
    return cols


def _float_column(values: Sequence | np.ndarray, n: int) -> np.ndarray:
    """`[_float(v) for v in values]` as a float64 array. A numeric array is taken as it is; other
    values go through numpy's conversion (float() of each value, None -> NaN) when it takes the
    whole column, else value by value (unparsable values -> NaN, as `_float` does)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        out = np.asarray(values, dtype=np.float64)
    else:
        try:
            out = np.array(values, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            out = None
    if out is None or out.shape != (n,):  # e.g. a sequence among the values: numpy would nest it
        out = np.fromiter((_float(v) for v in values), dtype=np.float64, count=n)
    return out


def _utc_hours(event_us: np.ndarray) -> np.ndarray:
    """The UTC hour of each event time given in microseconds since the epoch (int64)."""
    return event_us // _US_PER_HOUR % 24


def columnar_model_inputs(
    contract: ModelContract, request: Mapping[str, Any], looked_up: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Sequence]]:
    """`compiled_model_inputs` for a batch given column-wise: (numeric input column -> float64
    array, NaN for null; categorical input column -> its raw values, encoded by the layout).

    `request` holds "amount" (float64), `EVENT_US` (int64 µs since the epoch, UTC) and the
    request's other columns (e.g. "country") as sequences; `looked_up` maps a feature to a float64
    array (NaN = null) or a sequence of values (None = null)."""
    amount = np.asarray(request["amount"], dtype=np.float64)
    n = len(amount)
    mean_30d = looked_up.get("amount_mean_30d")
    mean_30d = np.full(n, math.nan) if mean_30d is None else _float_column(mean_30d, n)
    ratio = np.full(n, math.nan)
    np.divide(amount, mean_30d, out=ratio, where=mean_30d > 0)
    hours = _utc_hours(np.asarray(request[EVENT_US], dtype=np.int64))
    home = looked_up.get("home_country", [None] * n)
    computed = {
        "amount": amount,
        "amount_to_user_mean_30d": ratio,
        "hour_of_day": hours.astype(np.float64),
        "is_night": ((hours >= 0) & (hours <= 5)).astype(np.float64),
        "is_foreign": np.fromiter(
            (math.nan if _is_null(h) else float(c != h) for c, h in zip(request["country"], home)),
            dtype=np.float64,
            count=n,
        ),
    }
    numeric: dict[str, np.ndarray] = {}
    for col in contract.numeric_features:
        if col in computed:
            numeric[col] = computed[col]
        elif col in looked_up:
            numeric[col] = _float_column(looked_up[col], n)
        elif col in request:
            numeric[col] = _float_column(request[col], n)
        else:
            numeric[col] = np.full(n, math.nan)
    categorical = {
        col: looked_up[col] if col in looked_up else request.get(col, [None] * n)
        for col in contract.categorical_features
    }
    return numeric, categorical


def _event_us(ts: Any) -> int:
    """An event time as µs since the epoch (a naive time is taken as UTC, as in `_utc_hour`)."""
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts)
    if not isinstance(ts, datetime):
        ts = pd.Timestamp(ts).to_pydatetime()
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts
    return (ts - _EPOCH) // timedelta(microseconds=1)


def columns_from_rows(
    contract: ModelContract,
    transactions: Sequence[Mapping[str, Any]],
    looked_up: Mapping[str, Sequence],
    float_arrays: Collection[str] = (),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request rows + looked-up lists in `score_columns`' form: "amount" as float64, the event
    time as `EVENT_US` (int64), the request's other columns as lists; the looked-up features named
    in `float_arrays` as float64 arrays (None -> NaN), the others as they are."""
    names = dict.fromkeys(
        c for c in (*contract.request_columns, "country") if c not in ("amount", fr.EVENT_TS)
    )
    request: dict[str, Any] = {
        "amount": np.array([float(t["amount"]) for t in transactions], dtype=np.float64),
        EVENT_US: np.array([_event_us(t[fr.EVENT_TS]) for t in transactions], dtype=np.int64),
    }
    request.update({c: [t.get(c) for t in transactions] for c in names})
    n = len(transactions)
    columns = {c: _float_column(v, n) if c in float_arrays else v for c, v in looked_up.items()}
    return request, columns


def rows_from_columns(request: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`score_columns`' request columns as row dicts (`fr.EVENT_TS` a UTC datetime), for `score`."""
    names = [c for c in request if c != EVENT_US]
    columns = [v.tolist() if isinstance(v, np.ndarray) else v for v in (request[c] for c in names)]
    stamps = [_EPOCH + timedelta(microseconds=us) for us in np.asarray(request[EVENT_US]).tolist()]
    return [{**dict(zip(names, values)), fr.EVENT_TS: ts} for *values, ts in zip(*columns, stamps)]


def reference_model_input(
    contract: ModelContract, transactions: Sequence[Mapping[str, Any]], looked_up: Mapping[str, Sequence]
) -> pd.DataFrame:
    """The reference: the shared serving code (`assemble_features`) then the contract's shaping."""
    frame = assemble_features(pd.DataFrame(list(transactions)), looked_up)
    return contract.model_input(frame)


# --------------------------------------------------------------------------- 2. preprocessing


@dataclass
class PipelineLayout:
    """A Pipeline(ColumnTransformer(OrdinalEncoder | passthrough), HistGradientBoosting) taken
    apart: per output column of the transformer, its input column and (categorical) code table."""

    columns: list[str]  # input column of each transformed column, in the transformer's order
    codes: list[dict[str, float] | None]  # category -> code for encoded columns, None = passthrough
    unknown_code: list[float]
    missing_code: list[float]
    classifier: Any

    @classmethod
    def of(cls, model: Any) -> PipelineLayout:
        from sklearn.compose import ColumnTransformer
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import FunctionTransformer, OrdinalEncoder

        if not isinstance(model, Pipeline) or len(model.steps) != 2:
            raise UnsupportedModel(f"model is a {type(model).__name__}, not a 2-step Pipeline")
        encode, classifier = model.steps[0][1], model.steps[1][1]
        if not isinstance(classifier, HistGradientBoostingClassifier):
            raise UnsupportedModel(
                f"last step is {type(classifier).__name__}, not HistGradientBoostingClassifier"
            )
        if len(getattr(classifier, "classes_", ())) != 2:
            raise UnsupportedModel("the classifier is not binary")
        if not isinstance(encode, ColumnTransformer):
            raise UnsupportedModel(f"first step is {type(encode).__name__}, not a ColumnTransformer")
        columns: list[str] = []
        codes: list[dict[str, float] | None] = []
        unknown: list[float] = []
        missing: list[float] = []
        for name, transformer, cols in encode.transformers_:
            if isinstance(transformer, str) and transformer == "drop" or len(cols) == 0:
                continue
            if any(not isinstance(c, str) for c in cols):
                raise UnsupportedModel(f"transformer {name!r} selects columns by position, not name")
            passthrough = transformer == "passthrough" or (
                isinstance(transformer, FunctionTransformer) and transformer.func is None
            )
            if passthrough:
                columns += cols
                codes += [None] * len(cols)
                unknown += [math.nan] * len(cols)
                missing += [math.nan] * len(cols)
            elif isinstance(transformer, OrdinalEncoder):
                if transformer.handle_unknown != "use_encoded_value":
                    raise UnsupportedModel(f"OrdinalEncoder {name!r} raises on unknown categories")
                tables = _ordinal_tables(transformer, cols)
                columns += cols
                codes += tables
                unknown += [float(transformer.unknown_value)] * len(cols)
                missing += [float(transformer.encoded_missing_value)] * len(cols)
            else:
                raise UnsupportedModel(f"transformer {name!r} is a {type(transformer).__name__}")
        if len(columns) != classifier.n_features_in_:
            raise UnsupportedModel(
                f"the transformer emits {len(columns)} columns, the classifier expects {classifier.n_features_in_}"
            )
        return cls(columns, codes, unknown, missing, classifier)

    def encode(self, inputs: Mapping[str, Sequence]) -> np.ndarray:
        """The transformer's output matrix (float64) for model inputs given as column -> values."""
        n = len(next(iter(inputs.values()))) if inputs else 0
        out = np.empty((n, len(self.columns)), dtype=np.float64)
        for j, (col, table) in enumerate(zip(self.columns, self.codes)):
            values = inputs[col]
            if table is None:
                out[:, j] = values
            else:
                unknown, missing = self.unknown_code[j], self.missing_code[j]
                out[:, j] = [missing if not isinstance(v, str) else table.get(v, unknown) for v in values]
        return out

    def encode_columns(
        self, numeric: Mapping[str, np.ndarray], categorical: Mapping[str, Sequence]
    ) -> np.ndarray:
        """`encode` for `columnar_model_inputs`' output: passthrough columns copied from `numeric`;
        encoded ones coded from `categorical`'s raw values (null -> missing, else str(value))."""
        any_column = next(iter((*numeric.values(), *categorical.values())), ())
        out = np.empty((len(any_column), len(self.columns)), dtype=np.float64)
        for j, (col, table) in enumerate(zip(self.columns, self.codes)):
            if table is None:
                out[:, j] = numeric[col]
            else:
                unknown, missing = self.unknown_code[j], self.missing_code[j]
                out[:, j] = [
                    table.get(v, unknown)
                    if isinstance(v, str)
                    else missing
                    if _is_null(v)
                    else table.get(str(v), unknown)
                    for v in categorical[col]
                ]
        return out


def _ordinal_tables(encoder: Any, cols: list[str]) -> list[dict[str, float]]:
    """category -> code per column, read by running the fitted encoder itself on its categories
    (so infrequent-category grouping and any other encoder rule are taken as they are)."""
    cats = []
    for col, categories in zip(cols, encoder.categories_):
        odd = [c for c in categories if not isinstance(c, str) and not _is_null(c)]
        if odd:
            raise UnsupportedModel(f"OrdinalEncoder column {col!r} has non-string categories {odd[:3]}")
        cats.append([c for c in categories if isinstance(c, str)])
    longest = max((len(c) for c in cats), default=0)
    if longest == 0:
        return [{} for _ in cols]
    padded = {col: (c + [c[0]] * (longest - len(c))) if c else [None] * longest for col, c in zip(cols, cats)}
    coded = encoder.transform(pd.DataFrame(padded, dtype=object))
    return [{cat: float(coded[i, j]) for i, cat in enumerate(cats[j])} for j in range(len(cols))]


# --------------------------------------------------------------------------- 3. trees


def _treelite_model(classifier: Any):
    import treelite
    import treelite.sklearn

    return treelite, treelite.sklearn.import_model(classifier)


# --------------------------------------------------------------------------- the scoring path


@dataclass
class Scored:
    probabilities: np.ndarray
    inputs: dict[str, list]  # the model input columns (before encoding), for the prediction log


@dataclass
class ScoringPath:
    """How one model version is scored: `features` ("compiled" or "reference") and `scorer`
    ("treelite" or "sklearn"), with the parity figures that justified the choice. `columnar`:
    `score_columns` runs the columnar variant of the compiled path (it passed its parity check);
    otherwise it scores row by row with `score`."""

    loaded: LoadedModel
    features: str
    scorer: str
    reasons: list[str] = field(default_factory=list)
    columnar: bool = False
    parity_max_abs_diff: float | None = None
    parity_rows: int = 0
    build_seconds: float = 0.0
    _layout: PipelineLayout | None = None
    _treelite: Any = None

    @property
    def version(self) -> int:
        return self.loaded.version

    @property
    def contract(self) -> ModelContract:
        return self.loaded.contract

    @property
    def name(self) -> str:
        return f"{self.features}+{self.scorer}"

    def model_inputs(self, transactions, looked_up) -> tuple[dict[str, list], np.ndarray | pd.DataFrame]:
        """(input columns for the log, what the scorer takes)."""
        if self.features == "compiled":
            inputs = compiled_model_inputs(self.contract, transactions, looked_up)
            return inputs, self._layout.encode(inputs)
        X = reference_model_input(self.contract, transactions, looked_up)
        inputs = {c: X[c].tolist() for c in X.columns}
        if self.scorer == "sklearn":
            return inputs, X
        return inputs, self._layout.encode(inputs)

    def score(self, transactions: Sequence[Mapping[str, Any]], looked_up: Mapping[str, Sequence]) -> Scored:
        """Fraud probabilities for request rows (raw transaction dicts) and their looked-up features."""
        inputs, X = self.model_inputs(transactions, looked_up)
        return Scored(self._predict(X), inputs)

    def score_columns(self, request: Mapping[str, Any], looked_up: Mapping[str, Any]) -> np.ndarray:
        """Fraud probabilities (float64, one per row) for a batch given column-wise: `request`
        holds "amount" (float64 array), `EVENT_US` (int64 array of µs since the epoch, UTC) and the
        request's string columns ("country", "merchant_category", ...) as lists; `looked_up` maps a
        feature to a float64 array (NaN = null) or a list (None = null).

        The same probabilities as `score` on the equivalent rows: with `columnar`, the same model
        matrix built with numpy; otherwise the rows are rebuilt and scored by `score`."""
        if self.columnar:
            numeric, categorical = columnar_model_inputs(self.contract, request, looked_up)
            return self._predict(self._layout.encode_columns(numeric, categorical))
        return self.score(rows_from_columns(request), looked_up).probabilities

    def _predict(self, X) -> np.ndarray:
        if self.scorer == "treelite":
            treelite, tm = self._treelite
            out = treelite.gtil.predict(tm, X, nthread=1)
            return np.asarray(out, dtype=np.float64).reshape(len(X))
        if isinstance(X, pd.DataFrame):  # the whole Pipeline on the contract's input frame
            return np.asarray(self.loaded.model.predict_proba(X)[:, 1], dtype=np.float64)
        return np.asarray(self._layout.classifier.predict_proba(X)[:, 1], dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "features": self.features,
            "scorer": self.scorer,
            "reasons": list(self.reasons),
            "columnar": self.columnar,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "parity_rows": self.parity_rows,
            "build_seconds": round(self.build_seconds, 3),
        }


def parity_sample(
    contract: ModelContract, layout: PipelineLayout | None, n: int = PARITY_SAMPLE_ROWS, seed: int = 0
) -> tuple[list[dict], dict[str, list]]:
    """Synthetic requests + looked-up features covering the model's split points, every known
    category plus an unknown one, nulls, zero / negative means and every hour of the day."""
    rng = np.random.default_rng(seed)
    thresholds: dict[str, np.ndarray] = {}
    categories: dict[str, list[str]] = {}
    if layout is not None:
        bins = getattr(getattr(layout.classifier, "_bin_mapper", None), "bin_thresholds_", None)
        for j, (col, table) in enumerate(zip(layout.columns, layout.codes)):
            if table is not None:
                categories[col] = list(table)
            elif bins is not None and j < len(bins) and len(bins[j]):
                thresholds[col] = np.asarray(bins[j], dtype=np.float64)

    def numeric(col: str) -> list:
        t = thresholds.get(col)
        if t is not None:
            picks = rng.choice(t, n)
            # on a threshold, just above it, and in between: every side of every split
            values = picks + rng.choice([0.0, 1e-9, -1e-9, 0.5], n) * np.maximum(np.abs(picks), 1.0)
        else:
            values = rng.gamma(1.5, 40.0, n) * rng.choice([1.0, 0.0, 10.0], n, p=[0.8, 0.1, 0.1])
        out: list = values.tolist()
        for i in np.flatnonzero(rng.random(n) < 0.1):
            out[i] = None
        return out

    def category(col: str, default: Sequence[str]) -> list:
        known = categories.get(col) or list(default)
        pool = known + ["__never_seen__"]
        out: list = [pool[i] for i in rng.integers(0, len(pool), n)]
        for i in np.flatnonzero(rng.random(n) < 0.08):
            out[i] = None
        return out

    base = datetime(2026, 3, 1, tzinfo=UTC)
    hours = np.concatenate([np.arange(24), np.arange(24), rng.integers(0, 24, max(n - 48, 0))])[:n]
    seconds = rng.integers(0, 3600, n)
    micros = rng.integers(0, 1_000_000, n)
    seconds[:24], micros[:24] = 3599, 999_999  # hour boundaries: the last microsecond of each hour
    seconds[24:48], micros[24:48] = 0, 0  # and the first
    countries = category("country", ["DE", "FR", "US"])
    transactions = []
    cats = {
        c: category(c, ["x", "y"]) for c in contract.categorical_features if c in contract.request_columns
    }
    amounts = np.round(rng.lognormal(3.5, 1.2, n), 2) + 0.01
    for i in range(n):
        ts = base + timedelta(
            days=int(i % 7), hours=int(hours[i]), seconds=int(seconds[i]), microseconds=int(micros[i])
        )
        row = {
            "transaction_id": f"parity-{i}",
            "user_id": i,
            "merchant_id": i,
            "amount": float(amounts[i]),
            fr.EVENT_TS: ts,
        }
        for c in ("merchant_category", "device", "channel"):
            row[c] = (cats.get(c) or ["x"] * n)[i] or "x"
        row["country"] = countries[i] or "DE"
        transactions.append(row)
    looked_up: dict[str, list] = {}
    for col in contract.feature_columns:
        if col in contract.categorical_features:
            looked_up[col] = category(col, ["DE", "FR"])
            # some home countries equal the request's country: is_foreign = 0
            for i in range(0, n, 3):
                looked_up[col][i] = transactions[i]["country"]
        else:
            looked_up[col] = numeric(col)
    if "amount_mean_30d" in looked_up:  # zero and negative means: the ratio's guard
        for i in range(1, n, 17):
            looked_up["amount_mean_30d"][i] = 0.0
        for i in range(2, n, 23):
            looked_up["amount_mean_30d"][i] = -5.0
    return transactions, looked_up


def _inputs_equal(a: Mapping[str, Sequence], b: Mapping[str, Sequence], columns: Sequence[str]) -> str | None:
    """None if equal (NaN == NaN), else the first difference."""
    for col in columns:
        for i, (x, y) in enumerate(zip(a[col], b[col], strict=True)):
            if _is_null(x) and _is_null(y):
                continue
            if isinstance(x, str) or isinstance(y, str):
                if x != y:
                    return f"column {col!r} row {i}: {x!r} != {y!r}"
            elif float(x) != float(y):
                return f"column {col!r} row {i}: {x!r} != {y!r}"
    return None


def _columnar_mismatch(
    contract: ModelContract,
    layout: PipelineLayout,
    transactions: Sequence[Mapping[str, Any]],
    looked_up: Mapping[str, Sequence],
) -> str | None:
    """None if the columnar path's matrix equals the row path's exactly (NaN == NaN) on these
    rows, else the first difference. Half of the numeric looked-up features are given as float64
    arrays, the other half as lists, as the stream worker may give either."""
    expected = layout.encode(compiled_model_inputs(contract, transactions, looked_up))
    numeric = [c for c in looked_up if c not in contract.categorical_features]
    request, columns = columns_from_rows(contract, transactions, looked_up, float_arrays=numeric[::2])
    try:
        got = layout.encode_columns(*columnar_model_inputs(contract, request, columns))
    except Exception as exc:  # noqa: BLE001 - any failure means: score batches row by row
        return f"{type(exc).__name__}: {exc}"
    if got.shape != expected.shape:
        return f"matrix shape {got.shape} != {expected.shape}"
    same = (got == expected) | (np.isnan(got) & np.isnan(expected))
    if same.all():
        return None
    i, j = np.argwhere(~same)[0]
    return f"column {layout.columns[j]!r} row {i}: {float(got[i, j])!r} != {float(expected[i, j])!r}"


def build_scoring_path(
    loaded: LoadedModel, scorer: str = "auto", sample_rows: int = PARITY_SAMPLE_ROWS
) -> ScoringPath:
    """The fastest path that scores exactly like the reference for this model version.

    scorer="auto": compiled features + treelite where each passes its parity check, else the
    reference step; "treelite": the same, but an error if treelite cannot serve the model;
    "sklearn": the reference path only (assemble_features + the scikit-learn Pipeline)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    started = time.perf_counter()
    contract = loaded.contract
    if scorer == "sklearn":
        return ScoringPath(
            loaded,
            "reference",
            "sklearn",
            ["scikit-learn forced (scorer='sklearn')"],
            build_seconds=time.perf_counter() - started,
        )
    reasons: list[str] = []
    try:
        layout = PipelineLayout.of(loaded.model)
    except UnsupportedModel as exc:
        if scorer == "treelite":
            raise
        reasons.append(f"fast path unavailable: {exc}")
        _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reasons[-1])
        return ScoringPath(
            loaded, "reference", "sklearn", reasons, build_seconds=time.perf_counter() - started
        )

    transactions, looked_up = parity_sample(contract, layout, sample_rows, seed=loaded.version)
    X_ref = reference_model_input(contract, transactions, looked_up)
    reference = np.asarray(loaded.model.predict_proba(X_ref)[:, 1], dtype=np.float64)
    ref_inputs = {c: X_ref[c].tolist() for c in X_ref.columns}
    matrix_ref = np.asarray(loaded.model[:-1].transform(X_ref), dtype=np.float64)

    # Step 2 check: the layout's encoding against the fitted transformer.
    matrix = layout.encode(ref_inputs)
    if not np.array_equal(matrix, matrix_ref, equal_nan=True):
        reason = "the fast encoding differs from the Pipeline's ColumnTransformer"
        if scorer == "treelite":
            raise UnsupportedModel(reason)
        reasons.append(reason)
        _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reason)
        return ScoringPath(
            loaded, "reference", "sklearn", reasons, build_seconds=time.perf_counter() - started
        )

    # Step 3 check: treelite against scikit-learn on the same matrix.
    scorer_kind, tl, diff = "sklearn", None, None
    try:
        tl = _treelite_model(layout.classifier)
        import treelite.gtil

        got = np.asarray(treelite.gtil.predict(tl[1], matrix_ref, nthread=1), dtype=np.float64).reshape(-1)
        diff = float(np.max(np.abs(got - reference))) if len(got) == len(reference) else math.inf
        if diff < PARITY_TOLERANCE:
            scorer_kind = "treelite"
        else:
            reasons.append(f"treelite differs from scikit-learn by {diff:.3g} (> {PARITY_TOLERANCE})")
    except Exception as exc:  # noqa: BLE001 - any import/convert failure means: use scikit-learn
        reasons.append(f"treelite unavailable: {type(exc).__name__}: {exc}")
    if scorer_kind != "treelite":
        if scorer == "treelite":
            raise UnsupportedModel(reasons[-1])
        _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reasons[-1])

    # Step 1 check: compiled request features against assemble_features + model_input.
    features = "reference"
    unknown = sorted(set(contract.request_features) - COMPILED_REQUEST_FEATURES)
    if unknown:
        reasons.append(f"request features {unknown} have no compiled form; using assemble_features")
    else:
        try:
            compiled = compiled_model_inputs(contract, transactions, looked_up)
            mismatch = _inputs_equal(compiled, ref_inputs, contract.input_columns)
        except Exception as exc:  # noqa: BLE001
            mismatch = f"{type(exc).__name__}: {exc}"
        if mismatch is None:
            features = "compiled"
        else:
            reasons.append(f"compiled request features differ from assemble_features ({mismatch})")
    if features != "compiled":
        _log.warning("model v%s: %s", loaded.version, reasons[-1])

    path = ScoringPath(loaded, features, scorer_kind, reasons, _layout=layout, _treelite=tl)
    # End to end on the chosen path: the same probabilities as the reference.
    final = path.score(transactions, looked_up).probabilities
    end_to_end = float(np.max(np.abs(final - reference)))
    if not end_to_end < PARITY_TOLERANCE:
        reasons.append(f"the {path.name} path differs from the reference by {end_to_end:.3g}")
        _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reasons[-1])
        return ScoringPath(
            loaded, "reference", "sklearn", reasons, build_seconds=time.perf_counter() - started
        )
    if path.features == "compiled":
        mismatch = _columnar_mismatch(contract, layout, transactions, looked_up)
        if mismatch is None:
            path.columnar = True
        else:
            reasons.append(f"the columnar batch path differs from the row path ({mismatch})")
            _log.warning("model v%s: %s; batches are scored row by row", loaded.version, reasons[-1])
    path.parity_max_abs_diff = end_to_end
    path.parity_rows = len(transactions)
    path.build_seconds = time.perf_counter() - started
    _log.info(
        "model v%s scores with %s (parity on %d rows: max |diff| %.2g; built in %.2f s)",
        loaded.version,
        path.name,
        path.parity_rows,
        end_to_end,
        path.build_seconds,
    )
    return path
