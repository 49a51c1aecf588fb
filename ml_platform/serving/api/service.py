"""The scoring service behind /predict: online features + the champion, micro-batched.

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

import redis

from ml_platform.featurestore.online import NOT_FOUND, OUTSIDE_MAX_AGE, OnlineStoreError, RedisOnlineStore
from ml_platform.serving.api.metrics import ServingMetrics
from ml_platform.serving.model_holder import ModelHolder
from ml_platform.serving.prediction_log import PredictionLogWriter, prediction_entry
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
class PredictionService:
    """Scores request rows with the champion: online features + model, micro-batched.
    `run()` is the batcher (one task per service); `predict()` queues rows and awaits them."""

    holder: ModelHolder
    online: RedisOnlineStore
    metrics: ServingMetrics
    model_name: str
    log: PredictionLogWriter | None = None
    max_batch_rows: int = 256
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
        model = self.holder.current  # one model for the whole batch, whatever swaps meanwhile
        if model is None:
            raise ServiceUnavailable(
                "model_not_loaded",
                f"no model is serving: the registry has no {self.holder.alias!r} version loaded yet "
                f"({self.holder.last_error or 'promote a model version to champion'})",
            )
        batch_started = time.perf_counter()
        rows = [r for job in jobs for r in job.rows]
        contract = model.contract
        entity_rows = [{"user_id": r["user_id"], "merchant_id": r["merchant_id"]} for r in rows]
        try:
            looked_up = await self.online.read_async(contract.feature_refs, entity_rows, include_status=True)
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
        scoring = model.scoring
        scored = scoring.score(rows, looked_up)
        probabilities = scored.probabilities.tolist()
        threshold = contract.decision_threshold
        flags = self._flags(looked_up, len(rows), scoring.unseen_values(scored.inputs))
        scorer = scoring.name
        version = model.version
        now = time.perf_counter()
        predicted_at = datetime.now(UTC)
        entries = []
        metrics = self.metrics
        offset = 0
        for job in jobs:
            latency_ms = (now - job.started) * 1000.0
            out = []
            for i in range(offset, offset + len(job.rows)):
                p = probabilities[i]
                decision = "fraud" if p >= threshold else "legit"
                pid = str(uuid.uuid4())
                row_flags = flags[i]
                features = {c: nan_to_none(v[i]) for c, v in scored.inputs.items()}
                result = {
                    "prediction_id": pid,
                    "transaction_id": rows[i]["transaction_id"],
                    "probability": p,
                    "decision": decision,
                    "threshold": threshold,
                    "model_name": self.model_name,
                    "model_version": version,
                    "scorer": scorer,
                    "latency_ms": round(latency_ms, 3),
                    "flags": row_flags,
                }
                if job.include_features:
                    result["features"] = features
                out.append(result)
                metrics.score.observe(p)
                metrics.child(metrics.predictions, str(version), decision).inc()
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
                            model_version=version,
                            probability=p,
                            decision=decision,
                            threshold=threshold,
                            scorer=scorer,
                            latency_ms=latency_ms,
                            flags=row_flags,
                            features=features,
                            predicted_at=predicted_at,
                        )
                    )
            offset += len(job.rows)
            if not job.future.done():
                job.future.set_result(out)
        metrics.batch_rows.observe(len(rows))
        stages = metrics.stage_seconds
        metrics.child(stages, "queue").observe(batch_started - jobs[0].started)
        metrics.child(stages, "features").observe(read_done - batch_started)
        metrics.child(stages, "score").observe(now - read_done)
        if self.log is not None:
            self.log.append(entries)

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
