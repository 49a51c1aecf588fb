"""The API's endpoints, on one `APIRouter` (`create_app` includes it).

POST /predict           one transaction -> fraud probability, decision, model version, prediction id
POST /predict/batch     up to `max_request_rows` transactions in one call
GET  /health            liveness (the process answers)
GET  /health/ready      readiness: model loaded, Redis reachable, online store materialized (503 if not)
GET  /model             which version serves, how it is scored, loaded versions, recent swaps
GET  /metrics           Prometheus text: requests, errors, latency, score distribution, model version

A new endpoint goes here; the HTTP metrics label it by its route template without more ado.
Each handler reads the app's `AppState` (`request.app.state.serving`, set up by the lifespan).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import redis
from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from ml_platform.serving.api.schemas import (
    BATCH_EXAMPLES,
    PREDICT_EXAMPLES,
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Prediction,
    Transaction,
)
from ml_platform.serving.api.security import require_read_token

if TYPE_CHECKING:
    from ml_platform.serving.api.app import AppState

router = APIRouter()
READ = [Depends(require_read_token)]  # a token only with ServingConfig.auth_scope="all" (api.security)

UNAVAILABLE = {
    503: {"model": ErrorResponse, "description": "Redis, the online store or the model is unavailable"}
}
INVALID = {422: {"model": ErrorResponse, "description": "Invalid input; `errors[].field` names the field"}}
TOO_MANY_ROWS = "too_many_rows"


def state_of(request: Request) -> AppState:
    return request.app.state.serving


@router.post("/predict", response_model=Prediction, responses={**INVALID, **UNAVAILABLE}, dependencies=READ)
async def predict(
    request: Request,
    transaction: Annotated[Transaction, Body(openapi_examples=PREDICT_EXAMPLES)],
    include_features: Annotated[bool, Query(description="Return the model inputs too")] = False,
) -> JSONResponse:
    """Score one transaction with the champion model."""
    (result,) = await state_of(request).service.predict([transaction.model_dump()], include_features)
    return JSONResponse(result)


@router.post("/predict/batch", response_model=BatchResponse, responses={**INVALID, **UNAVAILABLE},
             dependencies=READ)
async def predict_batch(
    request: Request,
    batch: Annotated[BatchRequest, Body(openapi_examples=BATCH_EXAMPLES)],
    include_features: Annotated[bool, Query(description="Return the model inputs too")] = False,
) -> JSONResponse:
    """Score several transactions in one call (same model version for all of them)."""
    state = state_of(request)
    limit = state.config.max_request_rows
    if len(batch.transactions) > limit:
        message = (
            f"transactions: {len(batch.transactions)} rows, more than this server's "
            f"max_request_rows={limit} per call; split the batch"
        )
        return JSONResponse(
            status_code=422,
            content={
                "error": "invalid_request",
                "message": message,
                "errors": [
                    {
                        "field": "transactions",
                        "message": f"at most max_request_rows={limit} rows per call",
                        "type": TOO_MANY_ROWS,
                        "input": len(batch.transactions),
                    }
                ],
            },
        )
    rows = [t.model_dump() for t in batch.transactions]
    return JSONResponse({"predictions": await state.service.predict(rows, include_features)})


@router.get("/health")
async def health(request: Request) -> dict:
    """Liveness: the process is up and its event loop answers."""
    state = state_of(request)
    current = state.holder.current
    return {
        "status": "ok",
        "model_version": current.version if current else None,
        "uptime_s": round(time.time() - state.started_at, 1),
    }


@router.get("/health/ready", responses={503: {"description": "Not ready: see checks"}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: a model is loaded, Redis answers, the model's feature views are materialized
    (503 otherwise); "degraded" (200) when it can score but the registry does not answer (a model
    loaded before the outage, or this host's local copy: `reason` says which)."""
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
    poll_error = state.holder.watcher.poll_error
    checks["registry"] = {"ok": poll_error is None, "error": poll_error, "last_poll_at": state.holder.last_poll_at}
    serving = all(c["ok"] for name, c in checks.items() if name != "registry")
    if serving and checks["registry"]["ok"]:
        return JSONResponse({"status": "ready", "checks": checks})
    if serving:  # scoring works; the registry does not answer: no alias move will be seen
        reason = state.holder.degraded or f"{poll_error}; serving v{current.version}, loaded before the outage"
        return JSONResponse({"status": "degraded", "reason": reason, "checks": checks})
    failing = [name for name, c in checks.items() if not c["ok"]]
    return JSONResponse({"status": "not_ready", "reason": f"failing: {', '.join(failing)}", "checks": checks},
                        status_code=503)


@router.get("/model", dependencies=READ)
async def model_status(request: Request) -> dict:
    """The version serving, how it is scored (and why), loaded versions, recent swaps and the
    last load or poll error (a champion that failed to load is named here; the old one serves)."""
    state = state_of(request)
    return {
        **state.holder.status(),
        "swaps": [asdict(s) for s in state.holder.swaps[-10:]],
        "model_name": state.settings.model_name,
    }


@router.get("/metrics", response_class=Response)
async def prometheus_metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    body, content_type = state_of(request).metrics.exposition()
    return Response(body, media_type=content_type)
