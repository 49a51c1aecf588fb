"""Data drift of the model's inputs: the day's served inputs against the champion's training sample,
column by column with the drift library (`detect_drift`), as a daily monitor result.

A column alerts when its change is significant and its effect reaches the larger of the configured
floor and DAY_TO_DAY_MARGIN (2) x the largest effect one of the reference's own days had against the
whole reference (`MonitoringReference.day_to_day_effects`): a day's transactions are clustered
(merchants, bursts), and a label-derived feature such as a merchant's 30-day fraud rate moves
from day to day by more than sampling noise, which alarmed on quiet days of the demo's data."""

from __future__ import annotations

import pandas as pd

from ml_platform.monitoring.drift import DriftThresholds, detect_drift
from ml_platform.monitoring.reference import MonitoringReference
from ml_platform.monitoring.results import DashboardRow, MonitorResult
from ml_platform.monitoring.status import ALERT, NO_DATA, WARN

MONITOR = "data_drift"
DAY_TO_DAY_MARGIN = 2.0  # a serving day must differ twice as much as the most unusual reference day


def data_drift(
    reference: MonitoringReference,
    inputs: pd.DataFrame,
    day: str,
    thresholds: DriftThresholds,
    *,
    model_version: int | None = None,
    source_note: str = "",
):
    """(MonitorResult, DriftReport) of the day's model inputs (`inputs`: one row per transaction,
    the model's input columns; columns the day lacks are reported missing by the library)."""
    floors = {c: DAY_TO_DAY_MARGIN * e for c, e in reference.day_to_day_effects.items()}
    report = detect_drift(reference.inputs, inputs, thresholds=thresholds, effect_floors=floors)
    frame = report.to_frame()
    drifted = frame[frame["status"].isin([WARN, ALERT])]
    drifted = drifted.assign(_rank=drifted["status"].map({ALERT: 0, WARN: 1})).sort_values(
        ["_rank", "effect_size"], ascending=[True, False]
    )
    alerts = int((frame["status"] == ALERT).sum())
    warns = int((frame["status"] == WARN).sum())
    rows = [
        DashboardRow(
            "Data drift: columns alerting",
            f"any column: p_adj < {thresholds.alpha:g} and effect >= floor",
            "no inputs" if report.status == NO_DATA else f"{alerts} of {len(frame)} ({warns} warn)",
            report.status,
            f"{len(inputs)} rows vs {len(reference.inputs)} reference rows" + (f"; {source_note}" if source_note else ""),
        )
    ]
    for _, col in drifted.iterrows():
        rows.append(
            DashboardRow(
                f"Data drift ({col['feature']})",
                f"p_adj < {thresholds.alpha:g}, {col['effect_metric']} >= floor",
                _value(col),
                str(col["status"]),
                str(col.get("note") or ""),
            )
        )
    metrics = {
        "columns": len(frame),
        "columns_alert": alerts,
        "columns_warn": warns,
        "share_drifted": report.drift_share,
        "rows": len(inputs),
        # one figure per column: the effect size, plotted over time in the UI
        **{f"effect.{f}": (None if pd.isna(e) else float(e)) for f, e in zip(frame["feature"], frame["effect_size"], strict=True)},
    }
    result = MonitorResult(
        monitor=MONITOR,
        day=day,
        status=report.status,
        rows=rows,
        metrics=metrics,
        details={"report": report.to_dict(), "source": source_note},
        model_version=model_version,
    )
    return result, report


def _value(col) -> str:
    if col["test"] == "missing":
        return "column missing"
    p = col["p_value_adjusted"] if "p_value_adjusted" in col and pd.notna(col["p_value_adjusted"]) else col["p_value"]
    effect = col["effect_size"]
    p_text = "n/a" if pd.isna(p) else f"{p:.2g}"
    e_text = "n/a" if pd.isna(effect) else f"{effect:.3f}"
    return f"p = {p_text}, {col['effect_metric']} = {e_text}"
