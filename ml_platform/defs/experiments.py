"""Experiments in Dagster (over `ml_platform.experiments`):

- `rollout_sensor` advances the running staged rollout: each tick gathers the stage's evidence
  (the prediction log, the arms' rewards, the monitors) and lets the controller hold, advance,
  roll back or complete; every transition is reported as a materialization of `rollout_status`
  (its history in the UI: who/what/when/why and the evidence), a hold as the tick's skip reason.
- `shadow_comparison` compares the live and shadow predictions of the latest experiment that has
  a shadow (agreement, flips, correlation, latencies, errors, and both models' metrics on the same
  labelled rows); `shadow_report_sensor` refreshes it while such an experiment runs.
- `experiment_rewards` (daily, after `label_feed`) turns the day's first labels into rewards for
  the decisions of experiments whose `reward_source` is "labels" (each label day applied once).
"""

# No `from __future__ import annotations` here: Dagster reads the context annotations.

import datetime as dt
import json
import time

import dagster as dg

from ml_platform.defs.assets import daily_partitions
from ml_platform.defs.resources import FeatureStoreResource, MLflowRegistryResource

ROLLOUT_STATUS = dg.AssetKey("rollout_status")
ROLLOUT_SECONDS = 30  # a stage lasts minutes; a tick every 30 s judges a breach promptly
SHADOW_REPORT_SECONDS = 600

rollout_status = dg.AssetSpec(
    ROLLOUT_STATUS,
    group_name="experiments",
    description="The staged rollout's state: each materialization is one transition (shadow -> 5 % -> 50 % "
    "-> 100 %, a rollback or an abort) reported by rollout_sensor, with who/why and the stage's evidence.",
)


def _store(feature_store: FeatureStoreResource):
    from ml_platform.experiments.store import ExperimentStore

    return ExperimentStore(feature_store.redis_client(), feature_store.project)


