"""The cost asset: `cost_report` (group "cost"), training vs serving cost per 1,000 predictions
over `ml_platform.costs`.

Measured compute comes from the Dagster instance: the runs that materialized `registered_model`
(their training steps' durations, the registered `version`) and `batch_predictions` (the step's
duration, the `model_version` and `rows` of its metadata), whatever job ran them (scheduled,
CLI or the UI); only successful steps count. Predictions of the online and stream paths come
from the prediction log; the API's CPU seconds from its /metrics (monitoring's
`api_metrics_url`) when reachable. The stream worker's CPU is not measured: its `WorkerStats`
live in the worker process and are not persisted.
"""

# No `from __future__ import annotations` here: Dagster reads the context/config annotations.

import dagster as dg

from ml_platform.defs import assets as a
from ml_platform.defs.resources import FeatureStoreResource, MonitoringResource

# The steps a training run is billed for: the offline feature tables and the training group.
TRAINING_STEPS = frozenset(
    key.to_user_string()
    for asset in (*a.feature_table_assets, a.training_set, a.trained_model, a.model_evaluation, a.registered_model)
    for key in asset.keys
)
BATCH_STEP = "batch_predictions"
REGISTER_STEP = "registered_model"


class CostConfig(dg.Config):
    """The period (ISO days, both included; unset: every logged day) and the prices file (TOML;
    unset: ML_PLATFORM_COST_CONFIG, else the defaults)."""

    start: str | None = None
    end: str | None = None
    prices_path: str | None = None


def _materializations(instance: dg.DagsterInstance, asset: str) -> dict:
    """{run id: (metadata, partitions)} of the runs that materialized `asset` (a range run once)."""
    out: dict = {}
    cursor = None
    while True:
        page = instance.fetch_materializations(dg.AssetKey(asset), limit=1000, cursor=cursor)
        for record in page.records:
            entry = out.setdefault(record.run_id, (record.asset_materialization.metadata, set()))
            if record.asset_materialization.partition:
                entry[1].add(record.asset_materialization.partition)
        if not page.has_more:
            return out
        cursor = page.cursor


def _value(metadata: dict, key: str):
    value = metadata.get(key)
    value = getattr(value, "value", value)
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _in_period(day: str, start, end) -> bool:
    return (start is None or day >= start.isoformat()) and (end is None or day <= end.isoformat())


def measured_steps(instance: dg.DagsterInstance, start=None, end=None) -> list:
    """The StepRecords of every run that registered a model (its steps started within
    [start, end]) or scored a batch (of a day within it); None: unbounded."""
    import datetime as dt

    from ml_platform.costs import BATCH, TRAINING, StepRecord

    records = []
    for kind, asset, wanted in ((TRAINING, REGISTER_STEP, TRAINING_STEPS), (BATCH, BATCH_STEP, {BATCH_STEP})):
        for run_id, (metadata, partitions) in _materializations(instance, asset).items():
            if kind == BATCH and partitions and not any(_in_period(p, start, end) for p in partitions):
                continue
            run = instance.get_run_by_id(run_id)
            version = _value(metadata, "version" if kind == TRAINING else "model_version")
            rows = _value(metadata, "rows") if kind == BATCH else None
            for stats in instance.get_run_step_stats(run_id):
                if (stats.step_key in wanted and getattr(stats.status, "value", None) == "SUCCESS"
                        and stats.start_time is not None and stats.end_time is not None):
                    started = dt.datetime.fromtimestamp(stats.start_time, dt.UTC).date().isoformat()
                    if kind == TRAINING and not _in_period(started, start, end):
                        continue
                    records.append(StepRecord(kind, run_id, run.job_name if run else "", stats.step_key,
                                              max(0.0, stats.end_time - stats.start_time), version, rows))
    return records


def _api_cpu(url: str | None):
    from ml_platform.costs import serving_cpu_from_metrics
    from ml_platform.monitoring.serving_health import fetch_metrics_text

    text, why = fetch_metrics_text(url)
    if text is None:
        return None, why
    cpu = serving_cpu_from_metrics(text, source=url)
    return cpu, f"API CPU from {url}" if cpu else f"{url} exposes no process_cpu_seconds_total"


def _text(value, digits: int = 6) -> str:
    from ml_platform.costs import NOT_MEASURED

    if value is None:
        return NOT_MEASURED
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


