"""The real-time prediction API (FastAPI + uvicorn): `ml-platform serve` runs `run_server`.

POST /predict           one transaction -> fraud probability, decision, model version, prediction id
POST /predict/batch     up to `max_request_rows` transactions in one call
GET  /health            liveness (the process answers)
GET  /health/ready      readiness: model loaded, Redis reachable, online store materialized (503 if not)
GET  /model             which version serves, how it is scored, loaded versions, recent swaps
GET  /metrics           Prometheus text: requests, errors, latency, score distribution, model version

Per request: the entity's features are read from the online store (one async Redis round trip,
`contract.feature_refs` of the model serving now), request-time features are computed with the
same formulas as training (see fast_scorer: a row path checked against `assemble_features`), the
champion scores, and the prediction is logged to a Redis stream off the request path.
Concurrent requests are scored together (adaptive micro-batching: whatever arrived while the
previous batch was being scored forms the next one, so an idle server answers a lone request at
once and a busy one amortises the Redis round trip and the scoring call).
Models are loaded once; `ModelHolder` follows the `champion` alias and swaps without dropping a
request. Redis down -> 503 with a JSON reason; the process recovers by itself when Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
from fastapi import Body, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ml_platform import features as fr
from ml_platform.featurestore.online import NOT_FOUND, OUTSIDE_MAX_AGE, OnlineStoreError, RedisOnlineStore
from ml_platform.serving.model_holder import ModelHolder, ServingModel, SwapEvent
from ml_platform.serving.prediction_log import (
    DEFAULT_MAXLEN,
    PredictionLogWriter,
    prediction_entry,
    prediction_stream_key,
)
from ml_platform.settings import Settings, load_settings

_log = logging.getLogger(__name__)

INT64_MAX = 2**63 - 1
EXAMPLE_TRANSACTION = {
    "transaction_id": "txn-000123",
    "user_id": 42,
    "merchant_id": 7,
    "merchant_category": "electronics",
    "amount": 249.99,
    "country": "DE",
    "device": "ios",
    "channel": "online",
    "event_timestamp": "2026-01-15T12:34:56Z",
}
PREDICT_EXAMPLES = {"purchase": {"summary": "One online purchase", "value": EXAMPLE_TRANSACTION}}
BATCH_EXAMPLES = {
    "two transactions": {
        "summary": "Two transactions of one card holder",
        "value": {
            "transactions": [
                EXAMPLE_TRANSACTION,
                {**EXAMPLE_TRANSACTION, "transaction_id": "txn-000124", "amount": 12.5, "channel": "pos"},
            ]
        },
    }
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ServingConfig:
    """Knobs of the serving process (defaults fit one uvicorn worker on a small machine)."""

    scorer: str = "auto"  # "auto" (fast path where parity holds), "treelite", "sklearn" (reference)
    alias: str = "champion"
    poll_interval_s: float = 1.0  # how often the registry's aliases are checked
    max_batch_rows: int = 256  # rows scored together at most (micro-batching)
    max_request_rows: int = 1000  # rows one /predict/batch call may send
    redis_socket_timeout_s: float = 0.5  # a hung Redis fails a request after this long ...
    redis_connect_timeout_s: float = 0.25
    redis_retries: int = 1  # ... times (1 + retries); redis-py's default takes ~4 s to fail
    prediction_log: bool = True
    prediction_log_maxlen: int = DEFAULT_MAXLEN
    # The app owns its process (run_server sets this): freeze the start-up heap out of the garbage
    # collector and shorten the GIL switch interval. Off for an app embedded elsewhere (tests).
    tune_process: bool = False

    def __post_init__(self) -> None:
        from ml_platform.serving.fast_scorer import SCORERS

        if self.scorer not in SCORERS:
            raise ValueError(f"ServingConfig.scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.poll_interval_s <= 0 or self.max_batch_rows < 1 or self.max_request_rows < 1:
            raise ValueError(
                "ServingConfig: poll_interval_s must be > 0, max_batch_rows and max_request_rows >= 1 "
                f"(got {self.poll_interval_s}, {self.max_batch_rows}, {self.max_request_rows})"
            )


# --------------------------------------------------------------------------- request / response


class Transaction(BaseModel):
    """One card transaction to score (the raw event's columns; no label)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_TRANSACTION]})

    transaction_id: str = Field(
        min_length=1, max_length=128, description="Caller's unique id of the transaction"
    )
    user_id: int = Field(ge=0, le=INT64_MAX, description="Card holder id (the user entity)")
    merchant_id: int = Field(ge=0, le=INT64_MAX, description="Merchant id (the merchant entity)")
    merchant_category: str = Field(min_length=1, max_length=64, examples=["electronics"])
    amount: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Amount, > 0")
    country: str = Field(pattern=r"^[A-Za-z]{2}$", description="ISO-3166 alpha-2 country of the merchant")
    device: str = Field(min_length=1, max_length=64, examples=["ios"])
    channel: str = Field(min_length=1, max_length=64, examples=["online"])
    event_timestamp: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When the transaction happened (ISO 8601; naive = UTC; default: now)",
    )

    @field_validator("country")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("event_timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transactions: list[Transaction] = Field(min_length=1, description="Transactions to score (at most 1000)")


class PredictionFlags(BaseModel):
    unknown_entity: bool = Field(description="The card holder or the merchant has no features online")
    unknown_user: bool
    unknown_merchant: bool
    missing_views: list[str] = Field(
        description="Feature views with no value for this entity (features null)"
    )
    expired_views: list[str] = Field(description="Feature views whose value is older than their TTL (null)")


class Prediction(BaseModel):
    prediction_id: str
    transaction_id: str
    probability: float = Field(description="P(fraud) from the model")
    decision: Literal["fraud", "legit"] = Field(description="fraud iff probability >= threshold")
    threshold: float = Field(description="The model contract's decision threshold")
    model_name: str
    model_version: int
    scorer: str = Field(description="features path + scorer, e.g. compiled+treelite")
    latency_ms: float = Field(description="Time in the service: queueing, feature read, scoring")
    flags: PredictionFlags
    features: dict[str, Any] | None = Field(None, description="Model inputs (with ?include_features=true)")


class BatchResponse(BaseModel):
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    message: str
    errors: list[dict[str, Any]] | None = None


class ServiceUnavailable(Exception):
    """A dependency is missing (Redis, the model, the online store): the API answers 503."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- metrics


class ServingMetrics:
    """The Prometheus metrics of one app (own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "ml_platform_http_requests",
            "HTTP requests by path and status code",
            ["path", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "ml_platform_http_request_duration_seconds",
            "HTTP request latency in the app, by path",
            ["path"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.predictions = Counter(
            "ml_platform_predictions",
            "Predictions made, by model version and decision",
            ["model_version", "decision"],
            registry=r,
        )
        self.prediction_errors = Counter(
            "ml_platform_prediction_errors", "Predictions that failed, by reason", ["reason"], registry=r
        )
        self.score = Histogram(
            "ml_platform_prediction_score",
            "Distribution of predicted fraud probabilities",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0),
            registry=r,
        )
        self.unknown_entities = Counter(
            "ml_platform_unknown_entities",
            "Predictions for a card holder or merchant unknown online",
            registry=r,
        )
        self.batch_rows = Histogram(
            "ml_platform_scoring_batch_rows",
            "Rows scored together (micro-batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "ml_platform_scoring_stage_seconds",
            "Where a prediction's time goes: queue (waiting for the batcher), features (the online "
            "store read), score (request features + model), per batch",
            ["stage"],
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.model_version = Gauge(
            "ml_platform_model_version", "Model version serving now (0: none)", registry=r
        )
        self.model_info = Gauge(
            "ml_platform_model_info", "1 for the version serving now", ["model_version", "scorer"], registry=r
        )
        self.model_swaps = Counter("ml_platform_model_swaps", "Champion swaps since start", registry=r)
        self._info_labels: tuple[str, str] | None = None
        self._children: dict[tuple, Any] = {}

    def attach_log(self, writer: PredictionLogWriter | None) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        if writer is None:
            return

        class _LogCollector:
            def collect(self):
                yield GaugeMetricFamily(
                    "ml_platform_prediction_log_pending",
                    "Log entries waiting for Redis",
                    value=writer.pending,
                )
                for name, value, text in (
                    ("written", writer.written, "Log entries written to the stream"),
                    ("dropped", writer.dropped, "Log entries dropped (buffer full while Redis was down)"),
                    ("errors", writer.errors, "Failed writes to the log stream"),
                ):
                    yield CounterMetricFamily(f"ml_platform_prediction_log_{name}", text, value=value)

        self.registry.register(_LogCollector())

    def set_model(self, model: ServingModel | None) -> None:
        self.model_version.set(model.version if model else 0)
        labels = (str(model.version), model.scoring.name) if model else None
        if self._info_labels and self._info_labels != labels:
            self.model_info.labels(*self._info_labels).set(0)
        if labels:
            self.model_info.labels(*labels).set(1)
        self._info_labels = labels

    def child(self, metric: Any, *labels: str) -> Any:
        """A labelled child, cached (labels() costs a dict lookup + lock each call)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class _HttpMetricsMiddleware:
    """Counts every HTTP request by path and status, and times it (a plain ASGI middleware:
    Starlette's BaseHTTPMiddleware costs far more per request)."""

    PATHS = frozenset(
        {
            "/predict",
            "/predict/batch",
            "/health",
            "/health/ready",
            "/metrics",
            "/model",
            "/docs",
            "/openapi.json",
        }
    )

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.PATHS else "other"
        started = time.perf_counter()
        status = 500

        async def send_with_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            m = self.metrics
            m.child(m.http_requests, path, str(status)).inc()
            m.child(m.http_latency, path).observe(time.perf_counter() - started)


# --------------------------------------------------------------------------- the scoring service


@dataclass
class _Job:
    rows: list[dict]
    future: asyncio.Future
    started: float
    include_features: bool


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class PredictionService:
    """Scores request rows with the champion: online features + model, micro-batched."""

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
        scored = model.scoring.score(rows, looked_up)
        probabilities = scored.probabilities.tolist()
        threshold = contract.decision_threshold
        flags = self._flags(looked_up, len(rows))
        scorer = model.scoring.name
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
                features = {c: _clean(v[i]) for c, v in scored.inputs.items()}
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

    def _flags(self, looked_up: Mapping[str, Sequence], n: int) -> list[dict]:
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
                }
            )
        return out


# --------------------------------------------------------------------------- the app


@dataclass
class _AppState:
    settings: Settings
    config: ServingConfig
    holder: ModelHolder
    online: RedisOnlineStore
    async_client: Any
    sync_client: Any
    service: PredictionService
    log: PredictionLogWriter | None
    metrics: ServingMetrics
    started_at: float
    tasks: list[asyncio.Task] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def _redis_clients(settings: Settings, config: ServingConfig) -> tuple[Any, Any]:
    """(sync, async) clients with short timeouts and one quick retry: a dead Redis fails a
    request in milliseconds (connection refused) or ~1 s (hung), not redis-py's default ~4 s."""
    from redis.asyncio.retry import Retry as AsyncRetry
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from ml_platform.featurestore.redis_server import async_redis_client, client_from_url, resolve_redis_url

    options = {
        "socket_timeout": config.redis_socket_timeout_s,
        "socket_connect_timeout": config.redis_connect_timeout_s,
        "health_check_interval": 0,
    }
    url = resolve_redis_url(settings)
    sync = client_from_url(url, retry=Retry(NoBackoff(), config.redis_retries), **options)
    aclient = async_redis_client(settings, retry=AsyncRetry(NoBackoff(), config.redis_retries), **options)
    return sync, aclient


def create_app(
    settings: Settings | None = None,
    config: ServingConfig | None = None,
    *,
    registry: Any = None,
    feature_views: Sequence[Any] | None = None,
) -> FastAPI:
    """The prediction API for the platform described by `settings` (default: from the environment).
    Connections and models are set up when the app starts (lifespan), not here."""
    settings = settings or load_settings()
    config = config or ServingConfig()
    views = list(feature_views or fr.FEATURE_VIEWS)
    metrics = ServingMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1)  # OpenMP in scikit-learn: 1 thread is ~6x faster per call here
        if config.tune_process:
            # The registry poll runs in a thread (~6 ms of SQLAlchemy a second); hand the GIL back to
            # the event loop every 1 ms instead of Python's default 5 ms, so a poll never stalls requests.
            sys.setswitchinterval(0.001)
        reg = registry
        if reg is None:
            from ml_platform.registry import ModelRegistry

            reg = await asyncio.to_thread(ModelRegistry, settings.mlflow_tracking_uri, settings.model_name)
        sync_client, async_client = _redis_clients(settings, config)
        online = RedisOnlineStore(
            sync_client, project=settings.project, views=views, async_client=async_client
        )
        log = (
            PredictionLogWriter(
                async_client, prediction_stream_key(settings.project), maxlen=config.prediction_log_maxlen
            )
            if config.prediction_log
            else None
        )
        metrics.attach_log(log)

        def on_swap(event: SwapEvent) -> None:
            metrics.model_swaps.inc()
            metrics.set_model(holder.current)

        holder = ModelHolder(
            reg,
            alias=config.alias,
            scorer=config.scorer,
            poll_interval_s=config.poll_interval_s,
            on_swap=on_swap,
        )
        service = PredictionService(holder, online, metrics, settings.model_name, log, config.max_batch_rows)
        state = _AppState(
            settings, config, holder, online, async_client, sync_client, service, log, metrics, time.time()
        )
        await asyncio.to_thread(holder.refresh)  # the champion (+ previous champion) before the first request
        metrics.set_model(holder.current)
        if config.tune_process:
            # Everything allocated so far (MLflow, scikit-learn, the models) lives as long as the
            # process: move it out of the collector's sight, or each full collection walks it.
            gc.collect()
            gc.freeze()
        if holder.current is None:
            _log.warning(
                "no %r model could be loaded yet: %s; /predict answers 503 until one is",
                config.alias,
                holder.last_error or "the alias is not set",
            )
        state.tasks = [asyncio.create_task(service.run(), name="scoring-batcher")]
        state.tasks.append(asyncio.create_task(holder.watch(state.stop), name="champion-watcher"))
        if log is not None:
            state.tasks.append(asyncio.create_task(log.run(), name="prediction-log-writer"))
        app.state.serving = state
        _log.info(
            "serving %s v%s from project %r (Redis keys %s:*, log stream %s)",
            settings.model_name,
            holder.current.version if holder.current else None,
            settings.project,
            settings.project,
            prediction_stream_key(settings.project),
        )
        try:
            yield
        finally:
            state.stop.set()
            if log is not None:
                await log.close(timeout=2.0)
            for task in state.tasks:
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await async_client.aclose()
            with contextlib.suppress(Exception):
                online.close()
                sync_client.close()

    app = FastAPI(
        title="ml_platform fraud scoring API",
        version="1.0",
        description=(
            "Scores card transactions with the registry's champion model, using the online feature "
            "store for the card holder's and merchant's features. Every prediction is logged."
        ),
        lifespan=lifespan,
    )
    app.add_middleware(_HttpMetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            field_name = ".".join(loc) or "body"
            entry = {"field": field_name, "message": err.get("msg", ""), "type": err.get("type", "")}
            if "input" in err and field_name != "body":
                try:
                    json.dumps(err["input"])
                    entry["input"] = err["input"]
                except (TypeError, ValueError):
                    entry["input"] = repr(err["input"])
            errors.append(entry)
        message = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
        return JSONResponse(
            status_code=422, content={"error": "invalid_request", "message": message, "errors": errors}
        )

    @app.exception_handler(ServiceUnavailable)
    async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
        return JSONResponse(
            status_code=503,
            content={"error": exc.reason, "message": exc.message},
            headers={"Retry-After": "1"},
        )

    def state_of(request: Request) -> _AppState:
        return request.app.state.serving

    unavailable = {
        503: {"model": ErrorResponse, "description": "Redis, the online store or the model is unavailable"}
    }
    invalid = {
        422: {"model": ErrorResponse, "description": "Invalid input; `errors[].field` names the field"}
    }

    @app.post("/predict", response_model=Prediction, responses={**invalid, **unavailable})
    async def predict(
        request: Request,
        transaction: Annotated[Transaction, Body(openapi_examples=PREDICT_EXAMPLES)],
        include_features: Annotated[bool, Query(description="Return the model inputs too")] = False,
    ) -> JSONResponse:
        """Score one transaction with the champion model."""
        (result,) = await state_of(request).service.predict([transaction.model_dump()], include_features)
        return JSONResponse(result)

    @app.post("/predict/batch", response_model=BatchResponse, responses={**invalid, **unavailable})
    async def predict_batch(
        request: Request,
        batch: Annotated[BatchRequest, Body(openapi_examples=BATCH_EXAMPLES)],
        include_features: Annotated[bool, Query(description="Return the model inputs too")] = False,
    ) -> JSONResponse:
        """Score several transactions in one call (same model version for all of them)."""
        state = state_of(request)
        if len(batch.transactions) > state.config.max_request_rows:
            return JSONResponse(
                status_code=422,
                content={
                    "error": "invalid_request",
                    "message": f"transactions: {len(batch.transactions)} rows, at most "
                    f"{state.config.max_request_rows} per call; split the batch",
                    "errors": [{"field": "transactions", "message": "too many rows", "type": "too_long"}],
                },
            )
        rows = [t.model_dump() for t in batch.transactions]
        return JSONResponse({"predictions": await state.service.predict(rows, include_features)})

    @app.get("/health")
    async def health(request: Request) -> dict:
        """Liveness: the process is up and its event loop answers."""
        state = state_of(request)
        current = state.holder.current
        return {
            "status": "ok",
            "model_version": current.version if current else None,
            "uptime_s": round(time.time() - state.started_at, 1),
        }

    @app.get("/health/ready", responses={503: {"description": "Not ready: see checks"}})
    async def ready(request: Request) -> JSONResponse:
        """Readiness: a model is loaded, Redis answers, the model's feature views are materialized."""
        state = state_of(request)
        current = state.holder.current
        checks: dict[str, dict] = {
            "model": {
                "ok": current is not None,
                "version": current.version if current else None,
                "scorer": current.scoring.name if current else None,
                "error": state.holder.last_error,
            },
        }
        started = time.perf_counter()
        try:
            await state.async_client.ping()
            checks["redis"] = {"ok": True, "latency_ms": round((time.perf_counter() - started) * 1000, 3)}
        except (redis.RedisError, OSError) as exc:
            checks["redis"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if checks["redis"]["ok"] and current is not None:
            views = sorted({ref.split(":", 1)[0] for ref in current.contract.feature_refs})
            try:
                versions = [await state.async_client.hget(state.online.meta_key(v), "version") for v in views]
                missing = [v for v, ver in zip(views, versions) if ver is None]
                checks["online_store"] = {"ok": not missing, "views": views, "not_materialized": missing}
            except (redis.RedisError, OSError) as exc:
                checks["online_store"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        else:
            checks["online_store"] = {"ok": False, "error": "needs Redis and a model"}
        if state.log is not None:
            checks["prediction_log"] = {"ok": True, **state.log.status()}  # informative, never blocks
        ok = all(c["ok"] for c in checks.values())
        return JSONResponse(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status_code=200 if ok else 503
        )

    @app.get("/model")
    async def model_status(request: Request) -> dict:
        """The version serving, how it is scored (and why), loaded versions and recent swaps."""
        state = state_of(request)
        return {
            **state.holder.status(),
            "swaps": [asdict(s) for s in state.holder.swaps[-10:]],
            "model_name": state.settings.model_name,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --------------------------------------------------------------------------- running it

_ENV_SETTINGS = "ML_PLATFORM_SERVING_SETTINGS"


def _settings_payload(settings: Settings, config: ServingConfig, log_level: str) -> str:
    return json.dumps({"settings": settings.model_dump(mode="json"), "config": asdict(config), "log_level": log_level})


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def app_from_environment() -> FastAPI:
    """uvicorn factory for multi-worker runs: settings and config travel in an env variable."""
    payload = json.loads(os.environ[_ENV_SETTINGS])
    _configure_logging(payload.get("log_level", "info"))
    return create_app(Settings(**payload["settings"]), ServingConfig(**payload["config"]))


def run_server(
    settings: Settings | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    config: ServingConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API with uvicorn until interrupted (SIGINT/SIGTERM: graceful, the log is flushed).
    `workers` > 1 starts that many processes, each with its own models and connections."""
    import uvicorn

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = settings or load_settings()
    config = dataclasses.replace(config or ServingConfig(), tune_process=True)
    _configure_logging(log_level)
    common = {
        "host": host,
        "port": port,
        "log_level": log_level,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    if workers <= 1:
        uvicorn.run(create_app(settings, config), **common)
        return
    os.environ[_ENV_SETTINGS] = _settings_payload(settings, config, log_level)
    # A worker is ready once its models are loaded (import mlflow + load + parity checks: ~5-15 s);
    # uvicorn's default 5 s health-check timeout would kill and restart it forever.
    uvicorn.run(
        "ml_platform.serving.api:app_from_environment",
        factory=True,
        workers=workers,
        timeout_worker_healthcheck=120,
        **common,
    )
