"""A Celery worker for Dagster steps (ML_PLATFORM_EXECUTOR=celery): `celery -A dagster_celery.app
worker` with the platform's broker and result backend, one step at a time (`--pool solo`: the
step runs in the worker process itself; start as many workers as you want steps in parallel).

The broker URL may hold a password: it goes to the worker in a config module written 0600 under
DAGSTER_HOME (dagster-celery reads `dagster_celery_config` from the worker's PYTHONPATH), never on
its command line.
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from ml_platform.settings import Settings


@dataclass(frozen=True)
class WorkerCommand:
    argv: list[str]
    env: dict[str, str]  # to add to the worker's environment


def worker_command(settings: Settings, name: str | None = None, loglevel: str = "INFO") -> WorkerCommand:
    config_dir = settings.dagster_home / "celery" / uuid.uuid4().hex
    config_dir.mkdir(parents=True, mode=0o700)
    module = config_dir / "dagster_celery_config.py"
    fd = os.open(module, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(f"broker_url = {settings.celery_broker_url!r}\nresult_backend = {settings.celery_backend_url!r}\n")
    celery = Path(sys.executable).parent / "celery"
    argv = [str(celery) if celery.exists() else "celery", "-A", "dagster_celery.app", "worker",
            "--prefetch-multiplier=1", "--pool", "solo", "--loglevel", loglevel,
            "-n", f"{name or 'ml-platform'}-{uuid.uuid4().hex[:6]}@%h"]
    pythonpath = os.pathsep.join(p for p in (str(config_dir), os.environ.get("PYTHONPATH", "")) if p)
    return WorkerCommand(argv=argv, env={"PYTHONPATH": pythonpath, "ML_PLATFORM_EXECUTOR": "celery"})
