"""Serving health: latency and errors of the day's online predictions.

Latency p50/p99 per online source (api, stream) from the prediction log's per-prediction
`latency_ms` (batch rows carry the batch's own figure and are reported apart, not mixed in).
The error rate is the share of logged predictions that could not be scored (no probability),
plus, when the API's Prometheus endpoint is reachable, the API's failed predictions
(`ml_platform_prediction_errors_total`) over all its predictions since it started.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.monitoring.config import ServingThresholds
from ml_platform.monitoring.results import DashboardRow, MonitorResult
from ml_platform.monitoring.status import ALERT, NO_DATA, OK, WARN, worst

MONITOR = "serving_health"
ONLINE_SOURCES = ("api", "stream")


def _level(value: float | None, warn: float, alert: float) -> str:
    if value is None:
        return NO_DATA
    return ALERT if value > alert else WARN if value > warn else OK


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN|[+-]Inf)$")


def metric_totals(text: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """Each of `names` summed over its labels in a Prometheus text exposition (None: absent)."""
    totals: dict[str, float | None] = dict.fromkeys(names)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) in totals:
            totals[m.group(1)] = (totals[m.group(1)] or 0.0) + float(m.group(2))
    return totals


def parse_api_metrics(text: str) -> dict[str, float]:
    """Totals from the API's Prometheus text: predictions and prediction errors (all labels summed)."""
    t = metric_totals(text, ("ml_platform_predictions_total", "ml_platform_prediction_errors_total"))
    return {"predictions": t["ml_platform_predictions_total"] or 0.0,
            "prediction_errors": t["ml_platform_prediction_errors_total"] or 0.0}


def fetch_metrics_text(url: str | None, timeout_s: float = 2.0) -> tuple[str | None, str]:
    """(the API's /metrics text, "") or (None, why): not configured, or not reachable."""
    if not url:
        return None, "no API metrics URL configured"
    import httpx

    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        return None, f"API metrics at {url} not reachable ({type(exc).__name__})"
    return response.text, ""


def fetch_api_metrics(url: str | None, timeout_s: float = 2.0) -> tuple[dict[str, float] | None, str]:
    """(totals, note) from the API's /metrics; (None, why) when it is not configured or not reachable."""
    text, why = fetch_metrics_text(url, timeout_s)
    return (None, why) if text is None else (parse_api_metrics(text), f"API metrics from {url}")


def serving_health(
    log: pd.DataFrame,
    day: str,
    thresholds: ServingThresholds,
    *,
    api_metrics: dict[str, float] | None = None,
    api_note: str = "",
) -> MonitorResult:
    """The day's serving health from its prediction-log rows (every source)."""
    rows: list[DashboardRow] = []
    metrics: dict[str, Any] = {}
    statuses = []
    by_source: dict[str, dict] = {}
    online = log[log["source"].isin(ONLINE_SOURCES)] if len(log) else log
    for source in ONLINE_SOURCES:
        part = online[online["source"] == source] if len(online) else online
        latency = part["latency_ms"].dropna().to_numpy(dtype="float64") if len(part) else np.array([])
        if len(latency) == 0:
            continue
        p50, p99 = (float(v) for v in np.quantile(latency, [0.5, 0.99]))
        enough = len(latency) >= thresholds.min_rows
        s = _level(p99, thresholds.latency_p99_ms_warn, thresholds.latency_p99_ms_alert) if enough else NO_DATA
        statuses.append(s)
        by_source[source] = {"rows": len(part), "latency_p50_ms": p50, "latency_p99_ms": p99}
        metrics[f"{source}_latency_p99_ms"] = p99
        metrics[f"{source}_latency_p50_ms"] = p50
        metrics[f"{source}_rows"] = len(part)
        rows.append(
            DashboardRow(
                f"Latency p99 ({source})",
                f"> {thresholds.latency_p99_ms_alert:g} ms",
                f"{p99:.1f} ms",
                s,
                f"p50 {p50:.1f} ms over {len(latency)} predictions" + ("" if enough else " (too few to judge)"),
            )
        )
    logged = len(log)
    failed = int(log["probability"].isna().sum()) if logged else 0
    errors, total, sources = failed, logged, ["log"]
    if api_metrics is not None:
        errors += int(api_metrics.get("prediction_errors", 0))
        total += int(api_metrics.get("predictions", 0) + api_metrics.get("prediction_errors", 0))
        sources.append("API counters")
    rate = errors / total if total else None
    rate_status = (
        _level(rate, thresholds.error_rate_warn, thresholds.error_rate_alert)
        if total >= thresholds.min_rows
        else NO_DATA
    )
    statuses.append(rate_status)
    metrics.update({"error_rate": rate, "errors": errors, "predictions_logged": logged})
    rows.append(
        DashboardRow(
            "Error rate",
            f"> {thresholds.error_rate_alert:.2%}",
            "no predictions" if rate is None else f"{rate:.3%} ({errors} of {total})",
            rate_status,
            " + ".join(sources) + (f"; {api_note}" if api_note else ""),
        )
    )
    if len(log) and (log["source"] == "batch").any():
        batch = log[log["source"] == "batch"]
        by_source["batch"] = {"rows": len(batch)}
        metrics["batch_rows"] = len(batch)
    measured = [s for s in statuses if s != NO_DATA]
    return MonitorResult(
        monitor=MONITOR,
        day=day,
        status=worst(measured) if measured else NO_DATA,
        rows=rows,
        metrics=metrics,
        details={"by_source": by_source, "api_metrics": api_metrics, "api_note": api_note},
    )
