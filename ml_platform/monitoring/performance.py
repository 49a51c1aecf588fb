"""Labelled performance: how good were the served predictions, now that (some) labels are in?

Predictions (the prediction log, one row per transaction) are joined to the label feed by
transaction id. For the partition day X, with the labels known at the end of X:
- per prediction day D of the window: predictions, labelled rows, label completeness, and the
  metrics once the day is mature (completeness >= min_label_completeness);
- over the window (the mature days among the last `window_days`): PR AUC and ROC AUC from the
  served scores, precision / recall / F1 / accuracy from the served decisions (the threshold of
  whichever model served each row), with the number of labelled rows and frauds behind them;
- labels that arrived on X for transactions that were never predicted: counted and reported.

The status compares the window's figures with the champion's held-out evaluation (relative
floors); too few labels yet is `pending`, never `ok`.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from ml_platform import features as fr
from ml_platform.monitoring.config import PerformanceThresholds
from ml_platform.monitoring.prediction_drift import FLAGGED
from ml_platform.monitoring.results import DashboardRow, MonitorResult
from ml_platform.monitoring.status import ALERT, NO_DATA, OK, PENDING, WARN, worst

MONITOR = "model_performance"
_NAMES = {"pr_auc": "PR AUC", "roc_auc": "ROC AUC", "precision": "Precision", "recall": "Recall", "f1": "F1"}


def served_metrics(labels: np.ndarray, scores: np.ndarray, flagged: np.ndarray) -> dict[str, float | int | None]:
    """Metrics of served predictions: AUCs from the scores, the rest from the served decisions."""
    y = labels.astype(int)
    f = flagged.astype(bool)
    tp = int((f & (y == 1)).sum())
    fp = int((f & (y == 0)).sum())
    fn = int((~f & (y == 1)).sum())
    both = len(np.unique(y)) == 2
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None
    else:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "rows": len(y),
        "positives": int(y.sum()),
        "flagged": int(f.sum()),
        "pr_auc": float(average_precision_score(y, scores)) if both else None,
        "roc_auc": float(roc_auc_score(y, scores)) if both else None,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "accuracy": float((f == (y == 1)).mean()) if len(y) else None,
    }


def model_performance(
    predictions: pd.DataFrame,
    labels: pd.DataFrame,
    day: date,
    reference_metrics: dict[str, float],
    thresholds: PerformanceThresholds,
    *,
    known_transaction_ids: pd.Series | None = None,
    model_version: int | None = None,
) -> MonitorResult:
    """Performance as known at the end of `day`. `predictions`: log rows (transaction_id,
    event_timestamp, probability, decision) of at least the window plus the label delay, one per
    transaction; `labels`: the feed up to `day` (one row per transaction); `known_transaction_ids`:
    the transactions that exist (the raw events of the label delay's days): a label arriving for
    one of them that was not predicted is "unscored", for none of them an orphan."""
    first = day - timedelta(days=thresholds.window_days - 1)
    scored = predictions[predictions["probability"].notna()]
    scored = scored.assign(_day=scored[fr.EVENT_TS].dt.date)
    arrived_today = labels[labels[fr.LABEL_TS].dt.date == day]
    predicted = arrived_today["transaction_id"].isin(predictions["transaction_id"])
    exists = predicted.copy()
    if known_transaction_ids is not None:
        exists |= arrived_today["transaction_id"].isin(known_transaction_ids)
    orphans = int((~exists).sum())
    unscored = int((exists & ~predicted).sum())
    window = scored[(scored["_day"] >= first) & (scored["_day"] <= day)]
    joined = window.merge(labels[["transaction_id", fr.LABEL]], on="transaction_id", how="left")
    per_day: dict[str, dict] = {}
    mature_parts = []
    for d, part in joined.groupby("_day", sort=True):
        labelled = part[part[fr.LABEL].notna()]
        completeness = len(labelled) / len(part) if len(part) else 0.0
        mature = completeness >= thresholds.min_label_completeness
        entry = {"predictions": len(part), "labelled": len(labelled), "completeness": completeness, "mature": mature}
        if mature:
            mature_parts.append(labelled)
            entry.update(_metrics_of(labelled))
        per_day[d.isoformat()] = entry
    today = per_day.get(day.isoformat(), {"predictions": 0, "labelled": 0, "completeness": 0.0, "mature": False})

    rows: list[DashboardRow] = []
    figures: dict[str, float | int | None] = {}
    if window.empty:
        status = NO_DATA
        window_metrics: dict = {}
    else:
        labelled = pd.concat(mature_parts) if mature_parts else joined.iloc[0:0]
        window_metrics = _metrics_of(labelled) if len(labelled) else {"rows": 0, "positives": 0}
        enough = (
            window_metrics["rows"] >= thresholds.min_labelled_rows
            and window_metrics["positives"] >= thresholds.min_positives
        )
        statuses = []
        span = f"{len(mature_parts)} mature day(s) of the last {thresholds.window_days}"
        for metric in thresholds.metrics:
            value = window_metrics.get(metric)
            ref = reference_metrics.get(metric)
            floor = None if ref is None else ref * thresholds.relative_floor_alert
            warn_floor = None if ref is None else ref * thresholds.relative_floor_warn
            if not enough or value is None:
                s = PENDING
            elif floor is None:
                s = OK
            else:
                s = ALERT if value < floor else WARN if value < warn_floor else OK
            statuses.append(s)
            rows.append(
                DashboardRow(
                    f"{_NAMES[metric]} ({thresholds.window_days}-day window)",
                    "-" if floor is None else f"< {floor:.3f} ({thresholds.relative_floor_alert:g} x champion {ref:.3f})",
                    "pending" if value is None or not enough else f"{value:.3f}",
                    s,
                    f"{window_metrics['rows']} labelled rows, {window_metrics['positives']} frauds, {span}",
                )
            )
        accuracy = window_metrics.get("accuracy")
        rows.append(
            DashboardRow(
                "Accuracy (shown, not alerted)",
                "-",
                "pending" if accuracy is None or not enough else f"{accuracy:.3f}",
                OK if enough and accuracy is not None else PENDING,
                "at a 1-3 % fraud rate accuracy stays high whatever the model does",
            )
        )
        status = worst(statuses) if enough else PENDING
        figures = {f"window_{k}": window_metrics.get(k) for k in ("pr_auc", "roc_auc", "precision", "recall", "f1",
                                                                "accuracy", "rows", "positives")}
    rows.append(
        DashboardRow(
            f"Label completeness ({day.isoformat()})",
            f">= {thresholds.min_label_completeness:.0%} to count",
            f"{today['completeness']:.0%} of {today['predictions']}",
            OK if today["mature"] else (NO_DATA if not today["predictions"] else PENDING),
            "legit labels mature 7 days after the event, chargebacks 1-30 days",
        )
    )
    if orphans:
        rows.append(
            DashboardRow(
                "Labels without a prediction",
                "0",
                str(orphans),
                WARN,
                f"labels that arrived on {day.isoformat()} for transactions that exist neither in the "
                "raw events nor in the prediction log",
            )
        )
    return MonitorResult(
        monitor=MONITOR,
        day=day.isoformat(),
        status=status,
        rows=rows,
        metrics={
            **figures,
            "day_predictions": today["predictions"],
            "day_labelled": today["labelled"],
            "day_label_completeness": today["completeness"],
            "labels_arrived": len(arrived_today),
            "labels_without_prediction": orphans,
            "labels_for_unscored": unscored,
            **{f"day_{k}": today.get(k) for k in ("pr_auc", "roc_auc", "precision", "recall")},
        },
        details={
            "per_day": per_day,
            "window": window_metrics,
            "reference": reference_metrics,
            "window_start": first.isoformat(),
        },
        model_version=model_version,
    )


def _metrics_of(labelled: pd.DataFrame) -> dict:
    return served_metrics(
        labelled[fr.LABEL].to_numpy(dtype="int64"),
        labelled["probability"].to_numpy(dtype="float64"),
        (labelled["decision"] == FLAGGED).to_numpy(),
    )
