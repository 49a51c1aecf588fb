"""How one model version is scored (`ScoringPath`) and the choice of path (`build_scoring_path`).

Two steps, each fast where it is proven equal to the reference on this model:
- features: "compiled" (column assembly + `features.request_features`, numpy) or "reference"
  (`assemble_features` + `contract.model_input`, pandas: ~10 ms a call);
- scorer: "treelite" (the Pipeline's encoding as dict lookups + the compiled trees) or "sklearn"
  (the scikit-learn Pipeline). treelite is used only for a model it supports (`trees.supports`)
  AND whose parity check passes; anything else (a LogisticRegression) is scored by scikit-learn.
Rows (the HTTP API) and columns (the stream worker's batches) take the same compiled path.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.serving.scorer import columns as cols
from ml_platform.serving.scorer.encoding import PipelineLayout, UnsupportedModel, known_categories
from ml_platform.serving.scorer.parity import (
    PARITY_SAMPLE_ROWS,
    PARITY_TOLERANCE,
    inputs_mismatch,
    parity_sample,
)
from ml_platform.serving.scorer.trees import TreeliteScorer, unsupported_reason
from ml_platform.serving.scoring import LoadedModel
from ml_platform.training.contract import ModelContract

_log = logging.getLogger(__name__)

SCORERS = ("auto", "treelite", "sklearn")


@dataclass
class Scored:
    probabilities: np.ndarray
    inputs: dict[str, list]  # the model input columns (before encoding), for the prediction log


@dataclass
class ScoringPath:
    """How one model version is scored: `features` ("compiled" or "reference") and `scorer`
    ("treelite" or "sklearn"), with the parity figures that justified the choice."""

    loaded: LoadedModel
    features: str
    scorer: str
    reasons: list[str] = field(default_factory=list)
    parity_max_abs_diff: float | None = None
    parity_rows: int = 0
    build_seconds: float = 0.0
    _layout: PipelineLayout | None = None
    _treelite: TreeliteScorer | None = None
    known_categories: dict[str, frozenset[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.known_categories:
            self.known_categories = known_categories(self.contract, self.loaded.model)
        self._numeric = self.contract.numeric_features
        self._categorical = self.contract.categorical_features

    @property
    def version(self) -> int:
        return self.loaded.version

    @property
    def contract(self) -> ModelContract:
        return self.loaded.contract

    @property
    def name(self) -> str:
        return f"{self.features}+{self.scorer}"

    @property
    def columnar(self) -> bool:
        """Batches given column-wise are scored without rebuilding rows (the compiled features)."""
        return self.features == "compiled"

    def score(self, transactions: Sequence[Mapping[str, Any]], looked_up: Mapping[str, Sequence]) -> Scored:
        """Fraud probabilities for request rows (raw transaction dicts) and their looked-up features."""
        if self.features == "compiled":
            request, columns = cols.request_columns_from_rows(self.contract, transactions, looked_up)
            return self._score_compiled(request, columns)
        X = cols.reference_model_input(self.contract, transactions, looked_up)
        inputs = {c: X[c].tolist() for c in X.columns}
        if self.scorer == "sklearn":
            return Scored(self._predict_frame(X), inputs)
        return Scored(self._predict_matrix(self._layout.encode_columns(*self._layout.split(inputs))), inputs)

    def score_columns(self, request: Mapping[str, Any], looked_up: Mapping[str, Any]) -> np.ndarray:
        """Fraud probabilities (float64, one per row) for a batch given column-wise: `request`
        holds "amount" (float64 array), `EVENT_US` (int64 array of µs since the epoch, UTC) and the
        request's string columns ("country", "merchant_category", ...) as lists; `looked_up` maps a
        feature to a float64 array (NaN = null) or a list (None = null). The same probabilities as
        `score` on the equivalent rows."""
        if self.features == "compiled":
            numeric, categorical = self._model_inputs(request, looked_up)
            return self._predict_columns(numeric, categorical)
        return self.score(cols.rows_from_columns(request), looked_up).probabilities

    def unseen_values(self, inputs: Mapping[str, Sequence]) -> list[list[str]]:
        """Per row of `inputs` (model inputs as `Scored.inputs`), the categorical columns whose
        value the model never saw in training (nulls are not unseen: they are missing)."""
        n = len(next(iter(inputs.values()))) if inputs else 0
        out: list[list[str]] = [[] for _ in range(n)]
        for col, known in self.known_categories.items():
            values = inputs.get(col)
            if values is None:
                continue
            for i, value in enumerate(values):
                if isinstance(value, str) and value not in known:
                    out[i].append(col)
        return out

    def _model_inputs(self, request, looked_up):
        return cols.model_input_columns(
            self.contract, request, looked_up, numeric_features=self._numeric, categorical_features=self._categorical
        )

    def _score_compiled(self, request, looked_up) -> Scored:
        numeric, categorical = self._model_inputs(request, looked_up)
        return Scored(self._predict_columns(numeric, categorical), cols.logged_inputs(numeric, categorical))

    def _predict_columns(self, numeric, categorical) -> np.ndarray:
        return self._predict_matrix(self._layout.encode_columns(numeric, categorical))

    def _predict_matrix(self, X: np.ndarray) -> np.ndarray:
        if self.scorer == "treelite":
            return self._treelite.predict(X)
        return np.asarray(self._layout.classifier.predict_proba(X)[:, 1], dtype=np.float64)

    def _predict_frame(self, X: pd.DataFrame) -> np.ndarray:
        """The whole Pipeline on the contract's input frame."""
        return np.asarray(self.loaded.model.predict_proba(X)[:, 1], dtype=np.float64)

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


