"""Where a job's steps run, from the settings (ML_PLATFORM_EXECUTOR): Dagster's default, in
process, in subprocesses, or on Celery workers over a broker (dagster-celery; RabbitMQ by
default). Steps on workers exchange outputs through the filesystem IO manager under
DAGSTER_HOME and write their events to the instance's database, so the workers need the same
data directory and instance as the run (the same environment: README, "Scaling past one machine").
"""

from __future__ import annotations

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
    from dagster_celery import celery_executor

    return celery_executor.configured({
        "broker": secret_reference(settings.celery_broker_url, "ML_PLATFORM_CELERY_BROKER_URL", as_config=True),
        "backend": secret_reference(settings.celery_backend_url, "ML_PLATFORM_CELERY_BACKEND_URL", as_config=True),
    })


def runs_out_of_process(settings: Settings) -> bool:
    """True when the CLI must launch runs through a reconstructable job (steps in other processes)."""
    return settings.executor in ("multiprocess", "celery")
