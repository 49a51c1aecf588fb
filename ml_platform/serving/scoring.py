"""Scoring shared by every serving path (HTTP API, stream worker, batch): one way to turn
transactions plus looked-up features into model input, and one loaded-model object.

Looked-up features are read as of just before each event (`features.feature_lookup_time`), the
same rule the training set uses, and request-time features come from `features.add_request_features`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ml_platform import features as fr
from ml_platform.training.contract import ModelContract


def assemble_features(transactions: pd.DataFrame, looked_up: Mapping[str, Sequence] | pd.DataFrame) -> pd.DataFrame:
    """Transactions (raw request columns) + looked-up feature columns -> the frame with request-time
    features added. `looked_up` is column -> values in the transactions' row order (the online
    store's answer, or columns of a point-in-time join); join-key columns in it are ignored."""
    frame = transactions.reset_index(drop=True).copy()
    frame[fr.EVENT_TS] = pd.to_datetime(frame[fr.EVENT_TS], utc=True)
    items = looked_up.items() if isinstance(looked_up, Mapping) else ((c, looked_up[c]) for c in looked_up.columns)
    for col, values in items:
        if col in frame.columns:
            continue
        values = values.to_numpy() if isinstance(values, pd.Series) else values
        if len(values) != len(frame):
            raise ValueError(f"looked-up column {col!r} has {len(values)} values for {len(frame)} transactions")
        frame[col] = values if isinstance(values, np.ndarray) else list(values)
    return fr.add_request_features(frame)


@dataclass
class LoadedModel:
    """A registered model version ready to score: the estimator, its contract, its version."""

    version: int
    model: Any
    contract: ModelContract
    loaded_at: float = 0.0
    info: dict = field(default_factory=dict)

    def predict_proba(self, features_frame: pd.DataFrame) -> np.ndarray:
        """Fraud probability for each row of a frame built by `assemble_features`."""
        X = self.contract.model_input(features_frame)
        return np.asarray(self.model.predict_proba(X)[:, 1], dtype="float64")

    def decide(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) >= self.contract.decision_threshold


def load_champion(registry, alias: str = "champion") -> LoadedModel:
    """The model the alias points at, as a LoadedModel: `champion.load_registered` (the one
    loader; kept under this name for its importers)."""
    from ml_platform.serving.champion import load_registered

    return load_registered(registry, alias)
