"""Train the fraud model: a scikit-learn Pipeline of the chosen model type (`model_types`) and its
contract, with the decision threshold chosen on the validation split."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve
from sklearn.pipeline import Pipeline

from ml_platform.training.contract import ModelContract
from ml_platform.training.model_types import DEFAULT_MODEL_TYPE, get_model_type

# The default model type's params (HistGradientBoosting), for callers that show or override them.
DEFAULT_PARAMS: dict[str, Any] = get_model_type(DEFAULT_MODEL_TYPE).default_params
THRESHOLD_RULE = "max_f1_on_validation"
_log = logging.getLogger(__name__)


def build_pipeline(
    contract: ModelContract,
    params: dict[str, Any] | None = None,
    random_state: int = 0,
    model_type: str = DEFAULT_MODEL_TYPE,
) -> Pipeline:
    """The untrained Pipeline of `model_type` for `contract` (params validated, see model_types)."""
    return get_model_type(model_type).build(contract, params, random_state)


def fraud_probability(model: Pipeline, contract: ModelContract, frame: pd.DataFrame) -> np.ndarray:
    """P(fraud) for each row of `frame`, with the input shaped by the contract."""
    return model.predict_proba(contract.model_input(frame))[:, 1]


def choose_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest F1 (flag iff score >= threshold); ties -> the lowest
    such threshold (the first maximum along sklearn's increasing thresholds)."""
    y = np.asarray(y_true).astype(int)
    if y.sum() == 0:
        raise ValueError(
            "Validation split has no fraud labels, so no decision threshold can be chosen; "
            "use a longer data window or a larger val_frac"
        )
    precision, recall, thresholds = precision_recall_curve(y, np.asarray(scores, dtype=float))
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


def known_categories(contract: ModelContract, frame: pd.DataFrame) -> dict[str, list[str]]:
    """The values each categorical input takes in `frame` (non-null, as the model sees them), sorted."""
    inputs = contract.model_input(frame)
    return {
        col: sorted({str(v) for v in inputs[col].dropna().unique()}) for col in contract.categorical_features
    }


def _fillable_inputs(contract: ModelContract, train: pd.DataFrame) -> pd.DataFrame:
    """The train split's model input, with a numeric input that is null in EVERY row (label
    aggregates before any label matured, say) set to 0.0: the model cannot use such a column either
    way (a constant has no split), and scikit-learn's HistGradientBoosting fails on an all-missing
    one ("window shape cannot be larger than input array shape"). Logged as a warning."""
    X = contract.model_input(train)
    empty = [c for c in contract.numeric_features if len(X) and X[c].isna().all()]
    if empty:
        _log.warning(
            "feature(s) %s are null in all %d training rows: the model cannot use them (train on a "
            "longer window for them to count)",
            empty,
            len(X),
        )
        X[empty] = 0.0
    return X


def train_model(
    train: pd.DataFrame,
    val: pd.DataFrame,
    contract: ModelContract | None = None,
    params: dict[str, Any] | None = None,
    random_state: int = 0,
    model_type: str = DEFAULT_MODEL_TYPE,
) -> tuple[Pipeline, ModelContract]:
    """Fit a `model_type` model on `train`, choose the decision threshold on `val`; return the
    model and its contract.

    `contract` names the inputs (default: `ModelContract.from_features()`, the platform's
    features); the returned one records the model type, the threshold chosen here and the
    categories seen in `train`.
    """
    kind = get_model_type(model_type)
    contract = contract or ModelContract.from_features()
    model = kind.build(contract, params, random_state)  # validates params before any data work
    label = contract.label
    for name, split in (("train", train), ("validation", val)):
        if label not in split.columns:
            raise ValueError(f"{name} split has no label column {label!r}")
        if split[label].isna().any():
            raise ValueError(f"{name} split has rows with {label!r} null; train only on labelled rows")
    y_train = train[label].astype(int).to_numpy()
    if len(np.unique(y_train)) < 2:
        raise ValueError(
            f"Train split has a single class ({label}={int(y_train[0]) if len(y_train) else 'n/a'}, "
            f"{len(y_train)} rows); use a longer data window"
        )
    model.fit(_fillable_inputs(contract, train), y_train)
    threshold = choose_threshold(val[label].astype(int).to_numpy(), fraud_probability(model, contract, val))
    trained = contract.with_training(kind.name, known_categories(contract, train))
    return model, trained.with_threshold(threshold, THRESHOLD_RULE)
