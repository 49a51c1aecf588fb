"""Jobs, schedules and the assembled Definitions; plus the in-process runner the CLI uses."""


import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from ml_platform.defs import assets as a
from ml_platform.defs import cost as c
from ml_platform.defs import experiments as x
from ml_platform.defs import monitoring as m
from ml_platform.defs.executors import executor_for, runs_out_of_process
from ml_platform.defs.resources import MLflowRegistryResource, default_resources
from ml_platform.defs.sensors import retrain_sensor
from ml_platform.settings import Settings, load_settings

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

ALL_ASSETS = [
    a.users,
    a.raw_transactions,
    *a.feature_table_assets,
    a.training_set,
    a.trained_model,
    a.model_evaluation,
    a.registered_model,
    a.online_features,
    a.batch_predictions,
    a.prediction_log,
    *m.MONITORING_ASSETS,
    c.cost_report,
    *x.EXPERIMENT_ASSETS,
    x.rollout_status,
]
MONITORING_SELECTION = dg.AssetSelection.assets("label_feed", "experiment_rewards") | dg.AssetSelection.groups(
    "monitoring"
)

training_pipeline = dg.define_asset_job(
    "training_pipeline",
    selection=dg.AssetSelection.all()
    - dg.AssetSelection.assets("batch_predictions", "prediction_log")
    - MONITORING_SELECTION
    - dg.AssetSelection.groups("cost", "experiments"),
    description="End to end: raw events -> validation -> features -> training set -> train -> evaluate -> register.",
)
retrain_job = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.groups("features", "training"),
    description="Recompute features from the raw events already ingested, then train, evaluate and register.",
)


class RollbackConfig(dg.Config):
    reason: str
    who: str = ""


@dg.op(description="Move `champion` back to the previous champion, recording who/when/why in MLflow.")
def rollback_champion(context: dg.OpExecutionContext, config: RollbackConfig, mlflow: MLflowRegistryResource) -> None:
    registry = mlflow.registry()
    who = config.who or f"dagster run {context.run_id}"
    from_version, to_version = registry.rollback(who=who, why=config.reason)
    context.log.info(f"champion of {registry.model_name}: v{from_version} -> v{to_version} ({config.reason})")


@dg.job(description="One-step rollback: champion back to the previous champion (config: reason).")
def rollback():
    rollback_champion()


