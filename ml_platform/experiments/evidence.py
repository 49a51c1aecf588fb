"""A rollout stage's evidence (`rollout.Evidence`) from what the platform recorded: the prediction
log (drained files and the API entries still in the stream), the experiment's rewards in Redis and
the monitoring results.

Per stage (rows predicted since the stage began, within the rollout's experiment):
- shadow stage: the candidate's shadow rows: samples (scored), errors (rows it failed to score),
  its p99 latency against the live rows', decision agreement with the live model on the same rows;
- live stages: the candidate arm's live rows: samples, errors (rows it failed on, answered by the
  champion instead), p99 latency against the champion arm's; the mean reward of each arm.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.experiments.rollout import Evidence
from ml_platform.experiments.shadow_report import compare_shadow
from ml_platform.experiments.store import ArmStats
from ml_platform.serving.prediction_log import LIVE, ROLE_COLUMN, SHADOW

REWARD = "reward"


def experiment_log(log_dir: str | Path, client: Any, stream: str, experiment: str, since: datetime) -> pd.DataFrame:
    """The API's predictions of `experiment` since `since` (live and shadow roles, no model
    inputs): the drained files, then what is still in the log stream (each prediction once)."""
    from ml_platform.serving.prediction_log_drain import undrained_api_log
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    drained = read_prediction_log(log_dir, start=since.date(), sources=["api"], with_features=False, roles=None)
    recent = undrained_api_log(client, stream, since_ms=int(since.timestamp() * 1000))
    recent = recent.select([n for n in recent.column_names if not n.startswith("feature.")]).to_pandas()
    frames = [f for f in (drained, recent) if len(f)]
    if not frames:
        return drained.iloc[0:0]
    log = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    log = log.drop_duplicates("prediction_id", keep="first")
    predicted = pd.to_datetime(log["predicted_at"], utc=True)
    return log[(log["experiment"] == experiment) & (predicted >= pd.Timestamp(since))].reset_index(drop=True)


def _p99(values: pd.Series) -> float | None:
    values = values.dropna()
    return float(np.percentile(values.to_numpy(dtype=float), 99)) if len(values) else None


def stage_evidence(
    log: pd.DataFrame,
    *,
    candidate_version: int,
    champion_version: int,
    shadow_stage: bool,
    stats: dict[str, ArmStats] | None = None,
    monitoring_alerts: tuple[str, ...] = (),
) -> Evidence:
    """The stage's Evidence from `experiment_log`'s rows of the stage (and the arms' rewards)."""
    role = log[ROLE_COLUMN].fillna(LIVE) if ROLE_COLUMN in log else pd.Series(LIVE, index=log.index)
    version = log["model_version"]
    if shadow_stage:
        candidate = log[(role == SHADOW) & (version == candidate_version)]
        champion = log[(role == LIVE) & (version == champion_version)]
        agreement = compare_shadow(log, shadow_version=candidate_version).agreement_rate if len(candidate) else None
    else:
        candidate = log[(role == LIVE) & (version == candidate_version)]
        champion = log[(role == LIVE) & (version == champion_version)]
        agreement = None
    scored = candidate["probability"].notna()
    candidate_metrics: dict[str, float] = {}
    champion_metrics: dict[str, float] = {}
    candidate_n = champion_n = 0
    for arm in (stats or {}).values():
        if arm.samples and arm.version == candidate_version:
            candidate_metrics[REWARD], candidate_n = arm.reward_sum / arm.samples, arm.samples
        elif arm.samples and arm.version == champion_version:
            champion_metrics[REWARD], champion_n = arm.reward_sum / arm.samples, arm.samples
    return Evidence(
        samples=int(scored.sum()),
        errors=int((~scored).sum()),
        p99_latency_ms=_p99(candidate.loc[scored, "latency_ms"]),
        champion_p99_latency_ms=_p99(champion["latency_ms"]),
        agreement=agreement,
        candidate_metrics=candidate_metrics,
        champion_metrics=champion_metrics,
        candidate_metric_samples=candidate_n,
        champion_metric_samples=champion_n,
        monitoring_alerts=tuple(monitoring_alerts),
    )


def candidate_alerts(monitoring_dir: str | Path, candidate_version: int, day: str) -> tuple[str, ...]:
    """Monitors whose latest result (up to `day`) alarms about the candidate's version."""
    from ml_platform.monitoring.results import load_history
    from ml_platform.monitoring.status import is_alarm

    alerts = []
    for monitor in ("prediction_drift", "model_performance", "serving_health"):
        history = load_history(monitoring_dir, monitor, until=day)
        latest = history[-1] if history else None
        if latest is not None and latest.model_version == candidate_version and is_alarm(latest.status):
            alerts.append(monitor)
    return tuple(alerts)


def gather_evidence(store: Any, settings: Any, name: str, state: Any, now: float | None = None) -> Evidence:
    """The running rollout stage's Evidence from the platform `settings` point at (their directories)
    and the store's project (whose API log stream it reads): the API's prediction log of the
    experiment since the stage began, the arms' rewards, the monitors."""
    import time
    from datetime import UTC

    from ml_platform.serving.prediction_log import prediction_stream_key

    since = datetime.fromtimestamp(state.stage_started_at, UTC)
    log = experiment_log(settings.predictions_log_dir, store.client, prediction_stream_key(store.project), name, since)
    today = datetime.fromtimestamp(time.time() if now is None else now, UTC).date().isoformat()
    return stage_evidence(
        log,
        candidate_version=state.candidate_version,
        champion_version=state.champion_version,
        shadow_stage=state.stage.traffic <= 0.0,
        stats=store.stats(name),
        monitoring_alerts=candidate_alerts(settings.monitoring_dir, state.candidate_version, today),
    )