def _transition_table(history) -> str:
    lines = ["| when (UTC) | from | to | who | why |", "|---|---|---|---|---|"]
    for t in history:
        when = dt.datetime.fromtimestamp(t.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(f"| {when} | {t.from_stage or '-'} | {t.to_stage} | {t.who} | {t.why.replace('|', '/')} |")
    return "\n".join(lines)


@dg.sensor(
    minimum_interval_seconds=ROLLOUT_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Advances the running staged rollout (hold / next stage / roll back / complete) from the "
    "prediction log, the arms' rewards and the monitors; each transition materializes rollout_status.",
)
def rollout_sensor(context: dg.SensorEvaluationContext, feature_store: FeatureStoreResource,
                   mlflow: MLflowRegistryResource):  # fmt: skip
    from ml_platform.experiments.evidence import gather_evidence
    from ml_platform.experiments.manage import RolloutControl
    from ml_platform.experiments.rollout import evaluate

    store = _store(feature_store)
    control = RolloutControl(store, mlflow.registry())
    loaded = control.load()
    if loaded is None or loaded[1].done:
        return dg.SkipReason("no rollout is running")
    name, state, revision = loaded
    now = time.time()
    evidence = gather_evidence(store, feature_store.paths, name, state, now=now)
    transition = control.advance(evidence, who="rollout_sensor", revision=revision, now=now)
    if transition is None:
        return dg.SkipReason(f"{name}: {evaluate(state, evidence, now).reason}")
    _, state, _ = control.load(name)
    context.log.info(f"{name}: {transition.from_stage} -> {transition.to_stage}: {transition.why}")
    return dg.SensorResult(asset_events=[rollout_materialization(name, state, transition)])


def rollout_materialization(name, state, transition) -> dg.AssetMaterialization:
    """One transition as a materialization of rollout_status (what the UI lists)."""
    return dg.AssetMaterialization(
        asset_key=ROLLOUT_STATUS,
        description=f"{transition.from_stage or 'start'} -> {transition.to_stage}: {transition.why}",
        metadata={
            "experiment": name,
            "candidate_version": state.candidate_version,
            "champion_version": state.champion_version,
            "status": state.status,
            "stage": state.stage.name,
            "candidate_traffic": state.candidate_traffic(),
            "who": transition.who,
            "why": transition.why,
            "evidence": dg.MetadataValue.json(transition.evidence or {}),
            "transitions": dg.MetadataValue.md(_transition_table(state.history)),
        },
    )


@dg.asset(
    group_name="experiments",
    kinds={"pandas"},
    description="Live vs shadow on the same requests for the latest experiment with a shadow version: "
    "agreement, decision flips, score correlation, both latencies and error counts, and both models' "
    "metrics on the rows whose labels have arrived. Also written to reports/shadow_<experiment>.json.",
)
def shadow_comparison(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource) -> dg.MaterializeResult:
    from ml_platform.experiments.evidence import experiment_log
    from ml_platform.experiments.shadow_report import compare_shadow
    from ml_platform.serving.prediction_log import prediction_stream_key
    from ml_platform.sources.labels import read_labels

    store = _store(feature_store)
    candidates = [n for n in store.names() if store.config(n).shadow_version is not None]
    if not candidates:
        return dg.MaterializeResult(metadata={"experiment": "none: no experiment has a shadow version"})
    name = max(candidates, key=lambda n: float(store.meta(n).get("started_at", 0)))
    config = store.config(name)
    started = dt.datetime.fromtimestamp(float(store.meta(name)["started_at"]), dt.UTC)
    paths = feature_store.paths
    log = experiment_log(paths.predictions_log_dir, store.client, prediction_stream_key(feature_store.project),
                         name, started)  # fmt: skip
    labels = read_labels(paths.raw_dir, since=started.date())
    report = compare_shadow(log, labels, shadow_version=config.shadow_version)
    paths.reports_dir.mkdir(parents=True, exist_ok=True)
    out = paths.reports_dir / f"shadow_{name}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"experiment": name, **report.to_dict()}, indent=2))
    tmp.replace(out)
    context.log.info(report.summary())
    numbers = {k: v for k, v in report.to_dict().items() if isinstance(v, (int, float)) and v is not None}
    metadata = {
        "experiment": name,
        "summary": report.summary(),
        **numbers,
        "report": dg.MetadataValue.path(str(out)),
        "live_metrics": dg.MetadataValue.json(report.live_metrics or {}),
        "shadow_metrics": dg.MetadataValue.json(report.shadow_metrics or {}),
    }
    return dg.MaterializeResult(metadata=metadata)


shadow_report_job = dg.define_asset_job(
    "shadow_report", selection=dg.AssetSelection.assets("shadow_comparison"),
    description="Compare the latest experiment's shadow predictions with the live ones.",
)  # fmt: skip


@dg.sensor(
    job=shadow_report_job,
    minimum_interval_seconds=SHADOW_REPORT_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="While an experiment with a shadow version runs, refresh shadow_comparison every 10 minutes.",
)
def shadow_report_sensor(context: dg.SensorEvaluationContext, feature_store: FeatureStoreResource):
    store = _store(feature_store)
    name = store.active()
    if name is None or store.config(name).shadow_version is None:
        return dg.SkipReason("no running experiment has a shadow version")
    bucket = int(time.time() // SHADOW_REPORT_SECONDS)
    return dg.RunRequest(run_key=f"shadow:{name}:{bucket}")


@dg.asset(
    group_name="experiments",
    partitions_def=daily_partitions,
    deps=["label_feed"],
    kinds={"redis"},
    description="The day's first labels as rewards for the decisions of experiments that take label "
    "rewards (reward_source 'labels'; reward per outcome tp/fp/tn/fn from the experiment's label_rewards); "
    "each label day is applied to the posteriors once.",
)
def experiment_rewards(context: dg.AssetExecutionContext, feature_store: FeatureStoreResource,
                       mlflow: MLflowRegistryResource) -> dg.MaterializeResult:  # fmt: skip
    from ml_platform.experiments.evidence import experiment_log
    from ml_platform.experiments.rewards import label_rewards
    from ml_platform.serving.prediction_log import LIVE, ROLE_COLUMN, prediction_stream_key
    from ml_platform.sources.labels import read_labels

    day = dt.date.fromisoformat(context.partition_key)
    store = _store(feature_store)
    paths = feature_store.paths
    takers = [n for n in store.names() if store.config(n).reward_source == "labels"]
    if not takers:
        return dg.MaterializeResult(metadata={"experiments": "none take label rewards"})
    today = read_labels(paths.raw_dir, since=day, until=day)
    earlier = set(read_labels(paths.raw_dir, until=day - dt.timedelta(days=1))["transaction_id"])
    applied = {}
    for name in takers:
        meta = store.meta(name)
        started = dt.datetime.fromtimestamp(float(meta["started_at"]), dt.UTC)
        if started.date() > day:
            continue
        config = store.config(name)
        log = experiment_log(paths.predictions_log_dir, store.client, prediction_stream_key(feature_store.project),
                             name, started)  # fmt: skip
        log = log[log[ROLE_COLUMN].fillna(LIVE) == LIVE]
        result = label_rewards(log, today, earlier, config)
        count = store.apply_label_day(name, day.isoformat(), result.rewards)
        applied[name] = {"applied": count if count is not None else "already applied",
                         "by_arm": result.summary(), "outcomes": result.outcomes,
                         "unmatched_labels": result.unmatched_labels}  # fmt: skip
        context.log.info(f"{name}: {applied[name]}")
    return dg.MaterializeResult(metadata={"labels": len(today), "experiments": dg.MetadataValue.json(applied)})


EXPERIMENT_ASSETS = [shadow_comparison, experiment_rewards]
EXPERIMENT_SENSORS = [rollout_sensor, shadow_report_sensor]
