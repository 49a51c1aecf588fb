"""`retrain_sensor`: a drift episode from monitoring -> one `retrain` run (the decision is
`ml_platform.monitoring.retrain_policy`; this module only reads, looks up runs and yields).

Each tick reads the saved monitoring results of the days after the cursor's last day, looks up the
outcome of the retrain runs the cursor requested (runs of the `retrain` job with that
`dagster/run_key`; a success's `registered_model` materialization says whether it was promoted),
counts the labelled post-drift rows, and yields a RunRequest or a SkipReason. The policy's state is
the cursor (JSON), so a daemon restart re-evaluates from the last decision, and the run_key of a
request is a function of the episode (Dagster launches nothing twice for one key).

Ships RUNNING, like the schedules: it acts only while a Dagster daemon runs, at most one retrain per
drift episode (plus one retry of a failed run, two of a model that could not beat the champion),
and a retrain can only change the champion by beating it on the same held-out data. Switch it off
in the UI's Automation page.
"""

# No `from __future__ import annotations` here: Dagster reads the context annotations.

import datetime as dt
import json

import dagster as dg

from ml_platform.defs.resources import FeatureStoreResource, MonitoringResource
from ml_platform.monitoring import retrain_policy as rp

RETRAIN_JOB = "retrain"
RUN_KEY_TAG = "dagster/run_key"  # what Dagster tags a sensor's run with
EVALUATION_SECONDS = 600  # monitoring is daily: a tick every 10 minutes is prompt enough and cheap

_FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)


def run_outcomes(instance: dg.DagsterInstance, state: dict) -> dict[str, tuple[str | None, str | None]]:
    """{run_key: (outcome or None while it runs, run id)} of the open episode's attempts that have a run."""
    episode = state.get("episode") or {}
    found: dict[str, tuple[str | None, str | None]] = {}
    for attempt in episode.get("attempts", []):
        if attempt["outcome"] is not None:
            continue
        runs = instance.get_runs(dg.RunsFilter(job_name=RETRAIN_JOB, tags={RUN_KEY_TAG: attempt["run_key"]}), limit=1)
        if not runs:
            continue
        run = runs[0]
        if run.status == dg.DagsterRunStatus.SUCCESS:
            found[attempt["run_key"]] = (_promotion(instance, run.run_id), run.run_id)
        elif run.status in _FAILED:
            found[attempt["run_key"]] = (rp.FAILED, run.run_id)
        else:
            found[attempt["run_key"]] = (None, run.run_id)
    return found


def _promotion(instance: dg.DagsterInstance, run_id: str) -> str:
    """promoted / not_promoted from the run's `registered_model` materialization (succeeded if none)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        mat = entry.asset_materialization
        if mat is not None and mat.asset_key == dg.AssetKey("registered_model"):
            promoted = mat.metadata.get("promoted")
            promoted = getattr(promoted, "value", promoted)
            if promoted is not None:
                return rp.PROMOTED if promoted else rp.NOT_PROMOTED
    return rp.SUCCEEDED


def evaluate_retrain(instance: dg.DagsterInstance, cursor: str | None, feature_store: FeatureStoreResource,
                     policy: rp.RetrainPolicy | None = None, now: dt.datetime | None = None) -> rp.Evaluation:
    """One evaluation of the sensor, outside Dagster's decorator (the sensor and the tests call it)."""
    from ml_platform.monitoring.results import load_result, results_dir

    policy = policy or rp.RetrainPolicy()
    paths = feature_store.paths
    try:
        state = rp.parse_state(json.loads(cursor) if cursor else None)
    except (ValueError, TypeError) as exc:
        raise dg.Failure(f"retrain_sensor: the cursor is not a retrain state ({exc}); reset the cursor in the UI") from exc
    available = {p.stem for m in policy.signals for p in results_dir(paths.monitoring_dir, m).glob("*.json")}
    days = rp.days_to_load(state, available, policy)
    results = {d: {m: load_result(paths.monitoring_dir, m, d) for m in policy.signals} for d in days}
    return rp.evaluate(
        state,
        results,
        outcomes=run_outcomes(instance, state),
        count_labels=lambda start, day: rp.count_post_drift_labels(paths.raw_dir, start, day,
                                                                   policy.label_settling_days),
        policy=policy,
        now=now or dt.datetime.now(dt.UTC),
    )


@dg.sensor(
    job_name=RETRAIN_JOB,
    minimum_interval_seconds=EVALUATION_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests one `retrain` run per drift episode (data drift or prediction drift at alert, or "
    "labelled performance below its floor) once enough labelled post-drift rows exist; the reason is in "
    "the run's tags. Cursor: the policy's state (ml_platform.monitoring.retrain_policy).",
)
def retrain_sensor(context: dg.SensorEvaluationContext, feature_store: FeatureStoreResource,
                   monitoring: MonitoringResource):
    # The policy: [retrain] of the monitoring config (ML_PLATFORM_MONITORING_CONFIG), else the defaults.
    evaluation = evaluate_retrain(context.instance, context.cursor, feature_store, monitoring.config().retrain)
    for line in evaluation.log:
        context.log.info(line)
    context.update_cursor(json.dumps(evaluation.state, sort_keys=True))
    if not evaluation.requests:
        return dg.SkipReason(evaluation.message)
    return [dg.RunRequest(run_key=r.run_key, tags=r.tags) for r in evaluation.requests]