_TABLE_SCHEMA = dg.TableSchema(
    columns=[dg.TableColumn(name, "string") for name in
             ("path", "model_version", "predictions", "compute_s", "always_on_h", "cost_usd", "usd_per_1000",
              "usd_per_1000_compute", "note")]
)


@dg.asset(
    group_name="cost",
    kinds={"pandas"},
    deps=[REGISTER_STEP, BATCH_STEP, "prediction_log"],
    description="Infrastructure cost, training vs serving: the measured step durations of training and batch "
    "scoring runs, the API's CPU and the always-on replicas, priced (UnitPrices, ML_PLATFORM_COST_CONFIG), as "
    "USD per model version and per 1,000 predictions per path (batch, online, stream).",
)
def cost_report(context: dg.AssetExecutionContext, config: CostConfig, feature_store: FeatureStoreResource,
                monitoring: MonitoringResource) -> dg.MaterializeResult:
    from ml_platform import costs
    from ml_platform.serving.prediction_log_reader import logged_days, read_prediction_log
    from ml_platform.sources.raw_events import parse_date

    start = parse_date(config.start, "cost_report config start") if config.start else None
    end = parse_date(config.end, "cost_report config end") if config.end else None
    if start and end and end < start:
        raise dg.Failure(f"cost_report config: end = {config.end!r} is before start = {config.start!r}")
    prices = costs.load_unit_prices(config.prices_path)
    steps = measured_steps(context.instance, start, end)  # compute spent for the same period
    log_dir = feature_store.predictions_log_dir
    log = read_prediction_log(log_dir, start=start, end=end, sources=["api", "stream"], with_features=False)
    days = logged_days(log_dir)
    period_hours = {}
    for path in (costs.ONLINE, costs.STREAM):
        span = [d for d in days[costs.LOG_SOURCE[path]] if (start is None or d >= start) and (end is None or d <= end)]
        if start and end and span:  # the configured period: the replicas ran all of it
            span = [start, end]
        period_hours[path] = costs.period_hours_of_days(span)
    api_cpu, api_note = _api_cpu(monitoring.api_metrics_url)
    report = costs.compute_cost_report(steps, costs.prediction_counts(log), prices,
                                       serving_cpu={costs.ONLINE: api_cpu}, period_hours=period_hours)
    context.log.info(f"cost_report: {len(steps)} step(s); {api_note}; not measured: {report.not_measured}")
    table = dg.MetadataValue.table(
        [dg.TableRecord({"path": r.path, "model_version": _text(r.model_version) if r.model_version is not None else "-",
                         "predictions": _text(r.predictions), "compute_s": _text(r.compute_seconds),
                         "always_on_h": _text(r.always_on_hours), "cost_usd": _text(r.cost_usd),
                         "usd_per_1000": _text(r.usd_per_1000), "usd_per_1000_compute": _text(r.usd_per_1000_compute),
                         "note": r.note}) for r in report.rows],
        schema=_TABLE_SCHEMA,
    )
    figures = {
        "total_usd": report.totals["all"]["cost_usd"],
        **{f"{path}_usd": report.totals.get(path, {}).get("cost_usd") for path in (costs.TRAINING, *costs.SERVING_PATHS)},
        **{f"{path}_usd_per_1000": report.totals.get(path, {}).get("usd_per_1000") for path in costs.SERVING_PATHS},
        **{f"{path}_predictions": report.totals.get(path, {}).get("predictions") for path in costs.SERVING_PATHS},
        **{f"{path}_utilization": report.totals.get(path, {}).get("utilization") for path in (costs.ONLINE, costs.STREAM)},
        **report.ratios,
    }
    numeric = {k: dg.MetadataValue.int(v) if isinstance(v, int) else dg.MetadataValue.float(float(v))
               for k, v in figures.items() if v is not None}
    return dg.MaterializeResult(
        metadata={
            "costs": table,
            **numeric,
            "not_measured": dg.MetadataValue.json(report.not_measured),
            "api_cpu": api_note,
            "steps": len(steps),
            "prices": dg.MetadataValue.json(report.to_dict()["prices"]),
            "period": f"{start or 'first logged day'} .. {end or 'last logged day'}",
        }
    )
