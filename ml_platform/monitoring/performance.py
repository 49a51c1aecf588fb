"""Labelled performance: how good were the served predictions, now that (some) labels are in?

Predictions (the prediction log, one row per transaction) are joined to the label feed by
transaction id. For the partition day X, with the labels known at the end of X:
- per prediction day D of the window: predictions, labelled rows, label completeness, and the
  metrics once the day is mature (completeness >= min_label_completeness);
- over the window (the mature days among the last `window_days`): PR AUC and ROC AUC from the
  served scores, precision / recall / F1 / accuracy from the served decisions (the threshold of
  whichever model served each row), with the number of labelled rows and frauds behind them;
- labels that arrived on X for transactions that were never predicted: counted and reported.

The status compares the window's ROC AUC and recall with the champion's held-out evaluation
(relative floors, and a cluster bootstrap's bound so that noise does not alert: see
`PerformanceThresholds`); too few labels yet is `pending`, never `ok`.
"""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from ml_platform import features as fr
from ml_platform.membership import is_in
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
    predicted = is_in(arrived_today["transaction_id"], predictions["transaction_id"])
    exists = predicted.copy()
    if known_transaction_ids is not None:
        exists |= is_in(arrived_today["transaction_id"], known_transaction_ids)
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
        counts = f"{window_metrics['rows']} labelled rows, {window_metrics['positives']} frauds, {span}"
        for metric in (*thresholds.metrics, *(m for m in _NAMES if m not in thresholds.metrics)):
            value = window_metrics.get(metric)
            ref = reference_metrics.get(metric)
            shown = "-" if value is None or not enough else f"{value:.3f}"
            if metric not in thresholds.metrics:  # shown, never alerted (see PerformanceThresholds)
                rows.append(DashboardRow(f"{_NAMES[metric]} ({thresholds.window_days}-day window, shown)",
                                         "-" if ref is None else f"champion {ref:.3f}", shown,
                                         OK if shown != "-" else PENDING, "depends on the share of frauds "
                                         "charged back so far: not alerted"))
                continue
            floor = None if ref is None else ref * thresholds.relative_floor_alert
            warn_floor = None if ref is None else ref * thresholds.relative_floor_warn
            detail = counts
            if not enough or value is None:
                s = PENDING
            elif floor is None or value >= warn_floor:
                s = OK
            else:
                # Alert when even the upper bound is under the alert floor; warn when the value is
                # under the warn floor and the bound under the champion's value; else noise.
                bound = upper_bound(labelled, metric, thresholds, seed=day.toordinal())
                if bound is not None and bound < floor:
                    s, verdict = ALERT, f"< the floor {floor:.3f}"
                elif bound is not None and value < warn_floor and bound < ref:
                    s, verdict = WARN, f"< champion {ref:.3f}"
                else:
                    s, verdict = OK, "within noise" if bound is not None else "not computable"
                bound_text = "-" if bound is None else f"{bound:.3f}"
                detail = f"{counts}; {thresholds.confidence:.0%} upper bound {bound_text} {verdict}"
            statuses.append(s)
            rows.append(
                DashboardRow(
                    f"{_NAMES[metric]} ({thresholds.window_days}-day window)",
                    "-" if floor is None else f"< {floor:.3f} ({thresholds.relative_floor_alert:g} x champion {ref:.3f})"
                    ", significant",
                    "pending" if value is None or not enough else f"{value:.3f}",
                    s,
                    detail,
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


def upper_bound(labelled: pd.DataFrame, metric: str, thresholds: PerformanceThresholds, seed: int = 0) -> float | None:
    """The upper `thresholds.confidence` bound of `metric` over `labelled` (label, probability,
    decision, and user_id when present) from a stratified cluster bootstrap: a card holder's
    transactions are resampled together (an account takeover is a burst of frauds that a model
    catches or misses as one, so rows are not independent), card holders with a fraud and without
    separately, so every resample keeps the window's fraud share. Rows without a user_id are their
    own clusters."""
    y = labelled[fr.LABEL].to_numpy(dtype="int64")
    scores = labelled["probability"].to_numpy(dtype="float64")
    flagged = (labelled["decision"] == FLAGGED).to_numpy()
    if y.min(initial=1) == 1 or y.max(initial=0) == 0:
        return None
    keys = labelled["user_id"] if "user_id" in labelled.columns else pd.Series(np.arange(len(y)))
    cluster = pd.factorize(keys.fillna(-1).to_numpy() if keys.isna().any() else keys.to_numpy())[0]
    has_fraud = np.bincount(cluster, weights=y, minlength=cluster.max() + 1) > 0
    strata = [np.flatnonzero(has_fraud), np.flatnonzero(~has_fraud)]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(thresholds.bootstrap_resamples):
        counts = np.zeros(len(has_fraud))
        for members in strata:
            counts[members] = rng.multinomial(len(members), np.full(len(members), 1 / len(members)))
        value = _weighted_metric(metric, y, scores, flagged, counts[cluster])
        if value is not None:
            values.append(value)
    return float(np.quantile(values, thresholds.confidence)) if values else None


def _weighted_metric(metric: str, y: np.ndarray, scores: np.ndarray, flagged: np.ndarray,
                     w: np.ndarray) -> float | None:
    keep = w > 0
    y, scores, flagged, w = y[keep], scores[keep], flagged[keep], w[keep]
    if len(np.unique(y)) < 2:
        return None
    if metric == "roc_auc":
        return float(roc_auc_score(y, scores, sample_weight=w))
    if metric == "pr_auc":
        return float(average_precision_score(y, scores, sample_weight=w))
    tp, fp, fn = (float(w[flagged & (y == 1)].sum()), float(w[flagged & (y == 0)].sum()),
                  float(w[~flagged & (y == 1)].sum()))
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if metric == "precision":
        return precision
    if metric == "recall":
        return recall
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def _metrics_of(labelled: pd.DataFrame) -> dict:
    return served_metrics(
        labelled[fr.LABEL].to_numpy(dtype="int64"),
        labelled["probability"].to_numpy(dtype="float64"),
        (labelled["decision"] == FLAGGED).to_numpy(),
    )
