"""Model quality on a labelled frame: ranking (ROC/PR AUC), decisions at the contract threshold,
probability quality (Brier score, calibration table). Plain JSON-serialisable dicts."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from ml_platform.training.contract import ModelContract
from ml_platform.training.model import fraud_probability

# Whether a larger value of the metric is better (used when comparing champion and challenger).
HIGHER_IS_BETTER = {
    "roc_auc": True,
    "pr_auc": True,
    "precision": True,
    "recall": True,
    "f1": True,
    "brier": False,
}


def evaluate(model: Any, contract: ModelContract, frame: pd.DataFrame) -> dict[str, Any]:
    """Metrics of `model` on the labelled rows of `frame` (see `classification_metrics`)."""
    if contract.label not in frame.columns:
        raise ValueError(f"Cannot evaluate: frame has no label column {contract.label!r}")
    labelled = frame[frame[contract.label].notna()]
    if labelled.empty:
        raise ValueError("Cannot evaluate: no labelled rows in the frame")
    scores = fraud_probability(model, contract, labelled)
    return classification_metrics(
        labelled[contract.label].astype(int).to_numpy(), scores, contract.decision_threshold
    )


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, threshold: float, bins: int = 10
) -> dict[str, Any]:
    """roc_auc, pr_auc (average precision), precision/recall/f1 flagging score >= threshold,
    brier, calibration table, rows, positives. AUCs are None when only one class is present."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(scores, dtype=float)
    both_classes = len(np.unique(y)) == 2
    flagged = (p >= threshold).astype(int)
    return {
        "rows": len(y),
        "positives": int(y.sum()),
        "threshold": float(threshold),
        "flagged": int(flagged.sum()),
        "roc_auc": float(roc_auc_score(y, p)) if both_classes else None,
        "pr_auc": float(average_precision_score(y, p)) if both_classes else None,
        "precision": float(precision_score(y, flagged, zero_division=0)),
        "recall": float(recall_score(y, flagged, zero_division=0)),
        "f1": float(f1_score(y, flagged, zero_division=0)),
        "brier": float(brier_score_loss(y, p)),
        "calibration": calibration_table(y, p, bins),
    }


def calibration_table(y_true: np.ndarray, scores: np.ndarray, bins: int = 10) -> list[dict[str, Any]]:
    """`bins` equal-width probability bins [k/bins, (k+1)/bins) (the last one includes 1.0): count,
    mean predicted probability and observed fraud rate per bin (None for an empty bin)."""
    y = np.asarray(y_true).astype(int)
    p = np.asarray(scores, dtype=float)
    index = np.clip(np.floor(p * bins).astype(int), 0, bins - 1)
    table = []
    for k in range(bins):
        in_bin = index == k
        count = int(in_bin.sum())
        table.append(
            {
                "bin_lower": round(k / bins, 10),
                "bin_upper": round((k + 1) / bins, 10),
                "count": count,
                "mean_predicted": float(p[in_bin].mean()) if count else None,
                "observed_rate": float(y[in_bin].mean()) if count else None,
            }
        )
    return table
