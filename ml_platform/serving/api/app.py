"""`create_app`: the FastAPI app of the prediction API, its lifespan (models, Redis, background
tasks) and its error answers (422 naming the field, 503 naming the missing dependency)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ml_platform import features as fr
from ml_platform.experiments.router import ExperimentRouter
from ml_platform.experiments.store import ExperimentStore
from ml_platform.featurestore.online import RedisOnlineStore
from ml_platform.serving.api.config import ServingConfig
from ml_platform.serving.api.experiment_routes import experiment_router
from ml_platform.serving.api.metrics import HttpMetricsMiddleware, ServingMetrics
from ml_platform.serving.api.routes import router
from ml_platform.serving.api.security import BodyLimitMiddleware
from ml_platform.serving.api.service import PredictionService, ServiceUnavailable
from ml_platform.serving.model_cache import ModelCache
from ml_platform.serving.model_holder import ModelHolder, SwapEvent
from ml_platform.serving.prediction_log import PredictionLogWriter, prediction_stream_key
from ml_platform.serving.shadow import ShadowScorer
from ml_platform.settings import Settings, load_settings

_log = logging.getLogger(__name__)


@dataclass
class AppState:
    """What a running app holds (`app.state.serving`): the routes read it."""

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
    experiments: ExperimentStore | None = None
    router: ExperimentRouter | None = None
    shadow: ShadowScorer | None = None
    tasks: list[asyncio.Task] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)


def redis_clients(settings: Settings, config: ServingConfig) -> tuple[Any, Any]:
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


def validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    """pydantic's errors as the API reports them: `field` is the dotted path in the body
    (`amount`, `transactions.3.amount`), or `body` when the body itself is wrong (not JSON)."""
    errors = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        message = err.get("msg", "")
        if err.get("type") == "json_invalid":  # loc is ("body", <character offset>)
            field_name = "body"
            detail = (err.get("ctx") or {}).get("error")
            offset = loc[1] if len(loc) > 1 else None
            message = f"{message}: {detail}" if detail else message
            message += f" (at character {offset})" if offset is not None else ""
        else:
            if loc and loc[0] == "body":
                loc = loc[1:]
            field_name = ".".join(str(p) for p in loc) or "body"
        entry: dict[str, Any] = {"field": field_name, "message": message, "type": err.get("type", "")}
        if "input" in err and field_name != "body":
            try:
                json.dumps(err["input"])
                entry["input"] = err["input"]
            except (TypeError, ValueError):
                entry["input"] = repr(err["input"])
        errors.append(entry)
    return errors


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = validation_errors(exc)
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors[:5])
    if request.url.path.startswith("/feedback"):  # refused rewards are counted like the others
        state = getattr(request.app.state, "serving", None)
        if state is not None:
            state.metrics.child(state.metrics.feedback, "invalid").inc()
    return JSONResponse(
        status_code=422, content={"error": "invalid_request", "message": message, "errors": errors}
    )


async def _unavailable(request: Request, exc: ServiceUnavailable) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"error": exc.reason, "message": exc.message},
        headers={"Retry-After": "1"},
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """An HTTPException whose detail is the API's {"error", "message"} answers with it as the body
    (not under FastAPI's "detail"), like every other error of this API."""
    body = exc.detail if isinstance(exc.detail, dict) else {"error": "http_error", "message": str(exc.detail)}
    return JSONResponse(status_code=exc.status_code, content=body, headers=getattr(exc, "headers", None))


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
        sync_client, async_client = redis_clients(settings, config)
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

        router: ExperimentRouter | None = None
        holder = ModelHolder(
            reg,
            alias=config.alias,
            scorer=config.scorer,
            poll_interval_s=config.poll_interval_s,
            on_swap=on_swap,
            pinned=lambda: router.pinned_versions() if router is not None else set(),
            cache=ModelCache(settings.data_dir / "model_cache", settings.model_name) if config.model_cache else None,
        )
        experiments = ExperimentStore(sync_client, settings.project, async_client)
        router = ExperimentRouter(experiments, holder.load, refresh_s=config.experiment_refresh_s)
        shadow = ShadowScorer(log.append if log is not None else None, settings.model_name,
                              max_pending=config.shadow_max_pending)  # fmt: skip
        service = PredictionService(
            holder, online, metrics, settings.model_name, log, config.max_batch_rows,
            router=router, experiments=experiments, shadow=shadow,
        )  # fmt: skip
        state = AppState(
            settings, config, holder, online, async_client, sync_client, service, log, metrics, time.time(),
            experiments=experiments, router=router, shadow=shadow,
        )  # fmt: skip
        await asyncio.to_thread(holder.refresh)  # the champion (+ previous champion) before the first request
        await asyncio.to_thread(router.refresh)  # and the arms of a running experiment
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
        state.tasks.append(asyncio.create_task(router.watch(state.stop), name="experiment-router"))
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
            shadow.close()
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
    app.state.api_token = settings.api_token_value
    app.state.auth_scope = config.auth_scope
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(ServiceUnavailable, _unavailable)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.include_router(router)
    app.include_router(experiment_router)
    return app
