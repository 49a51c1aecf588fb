"""Monitoring as daily-partitioned Dagster assets over `ml_platform.monitoring`.

sources:     label_feed (the labels that arrived that day)
monitoring:  data_drift, prediction_drift, model_performance, serving_health -> monitoring_dashboard

Each monitor asset records its figures as numeric metadata (plotted over partitions in the UI),
its dashboard rows as a table, and an asset check that turns its status into a check result
(WARN for warn, ERROR for alert; pending and no_data pass with that description). The
dashboard asset gathers the day's four results into one table and writes the HTML report.

Monitoring runs one day per run (Dagster's default backfill policy: a range is one run per day),
so every partition has its own materialization, figures and check result.
"""

# No `from __future__ import annotations` here: Dagster reads the context annotations.

import datetime as dt

import dagster as dg

from ml_platform.defs.assets import PARTITIONS_START, daily_partitions
from ml_platform.defs.resources import (
    EventSourceResource,
    FeatureStoreResource,
    MLflowRegistryResource,
    MonitoringResource,
)

MONITOR_ASSETS = ("data_drift", "prediction_drift", "model_performance", "serving_health")


def status_check_name(monitor: str) -> str:
    return f"{monitor}_status"


def _day(context: dg.AssetExecutionContext) -> dt.date:
    return dt.date.fromisoformat(context.partition_key)


@dg.asset(
    group_name="sources",
    kinds={"parquet"},
    partitions_def=daily_partitions,
    deps=["raw_transactions"],
    description="The labels that arrived that day (chargebacks 1-30 days after a fraud, legit labels after "
    "the maturity period): raw/labels/date=YYYY-MM-DD/, from the generator or the user's label files; "
    "merged into the raw events' label columns (with their arrival times).",
)
def label_feed(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
               event_source: EventSourceResource) -> dg.MaterializeResult:
    from ml_platform.sources import labels, raw_events
    from ml_platform.sources.generator import MAX_CHARGEBACK_DELAY_DAYS

    days = [_day(context)]
    raw_dir = feature_store.raw_dir
    if event_source.kind == "files":
        if not event_source.labels_path:
            raise dg.Failure("event_source.kind is 'files' but labels_path is not set: where do labels arrive?")
        paths = labels.import_label_files(event_source.labels_path, raw_dir, days)
        counts = {d.isoformat(): len(labels.read_labels(raw_dir, since=d, until=d)) for d in days}
    else:
        existing = raw_events.all_partition_days(raw_dir)
        first = existing[0] if existing else dt.date.fromisoformat(PARTITIONS_START)
        config = event_source.generator_config(start=first, days=1)
        paths, counts = [], {}
        for day in days:
            frame = labels.synthetic_label_arrivals(config, day, first_event_day=first)
            paths.append(labels.write_labels(frame, raw_dir, day))
            counts[day.isoformat()] = len(frame)
    latest = labels.read_labels(raw_dir, since=days[-1], until=days[-1])
    # The raw table's label columns hold every label known so far (each with its arrival time), so
    # the label-based features and the next training see today's arrivals.
    lookback = MAX_CHARGEBACK_DELAY_DAYS + 1
    updated = labels.merge_into_raw(
        raw_dir, latest, days=[days[-1] - dt.timedelta(days=i) for i in range(lookback + 1)]
    )
    return dg.MaterializeResult(
        metadata={
            "labels": sum(counts.values()),
            "frauds": int(latest["is_fraud"].sum()) if len(latest) else 0,
            "days": dg.MetadataValue.json(counts),
            "raw_days_updated": len(updated),
            "path": dg.MetadataValue.path(str(paths[-1].parent)),
        }
    )