daily_scoring = dg.define_asset_job(
    "daily_scoring",
    selection=dg.AssetSelection.assets("raw_transactions", "batch_predictions", "online_features")
    | dg.AssetSelection.groups("features"),
    description="Ingest yesterday's events, refresh features offline and online, score the day in batch.",
)
# Both schedules ship RUNNING: they act only while the Dagster daemon runs (`ml-platform ui`), the
# scoring run replaces one day's predictions atomically (re-running a day is harmless) and the
# drain moves only what is on disk out of Redis.
daily_scoring_schedule = dg.build_schedule_from_partitioned_job(
    daily_scoring, hour_of_day=2, default_status=dg.DefaultScheduleStatus.RUNNING
)
drain_prediction_log_job = dg.define_asset_job(
    "drain_prediction_log",
    selection=dg.AssetSelection.assets("prediction_log"),
    description="Move the prediction log (a Redis stream) into Parquet under the data directory.",
)
drain_prediction_log_schedule = dg.ScheduleDefinition(
    job=drain_prediction_log_job, cron_schedule="*/15 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)
daily_monitoring = dg.define_asset_job(
    "daily_monitoring",
    selection=MONITORING_SELECTION,
    description="The day's label feed (and the label rewards of experiments that take them), then data drift, "
    "prediction drift, labelled performance and serving health against the champion, and the dashboard with "
    "its HTML report (one day per run).",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[daily_scoring],
    request_job=daily_monitoring,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="When a day's scoring succeeds, monitor that day: the daily chain ingest -> features "
    "offline and online -> batch scoring -> monitoring, as two chained runs.",
)
def monitor_after_scoring(context: dg.RunStatusSensorContext):
    run = context.dagster_run
    day = run.tags.get("dagster/partition") or run.tags.get(RANGE_END_TAG)
    if not day:
        return dg.SkipReason(f"run {run.run_id} scored no single day (tags {sorted(run.tags)}): nothing to monitor")
    return dg.RunRequest(run_key=f"monitor:{day}:{run.run_id}", partition_key=day,
                         tags={"ml_platform/scoring_run": run.run_id})


cost_reporting = dg.define_asset_job(
    "cost_reporting",
    selection=dg.AssetSelection.assets("cost_report"),
    description="Training vs serving cost per model version and per 1,000 predictions (batch, online, stream).",
)
# After the day's scoring (02:00) and its monitoring.
cost_reporting_schedule = dg.ScheduleDefinition(
    job=cost_reporting, cron_schedule="0 5 * * *", default_status=dg.DefaultScheduleStatus.RUNNING
)


def build_definitions(settings: Settings | None = None, event_source: dict | None = None) -> dg.Definitions:
    settings = settings or load_settings()
    overrides = {k: v for k, v in (event_source or {}).items() if v is not None}
    return dg.Definitions(
        assets=ALL_ASSETS,
        asset_checks=[a.online_offline_skew],
        jobs=[training_pipeline, retrain_job, rollback, daily_scoring, drain_prediction_log_job, daily_monitoring,
              cost_reporting, x.shadow_report_job],
        schedules=[daily_scoring_schedule, drain_prediction_log_schedule, cost_reporting_schedule],
        sensors=[monitor_after_scoring, retrain_sensor, *x.EXPERIMENT_SENSORS],
        resources=default_resources(settings, **overrides),
        executor=executor_for(settings),
    )


@dataclass
class PipelineOutcome:
    success: bool
    run_id: str
    failure: str = ""
    metadata: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)  # check name -> passed

    def summary(self) -> str:
        lines = ["", "Asset graph materialized:"]
        for key, meta in self.metadata.items():
            shown = ", ".join(f"{k}={v}" for k, v in meta.items())
            lines.append(f"  {key}: {shown}")
        if self.checks:
            lines.append("Checks: " + ", ".join(f"{k} {'passed' if ok else 'FAILED'}" for k, ok in self.checks.items()))
        if self.failure:
            lines.append(f"Attention: {self.failure}")
        return "\n".join(lines)


_SUMMARY_KEYS = {
    "raw_transactions": ("rows", "labels_known"),
    "training_set": ("rows", "positives", "data_version"),
    "model_evaluation": ("roc_auc", "pr_auc", "f1", "threshold"),
    "registered_model": ("model", "version", "champion_version", "promoted", "reason"),
    "online_features": ("rows_written", "rows_per_s"),
}


def run_training_pipeline(
    settings: Settings,
    start: dt.date,
    end: dt.date,
    event_source: dict | None = None,
    instance: dg.DagsterInstance | None = None,
    log_level: str = "INFO",
) -> PipelineOutcome:
    """Run `training_pipeline` for the daily partitions start..end (one run, launched from this
    process; its steps run here too unless ML_PLATFORM_EXECUTOR sends them elsewhere), recorded in
    the Dagster instance at DAGSTER_HOME so it shows in the UI afterwards."""
    return _execute(settings, "training_pipeline", event_source, instance, log_level=log_level,
                    tags={RANGE_START_TAG: start.isoformat(), RANGE_END_TAG: end.isoformat()})


def run_daily_job(
    settings: Settings,
    job_name: str,
    day: dt.date,
    event_source: dict | None = None,
    instance: dg.DagsterInstance | None = None,
    log_level: str = "WARNING",
    checks_fail: bool = True,
    until: dt.date | None = None,
) -> PipelineOutcome:
    """Run a daily-partitioned job (`daily_scoring`, `daily_monitoring`) from this process for one
    day (or, with `until`, the days day..until as one run: `daily_scoring`'s assets take a range),
    recorded in the Dagster instance at DAGSTER_HOME so it shows in the UI."""
    if until is not None and until != day:
        selected = {"tags": {RANGE_START_TAG: day.isoformat(), RANGE_END_TAG: until.isoformat()}}
    else:
        selected = {"partition_key": day.isoformat()}
    return _execute(settings, job_name, event_source, instance, log_level=log_level, all_metadata=True,
                    checks_fail=checks_fail, **selected)


