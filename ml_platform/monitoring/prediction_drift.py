"""Prediction drift: does the model now flag (or score) differently than on its own validation data?

Two signals on the day's served predictions (every source, one row per transaction):
- the flag rate (share of `fraud` decisions) against the validation flag rate at the same
  threshold: alert when a test rejects "same rate" at `alpha` AND the rate moved by at least
  `positive_rate_ratio_alert` (up, or down by the same factor), warn at the warn ratio. The test
  is a beta-binomial with the day-to-day variation of the model's own held-out days (flags come in
  bursts: `rate_test`), the binomial for a reference without it;
- the score distribution against the validation scores, with the drift library's rules
  (KS + an effect-size floor), so a shift of the whole score mass is seen before it crosses the
  threshold.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ml_platform.monitoring.config import PredictionThresholds
from ml_platform.monitoring.drift import DriftThresholds, detect_drift
from ml_platform.monitoring.rate_test import rate_pvalue
from ml_platform.monitoring.reference import SCORE, MonitoringReference
from ml_platform.monitoring.results import DashboardRow, MonitorResult
from ml_platform.monitoring.status import ALERT, NO_DATA, OK, WARN, worst

MONITOR = "prediction_drift"
FLAGGED = "fraud"  # the decision that flags a transaction (the prediction log's encoding)


def flag_rate_status(flagged: int, rows: int, reference_rate: float, t: PredictionThresholds,
                     rho: float = 0.0) -> tuple[str, float | None, float]:
    """(status, p-value, ratio) of `flagged` of `rows` against `reference_rate`, with the day-to-day
    overdispersion `rho` of the model's held-out days (`rate_test`)."""
    if rows < t.min_rows:
        return NO_DATA, None, float("nan")
    rate = flagged / rows
    # A reference rate of 0 (no validation row flagged) would make any flag infinitely "more":
    # compare with half a flag in the validation set instead (the usual continuity floor).
    base = max(reference_rate, 0.5 / max(rows, 1))
    ratio = rate / base if rate >= base else base / max(rate, 0.5 / rows)
    p_value = rate_pvalue(flagged, rows, min(max(base, 1e-12), 1 - 1e-12), rho)
    if p_value >= t.alpha:
        return OK, p_value, ratio
    if ratio >= t.positive_rate_ratio_alert:
        return ALERT, p_value, ratio
    if ratio >= t.positive_rate_ratio_warn:
        return WARN, p_value, ratio
    return OK, p_value, ratio


def prediction_drift(
    reference: MonitoringReference,
    predictions: pd.DataFrame,
    day: str,
    thresholds: PredictionThresholds,
    drift_thresholds: DriftThresholds,
    *,
    model_version: int | None = None,
) -> MonitorResult:
    """The day's prediction drift. `predictions`: the day's log rows (probability, decision,
    source), one per transaction; rows without a probability (not scored) are left out."""
    scored = predictions[predictions["probability"].notna()] if len(predictions) else predictions
    rows = len(scored)
    ref_rate = reference.positive_rate
    flagged = int((scored["decision"] == FLAGGED).sum()) if rows else 0
    rate = flagged / rows if rows else None
    rho = reference.flag_rate_rho
    rate_status, p_value, ratio = flag_rate_status(flagged, rows, ref_rate, thresholds, rho)
    test = "binomial" if rho == 0 else f"beta-binomial (rho {rho:.2g} from the held-out days)"
    up, down = ref_rate * thresholds.positive_rate_ratio_alert, ref_rate / thresholds.positive_rate_ratio_alert
    out_rows = [
        DashboardRow(
            "Prediction positive rate",
            f"> {up:.2%} or < {down:.2%} (validation {ref_rate:.2%}), p < {thresholds.alpha:g}",
            "no predictions" if rate is None else f"{rate:.2%} ({flagged} of {rows})",
            rate_status,
            "" if p_value is None else f"{test} p = {p_value:.2g}, x{ratio:.2f} the validation rate",
        )
    ]
    score_status = NO_DATA
    score_details: dict = {}
    if rows >= thresholds.min_rows:
        report = detect_drift(
            reference.scores[[SCORE]], scored[[SCORE]].astype({SCORE: "float64"}), thresholds=drift_thresholds
        )
        column = report.to_frame().iloc[0]
        score_status = str(column["status"])
        score_details = report.to_dict()
        out_rows.append(
            DashboardRow(
                "Score distribution (KS)",
                f"p < {drift_thresholds.alpha:g} and effect >= floor",
                f"D = {column['statistic']:.3f}, p = {column['p_value']:.2g}",
                score_status,
                f"effect {column['effect_size']:.3f}",
            )
        )
    by_source = (
        {
            str(source): {"rows": len(part), "flag_rate": float((part["decision"] == FLAGGED).mean())}
            for source, part in scored.groupby("source", sort=True)
        }
        if rows and "source" in scored.columns
        else {}
    )
    scores = scored[SCORE].to_numpy(dtype="float64") if rows else np.array([])
    return MonitorResult(
        monitor=MONITOR,
        day=day,
        status=worst([rate_status, score_status]) if rows >= thresholds.min_rows else NO_DATA,
        rows=out_rows,
        metrics={
            "rows": rows,
            "positive_rate": rate,
            "reference_positive_rate": ref_rate,
            "positive_rate_ratio": None if not math.isfinite(ratio) else ratio,
            "positive_rate_p_value": p_value,
            "score_mean": float(scores.mean()) if rows else None,
            "score_p95": float(np.quantile(scores, 0.95)) if rows else None,
        },
        details={"by_source": by_source, "score_drift": score_details, "threshold": reference.threshold},
        model_version=model_version,
    )
