"""Batch scoring of Arrow chunks (events + looked-up features, as `batch_features.chunk_reader`
yields them) without pandas: `ChunkScorer`.

The compiled path builds the model matrix column-wise: the numeric inputs through the stream
path's assembly (`scorer.columns.model_input_columns`, hence `features.request_features`, the one
definition of the request-time features), the categorical ones coded with the Pipeline's own
code tables (`scorer.encoding.PipelineLayout`, here vectorised with Arrow: null -> the missing
code, a value outside the table -> the unknown code), then the trees (`batch_trees.NativeTrees`,
scikit-learn's prediction bit for bit, or the classifier itself). It is used only for a model
whose Pipeline the layout understands and only after the day's first chunk gave the same model
matrix and the same scores, bit for bit, as the reference path on a sample of its rows; else
the whole day takes the reference path (`scoring.assemble_features` + `LoadedModel.predict_proba`,
what every other scorer is checked against). Both give the prediction log the same columns.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ml_platform import features as fr
from ml_platform.serving.batch_features import EVENT_US, ROW
from ml_platform.serving.batch_trees import NativeTrees
from ml_platform.serving.prediction_log import DECISIONS, REFERENCE_SCORER, REQUEST_FIELDS, log_table
from ml_platform.serving.predictions_db import PREDICTIONS_SCHEMA, TRANSACTION_ID
from ml_platform.serving.scorer import columns as cols
from ml_platform.serving.scorer.encoding import PipelineLayout, UnsupportedModel
from ml_platform.serving.scoring import LoadedModel, assemble_features
from ml_platform.timestamps import to_us

_log = logging.getLogger(__name__)

CHECK_ROWS = 5000  # rows of the first chunk scored both ways before the compiled path is trusted
# Arrow -> pandas for the reference path: integer / boolean features as pandas nullable dtypes,
# as the offline store's point-in-time join returns them to training.
_NULLABLE = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype(), pa.bool_(): pd.BooleanDtype()}


@dataclass
class Scored:
    """A chunk's scores, the model inputs as Arrow columns (what the model read, for the log)
    and the scoring time per row in ms (request features + model)."""

    scores: np.ndarray
    inputs: dict[str, pa.Array]
    latency_ms: float


class ChunkScorer:
    """Scores chunks for one model version: `score(batch)`; `name` says how ("compiled+native",
    "compiled+sklearn", or "reference+sklearn"), `reasons` why not faster."""

    def __init__(self, loaded: LoadedModel, threads: int = 1, path: str = "auto"):
        if path not in ("auto", "reference"):
            raise ValueError(f"path must be 'auto' or 'reference', got {path!r}")
        self.loaded = loaded
        self.contract = loaded.contract
        self.threads = max(1, int(threads))
        self.reasons: list[str] = []
        self._layout: PipelineLayout | None = None
        self._trees: NativeTrees | None = None
        self._checked = False
        if path == "reference":
            self.reasons.append("reference path requested")
            return
        try:
            self._layout = PipelineLayout.of(loaded.model)
        except UnsupportedModel as exc:
            self.reasons.append(f"compiled path unavailable: {exc}")

    @property
    def name(self) -> str:
        if self._layout is None:
            return REFERENCE_SCORER
        return "compiled+native" if self._trees is not None else "compiled+sklearn"

    def score(self, batch: pa.RecordBatch) -> Scored:
        if self._layout is not None and not self._checked:
            self._check(batch)
        started = time.perf_counter()
        if self._layout is None:
            frame = reference_frame(batch, self.contract)
            scores = np.asarray(self.loaded.predict_proba(frame), dtype=np.float64)
            elapsed = time.perf_counter() - started
            inputs = reference_inputs(self.contract, frame)
        else:
            X, inputs = self._matrix(batch)
            scores = self._predict(X)
            elapsed = time.perf_counter() - started
        if len(scores) != batch.num_rows:
            raise RuntimeError(
                f"model v{self.loaded.version} returned {len(scores)} scores for {batch.num_rows} rows"
            )
        return Scored(scores, inputs, elapsed * 1000.0 / max(batch.num_rows, 1))

    # ------------------------------------------------------------------ the compiled path

    def _matrix(self, batch: pa.RecordBatch) -> tuple[np.ndarray, dict[str, pa.Array]]:
        """The model matrix (the ColumnTransformer's output) and the model inputs as Arrow."""
        contract, layout = self.contract, self._layout
        n = batch.num_rows
        categorical = {c: _strings(batch, c, n) for c in contract.categorical_features}
        request: dict[str, Any] = {
            "amount": _floats(batch.column("amount")),
            cols.EVENT_US: batch.column(EVENT_US).to_numpy(),
            "country": batch.column("country").to_numpy(zero_copy_only=False),
        }
        names = set(batch.schema.names)
        looked_up: dict[str, Any] = {
            c: _floats(batch.column(c))
            for c in contract.feature_columns
            if c in names and c not in contract.categorical_features
        }
        if "home_country" in names:
            looked_up["home_country"] = batch.column("home_country").to_numpy(zero_copy_only=False)
        numeric, _ = cols.model_input_columns(contract, request, looked_up, categorical_features=())
        X = np.empty((n, len(layout.columns)), dtype=np.float64, order="F")  # column writes stay contiguous
        for j, (col, table) in enumerate(zip(layout.columns, layout.codes)):
            if table is None:
                X[:, j] = numeric[col]
            else:
                X[:, j] = _codes(categorical[col], table, layout.unknown_code[j], layout.missing_code[j])
        inputs: dict[str, pa.Array] = {}
        for c in contract.input_columns:
            inputs[c] = (
                categorical[c] if c in categorical else pa.array(numeric[c], pa.float64(), from_pandas=True)
            )
        return X, inputs

    def _predict(self, X: np.ndarray) -> np.ndarray:
        if self._trees is not None:
            return self._trees.predict_proba(X, threads=self.threads)
        return np.asarray(self._layout.classifier.predict_proba(X)[:, 1], dtype=np.float64)

    def _check(self, batch: pa.RecordBatch) -> None:
        """The compiled path against the reference on the first rows of the day's first chunk:
        the same model matrix and the same scores, bit for bit, or the reference path for the day."""
        self._checked = True
        sample = batch.slice(0, CHECK_ROWS)
        frame = reference_frame(sample, self.contract)
        reference_X = np.asarray(
            self.loaded.model[:-1].transform(self.contract.model_input(frame)), dtype=np.float64
        )
        reference = np.asarray(self.loaded.predict_proba(frame), dtype=np.float64)
        X, inputs = self._matrix(sample)
        problem = None
        if not np.array_equal(X, reference_X, equal_nan=True):
            problem = "the column-wise model matrix differs from the Pipeline's"
        elif not _same_inputs(inputs, reference_inputs(self.contract, frame)):
            problem = "the column-wise model inputs differ from contract.model_input's"
        elif not np.array_equal(self._predict(X), reference):
            problem = "the classifier on the matrix differs from the Pipeline"
        if problem is None:
            trees = NativeTrees.of(self._layout.classifier, check=X)
            if trees is not None and np.array_equal(trees.predict_proba(X, self.threads), reference):
                self._trees = trees
            else:
                self.reasons.append(
                    "native trees unavailable for this model (scikit-learn's predictor is used)"
                )
            return
        self.reasons.append(f"compiled path refused on the day's first rows: {problem}")
        _log.warning("model v%s: %s; batch scoring takes the reference path", self.loaded.version, problem)
        self._layout = None


# ---------------------------------------------------------------------- the reference path


def reference_frame(batch: pa.RecordBatch, contract) -> pd.DataFrame:
    """A chunk as `assemble_features` gives it to the model: the events (pandas) + looked-up
    features (nullable dtypes, as the offline join returns them)."""
    names = set(batch.schema.names)
    feature_cols = [c for c in contract.feature_columns if c in names]
    event_cols = [c for c in batch.schema.names if c not in feature_cols and c not in (ROW, EVENT_US)]
    events = pa.Table.from_batches([batch.select(event_cols)]).to_pandas()
    looked_up = pa.Table.from_batches([batch.select(feature_cols)]).to_pandas(types_mapper=_NULLABLE.get)
    return assemble_features(events, looked_up)


def reference_inputs(contract, frame: pd.DataFrame) -> dict[str, pa.Array]:
    """`contract.model_input(frame)` as the log's typed columns (NaN -> null)."""
    X = contract.model_input(frame)
    categorical = set(contract.categorical_features)
    return {
        c: pa.array(X[c].to_numpy(), type=pa.string() if c in categorical else pa.float64(), from_pandas=True)
        for c in contract.input_columns
    }


def _same_inputs(a: dict[str, pa.Array], b: dict[str, pa.Array]) -> bool:
    return list(a) == list(b) and all(a[c].equals(b[c]) for c in a)


# ---------------------------------------------------------------------- columns


def _floats(column: pa.Array) -> np.ndarray:
    """A numeric Arrow column as float64, null -> NaN (pd.to_numeric's reading of it)."""
    if not pa.types.is_floating(column.type):
        column = pc.cast(column, pa.float64())
    return column.to_numpy(zero_copy_only=False)


def _strings(batch: pa.RecordBatch, name: str, n: int) -> pa.Array:
    """A categorical input as the model reads it (str of the value, null kept), or all null."""
    if name not in batch.schema.names:
        return pa.nulls(n, pa.string())
    column = batch.column(name)
    return column if pa.types.is_string(column.type) else pc.cast(column, pa.string())


def _codes(values: pa.Array, table: dict[str, float], unknown: float, missing: float) -> np.ndarray:
    """PipelineLayout.encode_columns' rule, vectorised: a value's code from the table, a value
    not in it -> `unknown`, null -> `missing`."""
    keys = pa.array(list(table), pa.string())
    codes = np.asarray(list(table.values()) + [unknown], dtype=np.float64)
    index = pc.index_in(values, value_set=keys).fill_null(len(table)).to_numpy(zero_copy_only=False)
    out = codes[index]
    nulls = values.is_null().to_numpy(zero_copy_only=False)
    if nulls.any():
        out[nulls] = missing
    return out


# ---------------------------------------------------------------------- outputs


def prediction_rows(
    loaded: LoadedModel, batch: pa.RecordBatch, scores: np.ndarray, day: date, scored_at: datetime
) -> pa.Table:
    """A chunk's rows of the predictions table."""
    n = batch.num_rows
    decisions = np.asarray(loaded.decide(scores), dtype=bool)
    return pa.table(
        {
            TRANSACTION_ID: batch.column(TRANSACTION_ID).cast(pa.string()),
            "user_id": batch.column("user_id").cast(pa.int64()),
            "merchant_id": batch.column("merchant_id").cast(pa.int64()),
            fr.EVENT_TS: batch.column(fr.EVENT_TS).cast(pa.timestamp("us", tz="UTC")),
            "score": pa.array(scores, pa.float64()),
            "decision": pa.array(decisions),
            "model_version": pa.array(np.full(n, int(loaded.version), dtype=np.int32)),
            "scored_at": pa.array(np.full(n, to_us(scored_at), dtype=np.int64), pa.timestamp("us", tz="UTC")),
            "day": pa.array(np.full(n, np.datetime64(day.isoformat(), "D"))).cast(pa.date32()),
        },
        schema=PREDICTIONS_SCHEMA,
    )


def log_rows(
    loaded: LoadedModel,
    scorer: str,
    predictions: pa.Table,
    batch: pa.RecordBatch,
    inputs: dict[str, pa.Array],
    scored_at: datetime,
    latency_ms: float,
) -> pa.Table:
    """A scored chunk as rows of the prediction log (docs/serving.md): the published columns, the
    request fields, the decision as DECISIONS' words, the model inputs as typed columns."""
    contract = loaded.contract
    ids = predictions.column(TRANSACTION_ID)
    names = set(batch.schema.names)
    columns = {
        "source": "batch",
        "prediction_id": pc.binary_join_element_wise("batch-", ids, ""),
        "predicted_at": scored_at,
        **{c: batch.column(c) for c in REQUEST_FIELDS if c in names and c != fr.EVENT_TS},
        "transaction_id": ids,
        fr.EVENT_TS: predictions.column(fr.EVENT_TS),
        "model_name": contract.model_name,
        "model_version": int(loaded.version),
        "probability": predictions.column("score"),
        "decision": pc.if_else(predictions.column("decision"), DECISIONS[0], DECISIONS[1]),
        "threshold": float(contract.decision_threshold),
        "scorer": scorer,
        "latency_ms": round(latency_ms, 6) if math.isfinite(latency_ms) else None,
    }
    return log_table(columns, inputs, batch.num_rows)
