"""The scoring service behind /predict: online features + the champion (or an experiment's
arms, with its shadow off the request path), micro-batched.

Concurrent requests are scored together (adaptive micro-batching: whatever arrived while the
previous batch was being scored forms the next one, so an idle server answers a lone request at
once and a busy one amortises the Redis round trip and the scoring call). One request whose rows
fail to score does not fail its batch mates: the batch is then scored job by job.
Plain asyncio, no HTTP: `await service.predict(rows)` in a test is what a request does.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import redis

from ml_platform.experiments.router import Assignment, ExperimentRouter
from ml_platform.experiments.store import ExperimentStore
from ml_platform.featurestore.online import NOT_FOUND, OUTSIDE_MAX_AGE, OnlineStoreError, RedisOnlineStore
from ml_platform.serving.api.metrics import ServingMetrics
from ml_platform.serving.model_holder import ModelHolder
from ml_platform.serving.prediction_log import LIVE, PredictionLogWriter, prediction_entry
from ml_platform.serving.shadow import ShadowScorer
from ml_platform.values import nan_to_none

_log = logging.getLogger(__name__)


class ServiceUnavailable(Exception):
    """A dependency is missing (Redis, the model, the online store): the API answers 503."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class _Job:
    rows: list[dict]
    future: asyncio.Future
    started: float
    include_features: bool


@dataclass
class _Served:
    """A batch's scores in row order: probability, the model that scored it, its inputs, unseen values."""

    probabilities: list[float]
    models: list
    features: list[dict]
    unseen: list[list[str]]


def _take(looked_up: Mapping[str, Sequence], idx: np.ndarray) -> dict[str, list]:
    """The looked-up features of rows `idx` (a subset of the batch, in that order)."""
    positions = idx.tolist()
    return {name: [values[i] for i in positions] for name, values in looked_up.items()}