def _reference_path(loaded: LoadedModel, reasons: list[str], started: float) -> ScoringPath:
    return ScoringPath(loaded, "reference", "sklearn", reasons, build_seconds=time.perf_counter() - started)


def _fall_back(loaded: LoadedModel, scorer: str, reasons: list[str], reason: str, started: float) -> ScoringPath:
    """The reference path, with `reason` logged and reported; an error if treelite was required."""
    if scorer == "treelite":
        raise UnsupportedModel(reason)
    reasons.append(reason)
    _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reason)
    return _reference_path(loaded, reasons, started)


def build_scoring_path(
    loaded: LoadedModel, scorer: str = "auto", sample_rows: int = PARITY_SAMPLE_ROWS
) -> ScoringPath:
    """The fastest path that scores exactly like the reference for this model version.

    scorer="auto": compiled features + treelite where treelite supports the model and each step
    passes its parity check, else the reference step; "treelite": the same, but an error if
    treelite cannot serve the model; "sklearn": the reference path only (assemble_features + the
    scikit-learn Pipeline)."""
    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {SCORERS}, got {scorer!r}")
    started = time.perf_counter()
    contract = loaded.contract
    if scorer == "sklearn":
        return _reference_path(loaded, ["scikit-learn forced (scorer='sklearn')"], started)
    reasons: list[str] = []
    unsupported = unsupported_reason(loaded.model)
    if unsupported is not None:
        return _fall_back(loaded, scorer, reasons, f"fast path unavailable: {unsupported}", started)
    try:
        layout = PipelineLayout.of(loaded.model)
    except UnsupportedModel as exc:
        return _fall_back(loaded, scorer, reasons, f"fast path unavailable: {exc}", started)

    transactions, looked_up = parity_sample(contract, layout, sample_rows, seed=loaded.version)
    X_ref = cols.reference_model_input(contract, transactions, looked_up)
    reference = np.asarray(loaded.model.predict_proba(X_ref)[:, 1], dtype=np.float64)
    ref_inputs = {c: X_ref[c].tolist() for c in X_ref.columns}
    matrix_ref = np.asarray(loaded.model[:-1].transform(X_ref), dtype=np.float64)

    # The layout's encoding against the fitted transformer.
    if not np.array_equal(layout.encode_columns(*layout.split(ref_inputs)), matrix_ref, equal_nan=True):
        return _fall_back(
            loaded, scorer, reasons, "the fast encoding differs from the Pipeline's ColumnTransformer", started
        )

    # treelite against scikit-learn on the same matrix.
    scorer_kind, tl = "sklearn", None
    try:
        tl = TreeliteScorer(layout.classifier)
        got = tl.predict(matrix_ref)
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

    # Compiled features (column assembly + features.request_features) against assemble_features +
    # model_input. Half of the numeric looked-up features are given as float64 arrays, half as
    # lists, as the stream worker may give either.
    features = "reference"
    numeric_looked_up = [c for c in looked_up if c not in contract.categorical_features]
    try:
        request, columns = cols.request_columns_from_rows(
            contract, transactions, looked_up, float_arrays=numeric_looked_up[::2]
        )
        compiled = cols.logged_inputs(*cols.model_input_columns(contract, request, columns))
        mismatch = inputs_mismatch(compiled, ref_inputs, contract.input_columns)
    except Exception as exc:  # noqa: BLE001
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch is None:
        features = "compiled"
    else:
        reasons.append(f"compiled request features differ from assemble_features ({mismatch})")
        _log.warning("model v%s: %s", loaded.version, reasons[-1])

    path = ScoringPath(loaded, features, scorer_kind, reasons, _layout=layout, _treelite=tl)
    # End to end on the chosen path, rows and columns: the same probabilities as the reference.
    end_to_end = float(np.max(np.abs(path.score(transactions, looked_up).probabilities - reference)))
    if features == "compiled":
        by_columns = path.score_columns(request, columns)
        end_to_end = max(end_to_end, float(np.max(np.abs(by_columns - reference))))
    if not end_to_end < PARITY_TOLERANCE:
        reasons.append(f"the {path.name} path differs from the reference by {end_to_end:.3g}")
        _log.warning("model v%s: %s; scoring with scikit-learn", loaded.version, reasons[-1])
        return _reference_path(loaded, reasons, started)
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
