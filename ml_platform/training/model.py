"""Train the fraud model: a scikit-learn Pipeline (categorical encoding + gradient-boosted trees)
and its contract, with the decision threshold chosen on the validation split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import precision_recall_curve
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OrdinalEncoder

from ml_platform.training.contract import ModelContract

# Imbalance: fraud is ~1-3 % of rows. Default class_weight=None keeps predicted probabilities
# calibrated (Brier score, calibration table and drift monitoring read them as probabilities);
# the imbalance is handled by choosing the decision threshold on validation (max F1) and by
# judging models on PR AUC. Pass params={"class_weight": "balanced"} to reweight instead.
DEFAULT_PARAMS: dict[str, Any] = {
    "max_iter": 200,
    "learning_rate": 0.1,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 20,
    "l2_regularization": 1.0,
    "class_weight": None,
    "max_categories": 250,  # per categorical column; rarer values share one "infrequent" code
}
THRESHOLD_RULE = "max_f1_on_validation"


def build_pipeline(
    contract: ModelContract, params: dict[str, Any] | None = None, random_state: int = 0
) -> Pipeline:
    """The untrained Pipeline for `contract`: OrdinalEncoder on categoricals (unknown and missing
    values -> NaN, which the trees treat as "missing"), numerics passed through unchanged."""
    p = {**DEFAULT_PARAMS, **(params or {})}
    unknown = sorted(set(p) - set(DEFAULT_PARAMS))
    if unknown:
        raise ValueError(f"Unknown training params {unknown}; known: {sorted(DEFAULT_PARAMS)}")
    categorical = list(contract.categorical_features)
    encode = ColumnTransformer(
        [
            (
                "categorical",
                OrdinalEncoder(
                    handle_unknown="use_encoded_value",
                    unknown_value=np.nan,
                    encoded_missing_value=np.nan,
                    max_categories=int(p["max_categories"]),
                    dtype=np.float64,
                ),
                categorical,
            ),
            ("numeric", "passthrough", list(contract.numeric_features)),
        ],
        remainder="drop",
    )
    classifier = HistGradientBoostingClassifier(
        max_iter=int(p["max_iter"]),
        learning_rate=float(p["learning_rate"]),
        max_leaf_nodes=int(p["max_leaf_nodes"]),
        min_samples_leaf=int(p["min_samples_leaf"]),
        l2_regularization=float(p["l2_regularization"]),
        class_weight=p["class_weight"],
        # The encoder emits the categorical columns first.
        categorical_features=list(range(len(categorical))) or None,
        early_stopping=False,
        random_state=random_state,
    )
    return Pipeline([("encode", encode), ("classifier", classifier)])


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


def train_model(
    train: pd.DataFrame,
    val: pd.DataFrame,
    contract: ModelContract | None = None,
    params: dict[str, Any] | None = None,
    random_state: int = 0,
) -> tuple[Pipeline, ModelContract]:
    """Fit on `train`, choose the decision threshold on `val`; return the model and its contract.

    `contract` names the inputs (default: `ModelContract.from_features()`, the platform's
    features); its threshold is replaced by the one chosen here.
    """
    contract = contract or ModelContract.from_features()
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
    model = build_pipeline(contract, params, random_state)
    model.fit(contract.model_input(train), y_train)
    threshold = choose_threshold(val[label].astype(int).to_numpy(), fraud_probability(model, contract, val))
    return model, contract.with_threshold(threshold, THRESHOLD_RULE)