@dataclass
class PredictionService:
    """Scores request rows with the champion: online features + model, micro-batched.
    `run()` is the batcher (one task per service); `predict()` queues rows and awaits them."""

    holder: ModelHolder
    online: RedisOnlineStore
    metrics: ServingMetrics
    model_name: str
    log: PredictionLogWriter | None = None
    max_batch_rows: int = 256
    router: ExperimentRouter | None = None  # routes rows between an experiment's arms
    experiments: ExperimentStore | None = None  # decisions and sticky assignments (with a router)
    shadow: ShadowScorer | None = None  # scores the experiment's shadow version off the request path
    _queue: deque = field(default_factory=deque)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _view_keys: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, view in self.online.views.items():
            self._view_keys[name] = tuple(view.join_keys)

    async def predict(self, rows: list[dict], include_features: bool = False) -> list[dict]:
        """Predictions for `rows` (Transaction dicts), in order. Raises ServiceUnavailable."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Job(rows, future, time.perf_counter(), include_features))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """The batcher: takes everything queued (up to max_batch_rows) and scores it together."""
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            jobs: list[_Job] = []
            n = 0
            while self._queue and (not jobs or n + len(self._queue[0].rows) <= self.max_batch_rows):
                job = self._queue.popleft()
                if job.future.done():  # the client went away
                    continue
                jobs.append(job)
                n += len(job.rows)
            if not jobs:
                continue
            try:
                await self._score(jobs)
            except ServiceUnavailable as exc:
                self.metrics.child(self.metrics.prediction_errors, exc.reason).inc(n)
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - one bad request must not fail its batch mates
                if len(jobs) > 1:
                    for job in jobs:
                        if job.future.done():
                            continue
                        try:
                            await self._score([job])
                        except Exception as single:  # noqa: BLE001
                            self._fail(job, single)
                else:
                    self._fail(jobs[0], exc)

    def _fail(self, job: _Job, exc: Exception) -> None:
        reason = exc.reason if isinstance(exc, ServiceUnavailable) else "internal_error"
        self.metrics.child(self.metrics.prediction_errors, reason).inc(len(job.rows))
        if reason == "internal_error":
            _log.exception("scoring failed", exc_info=exc)
        if not job.future.done():
            job.future.set_exception(exc)

    async def _score(self, jobs: list[_Job]) -> None:
        champion = self.holder.current  # one snapshot per batch, whatever swaps meanwhile
        active = self.router.active if self.router is not None else None
        if champion is None and active is None:
            raise ServiceUnavailable(
                "model_not_loaded",
                f"no model is serving: the registry has no {self.holder.alias!r} version loaded yet "
                f"({self.holder.last_error or 'promote a model version to champion'})",
            )
        batch_started = time.perf_counter()
        rows = [r for job in jobs for r in job.rows]
        n = len(rows)
        assignment = self.router.assign(n, active) if active is not None else None
        if assignment is not None:
            if active.config.sticky:
                assignment = await self._stick(assignment, rows)
            groups = [
                (active.models[a], idx)
                for a in range(len(active.models))
                if len(idx := np.flatnonzero(assignment.arms == a))
            ]
        else:
            groups = [(champion, None)]
        shadow = active.shadow if active is not None and self.shadow is not None else None
        models = [m for m, _ in groups] + ([shadow] if shadow is not None else [])
        refs = list(dict.fromkeys(ref for m in models for ref in m.contract.feature_refs))
        entity_rows = [{"user_id": r["user_id"], "merchant_id": r["merchant_id"]} for r in rows]
        try:
            looked_up = await self.online.read_async(refs, entity_rows, include_status=True)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            raise ServiceUnavailable(
                "redis_unavailable",
                f"the online feature store (Redis) is unreachable: {exc}. Retry shortly; the service "
                "reconnects by itself when Redis is back",
            ) from exc
        except OnlineStoreError as exc:
            raise ServiceUnavailable(
                "online_store_not_ready", f"online feature store not ready: {exc}"
            ) from exc
        except redis.RedisError as exc:
            raise ServiceUnavailable("redis_error", f"Redis refused the feature read: {exc}") from exc
        read_done = time.perf_counter()
        served, failed = self._score_groups(groups, rows, looked_up, champion)
        flags = self._flags(looked_up, n, served.unseen)
        now = time.perf_counter()
        predicted_at = datetime.now(UTC)
        experiment = active.name if assignment is not None else None
        arm_names = assignment.arm_names() if assignment is not None else None
        arm_probabilities = assignment.probabilities.tolist() if assignment is not None else None
        entries = []
        metrics = self.metrics
        results: list[dict] = []
        offset = 0
        for job in jobs:
            latency_ms = (now - job.started) * 1000.0
            out = []
            for i in range(offset, offset + len(job.rows)):
                p = served.probabilities[i]
                model = served.models[i]
                threshold = model.contract.decision_threshold
                decision = "fraud" if p >= threshold else "legit"
                pid = str(uuid.uuid4())
                row_flags = flags[i]
                features = served.features[i]
                result = {
                    "prediction_id": pid,
                    "transaction_id": rows[i]["transaction_id"],
                    "probability": p,
                    "decision": decision,
                    "threshold": threshold,
                    "model_name": self.model_name,
                    "model_version": model.version,
                    "scorer": model.scoring.name,
                    "latency_ms": round(latency_ms, 3),
                    "flags": row_flags,
                    "experiment": experiment,
                    "arm": arm_names[i] if arm_names is not None else None,
                    "selection_probability": arm_probabilities[i] if arm_probabilities is not None else None,
                }
                if job.include_features:
                    result["features"] = features
                out.append(result)
                metrics.score.observe(p)
                metrics.child(metrics.predictions, str(model.version), decision).inc()
                if row_flags["unknown_entity"]:
                    metrics.unknown_entities.inc()
                for column in row_flags["unseen_values"]:
                    metrics.child(metrics.unseen_values, column).inc()
                if self.log is not None:
                    entries.append(
                        prediction_entry(
                            prediction_id=pid,
                            transaction=rows[i],
                            model_name=self.model_name,
                            model_version=model.version,
                            probability=p,
                            decision=decision,
                            threshold=threshold,
                            scorer=model.scoring.name,
                            latency_ms=latency_ms,
                            flags=row_flags,
                            features=features,
                            predicted_at=predicted_at,
                            role=LIVE if experiment is not None else None,
                            experiment=experiment,
                            arm=result["arm"],
                            selection_probability=result["selection_probability"],
                        )
                    )
            results.append(out)
            offset += len(job.rows)
        if assignment is not None:
            await self._record(active, results, arm_names, arm_probabilities)
        for job, out in zip(jobs, results):
            if not job.future.done():
                job.future.set_result(out)
        metrics.batch_rows.observe(n)
        stages = metrics.stage_seconds
        metrics.child(stages, "queue").observe(batch_started - jobs[0].started)
        metrics.child(stages, "features").observe(read_done - batch_started)
        metrics.child(stages, "score").observe(now - read_done)
        if self.log is not None:
            if failed:
                entries.extend(self._failed_entries(failed, rows, flags, predicted_at, experiment, arm_names,
                                                    arm_probabilities))  # fmt: skip
            self.log.append(entries)
        if shadow is not None:
            mask = self.router.shadow_sample(n, active)
            if mask.any():
                live = [r for out in results for r in out]
                idx = np.flatnonzero(mask)
                sub_rows = rows if mask.all() else [rows[i] for i in idx]
                sub_live = live if mask.all() else [live[i] for i in idx]
                sub_looked = looked_up if mask.all() else _take(looked_up, idx)
                self.shadow.submit(shadow, sub_rows, sub_looked, sub_live, (read_done - batch_started) * 1000.0,
                                   active.name)  # fmt: skip

    def _score_groups(self, groups, rows, looked_up, champion) -> tuple[_Served, list]:
        """Each group's rows scored by its model, scattered back into row order. An experiment
        arm that raises has its rows scored by the champion instead (the caller still gets an
        answer; the failure is logged against the arm's version and counted)."""
        n = len(rows)
        if len(groups) == 1 and groups[0][1] is None:
            model = groups[0][0]
            scored = model.scoring.score(rows, looked_up)
            inputs = scored.inputs
            features = [{c: nan_to_none(v[i]) for c, v in inputs.items()} for i in range(n)]
            return _Served(scored.probabilities.tolist(), [model] * n, features,
                           model.scoring.unseen_values(inputs)), []  # fmt: skip
        probabilities: list = [None] * n
        models: list = [None] * n
        features: list = [None] * n
        unseen: list = [None] * n
        failed = []
        for model, idx in groups:
            sub_rows = [rows[i] for i in idx]
            sub_looked = _take(looked_up, idx)
            try:
                scored = model.scoring.score(sub_rows, sub_looked)
            except Exception as exc:
                if champion is None or model is champion:
                    raise
                _log.exception("experiment arm v%s failed to score %d rows; the champion answers", model.version,
                               len(idx))  # fmt: skip
                self.metrics.child(self.metrics.prediction_errors, "experiment_arm_failed").inc(len(idx))
                failed.append((model, idx, f"{type(exc).__name__}: {exc}"[:500]))
                model = champion
                scored = model.scoring.score(sub_rows, sub_looked)
            sub_unseen = model.scoring.unseen_values(scored.inputs)
            for j, i in enumerate(idx.tolist()):
                probabilities[i] = float(scored.probabilities[j])
                models[i] = model
                features[i] = {c: nan_to_none(v[j]) for c, v in scored.inputs.items()}
                unseen[i] = sub_unseen[j]
        return _Served(probabilities, models, features, unseen), failed

    def _failed_entries(self, failed, rows, flags, predicted_at, experiment, arm_names, arm_probabilities):
        """The log's record of an arm's failure: its rows under its version, unscored, the error in flags."""
        out = []
        for model, idx, error in failed:
            for i in idx.tolist():
                out.append(
                    prediction_entry(
                        prediction_id=f"{uuid.uuid4()}", transaction=rows[i], model_name=self.model_name,
                        model_version=model.version, probability=float("nan"), decision=None,
                        threshold=model.contract.decision_threshold, scorer=model.scoring.name, latency_ms=0.0,
                        flags={**flags[i], "error": error, "answered_by": "champion"}, features={},
                        predicted_at=predicted_at, role=LIVE, experiment=experiment, arm=arm_names[i],
                        selection_probability=arm_probabilities[i],
                    )
                )  # fmt: skip
        return out

    async def _stick(self, assignment: Assignment, rows: list[dict]) -> Assignment:
        """Sticky experiments: a card holder keeps the arm of their first decision (and its
        probability). Redis unreachable: this batch uses the fresh draw (logged)."""
        active = assignment.experiment
        names = active.arm_names
        proposals = [f"{names[a]}|{p:.6f}" for a, p in zip(assignment.arms.tolist(), assignment.probabilities.tolist())]
        try:
            stuck = await self.experiments.stick(active.name, [r["user_id"] for r in rows], proposals)
        except (redis.RedisError, OSError) as exc:
            _log.warning("sticky assignment unavailable (%s); using this batch's draws", exc)
            return assignment
        index = {name: i for i, name in enumerate(names)}
        arms = assignment.arms.copy()
        probabilities = assignment.probabilities.copy()
        for i, value in enumerate(stuck):
            name, _, p = value.partition("|")
            if name in index:  # an arm the experiment no longer has: the fresh draw
                arms[i], probabilities[i] = index[name], float(p)
        return Assignment(active, arms, probabilities)

    async def _record(self, active, results, arm_names, arm_probabilities) -> None:
        """Remember each decision's arm for its late reward (before the caller can send one)."""
        pids = [r["prediction_id"] for out in results for r in out]
        try:
            await self.experiments.record_decisions(active.name, pids, arm_names, arm_probabilities,
                                                    active.config.feedback_ttl_s)  # fmt: skip
        except (redis.RedisError, OSError) as exc:
            self.metrics.child(self.metrics.prediction_errors, "decision_not_recorded").inc(len(pids))
            _log.warning("experiment %s: %d decisions not recorded (%s)", active.name, len(pids), exc)

    def _flags(self, looked_up: Mapping[str, Sequence], n: int, unseen: Sequence[list[str]]) -> list[dict]:
        statuses = {k[: -len("__status")]: v for k, v in looked_up.items() if k.endswith("__status")}
        user_views = [v for v in statuses if self._view_keys.get(v) == ("user_id",)]
        merchant_views = [v for v in statuses if self._view_keys.get(v) == ("merchant_id",)]
        out = []
        for i in range(n):
            missing = [v for v, s in statuses.items() if s[i] == NOT_FOUND]
            expired = [v for v, s in statuses.items() if s[i] == OUTSIDE_MAX_AGE]
            unknown_user = bool(user_views) and all(statuses[v][i] == NOT_FOUND for v in user_views)
            unknown_merchant = bool(merchant_views) and all(
                statuses[v][i] == NOT_FOUND for v in merchant_views
            )
            out.append(
                {
                    "unknown_entity": unknown_user or unknown_merchant,
                    "unknown_user": unknown_user,
                    "unknown_merchant": unknown_merchant,
                    "missing_views": missing,
                    "expired_views": expired,
                    "unseen_values": unseen[i],
                }
            )
        return out
