"""The API's experiment endpoints (`create_app` includes `experiment_router`).

POST /feedback            a late reward for one prediction: 200 accepted, 404 no decision awaits a
                          reward under that id (unknown, not in an experiment, or older than the
                          experiment's feedback window), 409 already rewarded, 422 bad reward
POST /feedback/batch      many rewards in one call (what a label pipeline sends)
GET  /experiments         the active experiment and every experiment's status
GET  /experiments/{name}  per arm: posterior mean, std, rewards (samples), decisions and traffic
                          share, and what this process's router and shadow are doing
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ml_platform.experiments.store import ACCEPTED, DUPLICATE, UNKNOWN
from ml_platform.serving.api.schemas import (
    ErrorResponse,
    Feedback,
    FeedbackAccepted,
    FeedbackBatch,
    FeedbackBatchResult,
)
from ml_platform.serving.api.security import require_read_token, require_write_token

if TYPE_CHECKING:
    from ml_platform.serving.api.app import AppState

experiment_router = APIRouter(tags=["experiments"])


def _state(request: Request) -> AppState:
    return request.app.state.serving


def _unavailable(exc: Exception) -> JSONResponse:
    return JSONResponse(
        status_code=503,
        content={"error": "redis_unavailable", "message": f"the experiment store (Redis) is unreachable: {exc}"},
        headers={"Retry-After": "1"},
    )


async def _apply(state: AppState, items: list[Feedback]) -> list[tuple[str, str]]:
    results = await state.experiments.feedback([(f.prediction_id, f.reward) for f in items])
    for outcome, _arm in results:
        state.metrics.child(state.metrics.feedback, outcome).inc()
    return results


@experiment_router.post(
    "/feedback",
    dependencies=[Depends(require_write_token)],
    response_model=FeedbackAccepted,
    responses={
        404: {"model": ErrorResponse, "description": "No decision awaits a reward under this prediction_id"},
        409: {"model": ErrorResponse, "description": "This prediction was rewarded already"},
        422: {"model": ErrorResponse, "description": "Invalid body (e.g. a reward outside [0, 1])"},
    },
)
async def feedback(request: Request, item: Feedback) -> JSONResponse:
    """A late reward for one prediction made within an experiment; it goes to the arm that served
    it (recorded at decision time), once."""
    state = _state(request)
    try:
        ((outcome, arm),) = await _apply(state, [item])
    except (redis.RedisError, OSError) as exc:
        return _unavailable(exc)
    if outcome == ACCEPTED:
        return JSONResponse({"prediction_id": item.prediction_id, "experiment_arm": arm, "status": ACCEPTED})
    if outcome == DUPLICATE:
        return JSONResponse(
            status_code=409,
            content={
                "error": "duplicate_feedback",
                "message": f"prediction_id {item.prediction_id!r} was rewarded already (arm {arm}); "
                "each decision counts once",
            },
        )
    return JSONResponse(
        status_code=404,
        content={
            "error": "unknown_prediction",
            "message": f"prediction_id {item.prediction_id!r}: no decision awaits a reward under this id "
            "(never made here, made outside an experiment, or older than the experiment's feedback_ttl_s)",
        },
    )


@experiment_router.post("/feedback/batch", response_model=FeedbackBatchResult,
                        dependencies=[Depends(require_write_token)])
async def feedback_batch(request: Request, batch: FeedbackBatch) -> JSONResponse:
    """Many rewards in one call; each is applied atomically and once (the unknown and duplicate
    ids are listed, the rest accepted)."""
    state = _state(request)
    limit = state.config.max_feedback_rows
    if len(batch.feedback) > limit:
        state.metrics.child(state.metrics.feedback, "invalid").inc(len(batch.feedback))
        return JSONResponse(
            status_code=422,
            content={
                "error": "invalid_request",
                "message": f"feedback: {len(batch.feedback)} rewards, more than max_feedback_rows={limit} per call",
                "errors": [{"field": "feedback", "message": f"at most {limit} rewards per call",
                            "type": "too_many_rows", "input": len(batch.feedback)}],
            },
        )  # fmt: skip
    try:
        results = await _apply(state, batch.feedback)
    except (redis.RedisError, OSError) as exc:
        return _unavailable(exc)
    ids = [f.prediction_id for f in batch.feedback]
    return JSONResponse(
        {
            "accepted": sum(o == ACCEPTED for o, _ in results),
            "unknown": [pid for pid, (o, _) in zip(ids, results) if o == UNKNOWN],
            "duplicate": [pid for pid, (o, _) in zip(ids, results) if o == DUPLICATE],
        }
    )


@experiment_router.get("/experiments", dependencies=[Depends(require_read_token)])
async def experiments(request: Request) -> JSONResponse:
    """The active experiment (the one routing this API's traffic) and every experiment's status."""
    store = _state(request).experiments
    try:
        active, names = await asyncio.to_thread(lambda: (store.active(), store.names()))
        statuses = await asyncio.to_thread(lambda: {n: store.status(n) for n in names})
    except (redis.RedisError, OSError) as exc:
        return _unavailable(exc)
    return JSONResponse({"active": active, "experiments": statuses})


@experiment_router.get("/experiments/{name}", responses={404: {"model": ErrorResponse}},
                       dependencies=[Depends(require_read_token)])
async def experiment(request: Request, name: str) -> JSONResponse:
    """Per arm: posterior mean, std and rewards received (`samples`), decisions `served` and
    `traffic_share`, `selection_probability` now; plus the config, the feedback counts, and this
    process's router and shadow status."""
    state = _state(request)
    store = state.experiments
    try:
        meta = await asyncio.to_thread(store.meta, name)
        if not meta:
            return JSONResponse(
                status_code=404,
                content={"error": "unknown_experiment", "message": f"no experiment named {name!r}"},
            )
        stats = await asyncio.to_thread(store.stats, name)
        counts = await asyncio.to_thread(store.feedback_counts, name)
        config = await asyncio.to_thread(store.config, name)
    except (redis.RedisError, OSError) as exc:
        return _unavailable(exc)
    router = state.router
    active = router.active if router is not None else None
    return JSONResponse(
        {
            "name": name,
            "status": meta.get("status"),
            "started_at": float(meta["started_at"]) if "started_at" in meta else None,
            "started_by": meta.get("started_by"),
            "stopped_at": float(meta["stopped_at"]) if "stopped_at" in meta else None,
            "routing": config.routing,
            "arms": {arm: s.to_dict() for arm, s in stats.items()},
            "shadow": {
                "version": config.shadow_version,
                "share": config.shadow_share,
                **(state.shadow.status() if state.shadow is not None else {}),
            },
            "feedback": counts,
            "config": config.to_dict(),
            "this_process": {
                "routing": active is not None and active.name == name,
                "revision": active.revision if active is not None and active.name == name else None,
                "last_error": router.last_error if router is not None else None,
            },
        }
    )
