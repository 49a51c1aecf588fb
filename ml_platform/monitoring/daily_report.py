"""The day's self-contained HTML monitoring report (data/reports/monitoring_<day>.html): the overall
status, key figures, the dashboard table, the drifted columns' reference-vs-current histograms,
the score distribution, and every monitored figure over the last weeks with its threshold.
Built from the saved monitor results only, so it can be rebuilt for any past day."""

from __future__ import annotations

from html import escape as html_escape
from pathlib import Path

from ml_platform.monitoring import html
from ml_platform.monitoring.config import MonitoringConfig
from ml_platform.monitoring.dashboard import Dashboard
from ml_platform.monitoring.drift_report import DriftReport, column_chart
from ml_platform.monitoring.results import MonitorResult, load_history

HISTORY_DAYS = 42


def report_path(reports_dir: str | Path, day: str) -> Path:
    return Path(reports_dir) / f"monitoring_{day}.html"


def _series(history: list[MonitorResult], key: str) -> list[float | None]:
    return [r.metrics.get(key) for r in history]


def _history_charts(monitoring_dir: Path, day: str, config: MonitoringConfig) -> list[str]:
    charts = []
    drift = load_history(monitoring_dir, "data_drift", until=day, days=HISTORY_DAYS)
    if drift:
        charts.append(html.line_chart_svg(
            [r.day for r in drift], {"columns alerting": _series(drift, "columns_alert"),
                                     "columns warning": _series(drift, "columns_warn")},
            title="Data drift: columns alerting per day", threshold=0.5, threshold_label="any alert",
            bad_side="above", y_format="{:.0f}",
        ))
    pred = load_history(monitoring_dir, "prediction_drift", until=day, days=HISTORY_DAYS)
    if pred:
        ref = next((r.metrics.get("reference_positive_rate") for r in reversed(pred)
                    if r.metrics.get("reference_positive_rate") is not None), None)
        charts.append(html.line_chart_svg(
            [r.day for r in pred], {"flag rate": _series(pred, "positive_rate")},
            title="Prediction positive (flag) rate",
            threshold=None if ref is None else ref * config.prediction.positive_rate_ratio_alert,
            threshold_label=f"x{config.prediction.positive_rate_ratio_alert:g} validation", bad_side="above",
            y_format="{:.1%}", reference=ref,
        ))
    perf = load_history(monitoring_dir, "model_performance", until=day, days=HISTORY_DAYS)
    if perf:
        reference = (perf[-1].details.get("reference") or {})
        for metric, name in (("pr_auc", "PR AUC"), ("recall", "Recall")):
            ref = reference.get(metric)
            charts.append(html.line_chart_svg(
                [r.day for r in perf], {f"{name} (window)": _series(perf, f"window_{metric}"),
                                        f"{name} (day)": _series(perf, f"day_{metric}")},
                title=f"{name} on labelled predictions",
                threshold=None if ref is None else ref * config.performance.relative_floor_alert,
                threshold_label=f"{config.performance.relative_floor_alert:g} x champion", bad_side="below",
                y_format="{:.2f}", reference=ref,
            ))
        charts.append(html.line_chart_svg(
            [r.day for r in perf], {"label completeness": _series(perf, "day_label_completeness")},
            title="Label completeness of the day's predictions (as known that day)",
            threshold=config.performance.min_label_completeness, threshold_label="counted from",
            y_format="{:.0%}",
        ))
    health = load_history(monitoring_dir, "serving_health", until=day, days=HISTORY_DAYS)
    if health and any(r.metrics.get(f"{s}_latency_p99_ms") is not None for r in health for s in ("api", "stream")):
        charts.append(html.line_chart_svg(
            [r.day for r in health], {f"{s} p99": _series(health, f"{s}_latency_p99_ms") for s in ("api", "stream")},
            title="Latency p99 (ms)", threshold=config.serving.latency_p99_ms_alert,
            threshold_label="alert", bad_side="above", y_format="{:.0f}",
        ))
    return charts


def build_daily_report(dashboard: Dashboard, monitoring_dir: str | Path, config: MonitoringConfig,
                       *, model_name: str = "") -> str:
    """The report page of `dashboard.day` (HTML text)."""
    monitoring_dir = Path(monitoring_dir)
    day = dashboard.day
    results = dashboard.results
    versions = sorted({r.model_version for r in results.values() if r.model_version is not None})
    champion = f"{model_name} v{versions[-1]}" if versions else model_name
    tiles = []
    if "data_drift" in results:
        r = results["data_drift"]
        tiles.append(("Data drift: columns alerting", f"{r.metrics.get('columns_alert', 0)} of {r.metrics.get('columns', 0)}", r.status))
    if "prediction_drift" in results:
        r = results["prediction_drift"]
        rate = r.metrics.get("positive_rate")
        tiles.append(("Flag rate", "n/a" if rate is None else f"{rate:.2%}", r.status))
    if "model_performance" in results:
        r = results["model_performance"]
        value = r.metrics.get("window_pr_auc")
        tiles.append(("PR AUC (window)", "pending" if value is None else f"{value:.3f}", r.status))
    if "serving_health" in results:
        r = results["serving_health"]
        p99 = r.metrics.get("api_latency_p99_ms", r.metrics.get("stream_latency_p99_ms"))
        tiles.append(("Latency p99", "n/a" if p99 is None else f"{p99:.1f} ms", r.status))
    # What a person looks at first: the figures, the pictures of what moved, the trends; the
    # full tables after.
    drift_sections: list[tuple[str, str]] = []
    if "data_drift" in results and results["data_drift"].details.get("report"):
        drift_sections = DriftReport.from_dict(results["data_drift"].details["report"]).html_sections()
    charts = [body for heading, body in drift_sections if heading.startswith("Drifted columns")]
    sections = [("Today", html.tiles_html(tiles))]
    if charts:
        sections.append(("Data drift: what moved (reference vs this day)", charts[0]))
    history = _history_charts(monitoring_dir, day, config)
    if history:
        sections.append((f"Over time (last {HISTORY_DAYS} days)", html.grid_html(history)))
    sections.append(("Dashboard", html.table_html(dashboard.rows(), ["monitor", "metric", "threshold", "value",
                                                                      "status", "detail"])))
    score = results["prediction_drift"].details.get("score_drift") if "prediction_drift" in results else None
    if score:
        column = DriftReport.from_dict(score).columns[0]
        if column.plot.get("labels"):
            sections.append(("Scores: held-out validation vs this day", column_chart(column)))
    sections += [(h, b) for h, b in drift_sections if not h.startswith("Drifted columns")]
    if dashboard.missing:
        missing = html_escape(", ".join(dashboard.missing))
        sections.append(("Not run", f"<p>{missing} did not run for this day.</p>"))
    return html.page_html(
        f"Monitoring {day}",
        sections,
        subtitle=f"champion {champion}; thresholds: ML_PLATFORM_MONITORING_CONFIG or the defaults in README",
        status=dashboard.status,
    )


def write_daily_report(dashboard: Dashboard, monitoring_dir: str | Path, reports_dir: str | Path,
                       config: MonitoringConfig, *, model_name: str = "") -> Path:
    return html.write_report(
        report_path(reports_dir, dashboard.day),
        build_daily_report(dashboard, monitoring_dir, config, model_name=model_name),
    )
