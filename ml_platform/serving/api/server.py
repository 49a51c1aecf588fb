"""Running the API: `run_server` (what `ml-platform serve` calls; uvicorn, 1..n workers) and
`app_from_environment`, the factory each uvicorn worker process builds its app with."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

from fastapi import FastAPI

from ml_platform.serving.api.app import create_app
from ml_platform.serving.api.config import ServingConfig
from ml_platform.settings import DEFAULT_HTTP_PORT, Settings, load_settings

# Multi-worker runs: the settings and config travel to each worker process in this env variable.
ENV_SETTINGS = "ML_PLATFORM_SERVING_SETTINGS"
APP_FACTORY = "ml_platform.serving.api:app_from_environment"


def _settings_payload(settings: Settings, config: ServingConfig, log_level: str) -> str:
    return json.dumps(
        {"settings": settings.model_dump(mode="json"), "config": dataclasses.asdict(config), "log_level": log_level}
    )


def _configure_logging(log_level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def app_from_environment() -> FastAPI:
    """uvicorn factory for multi-worker runs: settings and config travel in an env variable."""
    payload = json.loads(os.environ[ENV_SETTINGS])
    _configure_logging(payload.get("log_level", "info"))
    return create_app(Settings(**payload["settings"]), ServingConfig(**payload["config"]))


def run_server(
    settings: Settings | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_HTTP_PORT,
    workers: int = 1,
    config: ServingConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve the API with uvicorn until interrupted (SIGINT/SIGTERM: graceful, the log is flushed).
    `workers` > 1 starts that many processes, each with its own models and connections."""
    import uvicorn

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # MLflow's HTTP client retries a dead tracking server for minutes by default: a server that
    # starts during a registry outage must come up (degraded) in seconds, and a poll must fail fast.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
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
    os.environ[ENV_SETTINGS] = _settings_payload(settings, config, log_level)
    # A worker is ready once its models are loaded (import mlflow + load + parity checks: ~5-15 s);
    # uvicorn's default 5 s health-check timeout would kill and restart it forever.
    uvicorn.run(APP_FACTORY, factory=True, workers=workers, timeout_worker_healthcheck=120, **common)