def _numeric(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            out[key] = dg.MetadataValue.int(value)
        elif isinstance(value, float):
            out[key] = dg.MetadataValue.float(value)
    return out


_TABLE_SCHEMA = dg.TableSchema(
    columns=[dg.TableColumn(name, "string") for name in ("metric", "threshold", "value", "status", "detail")]
)


def _rows_table(rows) -> dg.TableMetadataValue:
    return dg.MetadataValue.table(
        [dg.TableRecord({"metric": r.metric, "threshold": r.threshold, "value": r.value,
                         "status": r.status.upper(), "detail": r.detail}) for r in rows],
        schema=_TABLE_SCHEMA,
    )


def _check(monitor: str, result) -> dg.AssetCheckResult:
    from ml_platform.monitoring.status import ALERT, is_alarm

    alarms = [r for r in result.rows if is_alarm(r.status)]
    described = "; ".join(f"{r.metric}: {r.value} ({r.status})" for r in alarms[:5]) or (
        f"{result.status}: " + "; ".join(f"{r.metric}: {r.value}" for r in result.rows[:3])
    )
    return dg.AssetCheckResult(
        asset_key=monitor,
        check_name=status_check_name(monitor),
        passed=not is_alarm(result.status),
        severity=dg.AssetCheckSeverity.ERROR if result.status == ALERT else dg.AssetCheckSeverity.WARN,
        description=described[:1000],
        metadata={"status": result.status, "day": result.day},
    )


def _monitor_asset(monitor: str, deps: list[str], description: str, kinds: set[str]):
    @dg.asset(
        name=monitor,
        group_name="monitoring",
        kinds=kinds,
        partitions_def=daily_partitions,
            deps=deps,
        check_specs=[
            dg.AssetCheckSpec(status_check_name(monitor), asset=monitor,
                              description=f"{monitor}'s status for the day: WARN on warn, ERROR on alert")
        ],
        description=description,
    )
    def _asset(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
               mlflow: MLflowRegistryResource, monitoring: MonitoringResource):
        from ml_platform.monitoring import daily

        inputs = monitoring.inputs(feature_store, mlflow)
        run = {
            "data_drift": lambda d: daily.run_data_drift(inputs, d)[0],
            "prediction_drift": lambda d: daily.run_prediction_drift(inputs, d),
            "model_performance": lambda d: daily.run_model_performance(inputs, d),
            "serving_health": lambda d: daily.run_serving_health(inputs, d),
        }[monitor]
        day = _day(context)
        try:
            result = run(day)
        except LookupError as exc:  # no champion yet
            raise dg.Failure(f"{monitor} {day}: {exc}") from exc
        context.log.info(f"{monitor} {day}: {result.status}")
        return dg.MaterializeResult(
            metadata={
                "status": result.status,
                "day": result.day,
                "model_version": result.model_version,
                "dashboard": _rows_table(result.rows),
                **_numeric(result.metrics),
            },
            check_results=[_check(monitor, result)],
        )

    return _asset


data_drift = _monitor_asset(
    "data_drift",
    ["prediction_log", "batch_predictions", "registered_model"],
    "The day's model inputs (prediction log; the day's point-in-time features if nothing was served) against "
    "the champion's training sample: KS / chi-square per column with effect-size floors.",
    {"pandas", "scipy"},
)
prediction_drift = _monitor_asset(
    "prediction_drift",
    ["prediction_log", "batch_predictions", "registered_model"],
    "The day's flag rate and score distribution against the champion's own validation predictions.",
    {"pandas", "scipy"},
)
model_performance = _monitor_asset(
    "model_performance",
    ["prediction_log", "batch_predictions", "label_feed", "registered_model"],
    "Precision, recall, PR AUC, ROC AUC of the served predictions whose labels have arrived, per day and over "
    "a trailing window, against the champion's evaluation; label completeness per day.",
    {"pandas", "scikitlearn"},
)
serving_health = _monitor_asset(
    "serving_health",
    ["prediction_log"],
    "Latency p50/p99 per online path and the error rate, from the prediction log and the API's metrics.",
    {"pandas"},
)


@dg.asset(
    group_name="monitoring",
    kinds={"html"},
    partitions_def=daily_partitions,
    deps=list(MONITOR_ASSETS),
    description="The day's monitoring dashboard: one table of every monitored figure with its threshold and "
    "status, and a self-contained HTML report under data/reports/ (histograms, figures over time).",
)
def monitoring_dashboard(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                         mlflow: MLflowRegistryResource, monitoring: MonitoringResource) -> dg.MaterializeResult:
    from ml_platform.monitoring.daily_report import write_daily_report
    from ml_platform.monitoring.dashboard import Dashboard
    from ml_platform.monitoring.results import load_result

    monitoring_dir = feature_store.paths.monitoring_dir
    reports_dir = monitoring.reports_dir(feature_store)
    config = monitoring.config()
    day = _day(context)
    found = {m: load_result(monitoring_dir, m, day) for m in MONITOR_ASSETS}
    board = Dashboard(day.isoformat(), {m: r for m, r in found.items() if r is not None})
    path = write_daily_report(board, monitoring_dir, reports_dir, config, model_name=mlflow.model_name)
    context.log.info("\n" + board.to_text())
    rows = board.rows()
    return dg.MaterializeResult(
        metadata={
            "status": board.status,
            "day": board.day,
            # The monitor is in each metric's name: the UI's table keeps to what a person reads.
            "dashboard": _rows_table(row for result in board.results.values() for row in result.rows),
            "report": dg.MetadataValue.path(str(path)),
            "report_url": dg.MetadataValue.url(path.resolve().as_uri()),
            "alerts": sum(r["status"] == "alert" for r in rows),
            "warnings": sum(r["status"] == "warn" for r in rows),
            "not_run": dg.MetadataValue.json(board.missing),
        },
    )


MONITORING_ASSETS = [label_feed, data_drift, prediction_drift, model_performance, serving_health, monitoring_dashboard]