def run_monitoring(settings: Settings, day: dt.date, event_source: dict | None = None,
                   instance: dg.DagsterInstance | None = None) -> PipelineOutcome:
    """`daily_monitoring` for one day (see run_daily_job)."""
    return run_daily_job(settings, "daily_monitoring", day, event_source, instance, checks_fail=False)


def _execute(settings: Settings, job_name: str, event_source: dict | None, instance: dg.DagsterInstance | None, *,
             log_level: str, tags: dict | None = None, partition_key: str | None = None,
             all_metadata: bool = False, checks_fail: bool = True) -> PipelineOutcome:
    """Run `job_name` and say what it did. With ML_PLATFORM_EXECUTOR=celery, k8s or multiprocess
    the steps run in other processes, which load the definitions of `ml_platform.definitions` from
    their own environment: the job is launched as a reconstructable job and the event source
    overrides travel in the run config."""
    run_config: dict = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    instance = instance or dg.DagsterInstance.get()
    if not runs_out_of_process(settings):
        job = build_definitions(settings, event_source).resolve_job_def(job_name)
        result = job.execute_in_process(instance=instance, run_config=run_config, tags=tags,
                                        partition_key=partition_key, raise_on_error=False)
        return _outcome(result, all_metadata=all_metadata, checks_fail=checks_fail)
    from dagster._core.definitions.reconstruct import ReconstructableRepository

    env_settings = load_settings()
    if env_settings.data_dir != settings.data_dir or env_settings.executor != settings.executor:
        raise ValueError(
            f"ML_PLATFORM_EXECUTOR={settings.executor}: the steps load the definitions from the environment, "
            f"so run with the settings of the environment (data dir {env_settings.data_dir}, not {settings.data_dir})"
        )
    overrides = {k: v for k, v in (event_source or {}).items() if v is not None}
    if overrides:
        run_config["resources"] = {"event_source": {"config": overrides}}
    all_tags = {**(tags or {}), **({"dagster/partition": partition_key} if partition_key else {})}
    recon = ReconstructableRepository.for_module(
        "ml_platform.definitions", "defs", working_directory=str(Path(__file__).resolve().parents[2])
    ).get_reconstructable_job(job_name)
    with dg.execute_job(recon, instance=instance, run_config=run_config, tags=all_tags, raise_on_error=False) as result:
        return _outcome(result, all_metadata=all_metadata, checks_fail=checks_fail)


def _outcome(result, all_metadata: bool = False, checks_fail: bool = True) -> PipelineOutcome:
    """What a run did: success, the first user error (not Dagster's wrapper), the summary
    metadata of each materialization (every key if `all_metadata`), the checks' results (a failed
    check is the run's `failure` if `checks_fail`: not for monitoring, whose checks report drift)."""
    failure = ""
    metadata: dict = {}
    checks: dict = {}
    for event in result.all_events:
        if event.is_step_failure:
            err = event.step_failure_data.error
            while err is not None and err.cause is not None:  # the user's error, not Dagster's wrapper
                err = err.cause
            failure = f"step {event.step_key}: {err.message.strip() if err else event.message}"
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            checks[evaluation.check_name] = evaluation.passed
            if not evaluation.passed and checks_fail:
                failure = f"check {evaluation.check_name} failed: {evaluation.description}"
        elif event.is_step_materialization:
            mat = event.step_materialization_data.materialization
            key = mat.asset_key.to_user_string()
            wanted = _SUMMARY_KEYS.get(key, ())
            shown = {k: _plain(v) for k, v in mat.metadata.items() if all_metadata or k in wanted}
            if shown:
                metadata[key] = shown
    return PipelineOutcome(success=result.success, run_id=result.run_id, failure=failure, metadata=metadata, checks=checks)


def _plain(value):
    return getattr(value, "value", value)
