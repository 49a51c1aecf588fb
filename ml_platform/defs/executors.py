"""Where a job's steps run, from the settings (ML_PLATFORM_EXECUTOR): Dagster's default, in
process, in subprocesses, or on Celery workers over a broker (dagster-celery; RabbitMQ by
default). Steps on workers exchange outputs through the filesystem IO manager under
DAGSTER_HOME and write their events to the instance's database, so the workers need the same
data directory and instance as the run (the same environment: README, "Scaling past one machine").
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from ml_platform.defs.resources import secret_reference
from ml_platform.settings import Settings


def executor_for(settings: Settings) -> dg.ExecutorDefinition | None:
    """The executor every job of the definitions uses (None: Dagster's default)."""
    if settings.executor is None:
        return None
    if settings.executor == "in_process":
        return dg.in_process_executor
    if settings.executor == "multiprocess":
        return dg.multiprocess_executor
    if settings.executor == "k8s":
        return _k8s_executor(settings)
    from dagster_celery import celery_executor

    return celery_executor.configured({
        "broker": secret_reference(settings.celery_broker_url, "ML_PLATFORM_CELERY_BROKER_URL", as_config=True),
        "backend": secret_reference(settings.celery_backend_url, "ML_PLATFORM_CELERY_BACKEND_URL", as_config=True),
    })


def _k8s_executor(settings: Settings) -> dg.ExecutorDefinition:
    """dagster-k8s's k8s_job_executor with the YAML config at ML_PLATFORM_K8S_EXECUTOR_CONFIG,
    checked here so that a wrong field is named when the definitions load."""
    import yaml
    from dagster._config import validate_config
    from dagster_k8s import k8s_job_executor

    path = settings.k8s_executor_config
    if path is None:
        raise ValueError("ML_PLATFORM_EXECUTOR=k8s needs ML_PLATFORM_K8S_EXECUTOR_CONFIG (e.g. deploy/k8s/executor.yaml)")
    config = yaml.safe_load(Path(path).read_text()) or {}
    checked = validate_config(k8s_job_executor.config_schema.config_type, config)
    if not checked.success:
        raise ValueError(f"{path}: " + "; ".join(e.message for e in checked.errors))
    return k8s_job_executor.configured(config)


def runs_out_of_process(settings: Settings) -> bool:
    """True when the CLI must launch runs through a reconstructable job (steps in other processes)."""
    return settings.executor in ("multiprocess", "celery", "k8s")
