"""The real-time prediction API (FastAPI + uvicorn): `ml-platform serve` runs `run_server`.

Per request: the entity's features are read from the online store (one async Redis round trip,
`contract.feature_refs` of the model serving now), request-time features are computed by the one
definition in `features.py`, the champion scores (treelite where it supports the model and agrees
with scikit-learn, else scikit-learn), and the prediction is logged to a Redis stream off the
request path. `ModelHolder` follows the `champion` alias and swaps without dropping a request.
Redis down -> 503 with a JSON reason; the process recovers by itself when Redis returns.

    schemas.py   request / response bodies (`Transaction`, `Prediction`, ...)
    config.py    `ServingConfig`, the process's knobs
    metrics.py   Prometheus metrics and the HTTP metrics middleware
    service.py   `PredictionService`: micro-batched scoring, no HTTP
    routes.py    the endpoints (one `APIRouter`)
    app.py       `create_app`: lifespan, error answers
    server.py    `run_server`, `app_from_environment` (uvicorn)
"""

from ml_platform.serving.api.app import AppState, create_app, redis_clients, validation_errors
from ml_platform.serving.api.config import ServingConfig
from ml_platform.serving.api.metrics import HttpMetricsMiddleware, ServingMetrics
from ml_platform.serving.api.routes import router
from ml_platform.serving.api.schemas import (
    EXAMPLE_TRANSACTION,
    BatchRequest,
    BatchResponse,
    ErrorResponse,
    Prediction,
    PredictionFlags,
    Transaction,
)
from ml_platform.serving.api.server import app_from_environment, run_server
from ml_platform.serving.api.service import PredictionService, ServiceUnavailable

__all__ = [
    "EXAMPLE_TRANSACTION",
    "AppState",
    "BatchRequest",
    "BatchResponse",
    "ErrorResponse",
    "HttpMetricsMiddleware",
    "Prediction",
    "PredictionFlags",
    "PredictionService",
    "ServiceUnavailable",
    "ServingConfig",
    "ServingMetrics",
    "Transaction",
    "app_from_environment",
    "create_app",
    "redis_clients",
    "router",
    "run_server",
    "validation_errors",
]
