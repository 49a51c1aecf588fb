"""`ml-platform services status|stop` and `ml-platform mlflow-server`: the servers the platform runs
on this machine.

The embedded Redis servers (one per data directory, `featurestore.redis_server.EmbeddedRedis`)
are found by their process (the bundled redis-server binary started with a config under some
`<data_dir>/redis/`), wherever their data directory is; each also stops by itself once its data
directory is gone or it has had no client for ML_PLATFORM_EMBEDDED_REDIS_IDLE_S seconds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import click

from ml_platform.settings import load_settings


@click.group(short_help="The embedded servers of this machine: status, stop.")
def services() -> None:
    """The embedded Redis servers the platform started on this machine (one per data directory)."""


def _human_age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@services.command(short_help="List the embedded Redis servers.")
def status() -> None:
    """Every embedded Redis server running on this machine: pid, port, data directory (and whether
    it still exists), clients, memory, age."""
    from ml_platform.featurestore.redis_server import embedded_servers

    servers = embedded_servers()
    mine = load_settings().data_dir.resolve() / "redis"
    if not servers:
        click.echo("no embedded Redis server is running")
        return
    click.echo(f"{'pid':>8}  {'port':>5}  {'clients':>7}  {'rss MB':>7}  {'age':>7}  data directory")
    for s in servers:
        where = str(s.dir) + ("" if s.dir_exists else "  (gone)") + ("  <- this data dir" if s.dir == mine else "")
        clients = "?" if s.clients is None else str(s.clients)
        click.echo(f"{s.pid:>8}  {s.port or '?':>5}  {clients:>7}  {s.rss_mb:>7.1f}  {_human_age(s.age_s):>7}  {where}")


@services.command(short_help="Stop embedded Redis servers.")
@click.option("--all", "everything", is_flag=True, help="Every embedded server of this machine.")
@click.option("--orphans", is_flag=True, help="The servers whose data directory is gone.")
def stop(everything: bool, orphans: bool) -> None:
    """Stop this data directory's embedded Redis (a snapshot is saved first); with --orphans the
    servers whose data directory is gone, with --all every one."""
    from ml_platform.featurestore.redis_server import EmbeddedRedis, embedded_servers, stop_process

    if everything and orphans:
        raise click.UsageError("--all or --orphans, not both")
    if not everything and not orphans:
        settings = load_settings()
        stopped = EmbeddedRedis(settings.data_dir).stop(save=True)
        click.echo(f"stopped the embedded Redis of {settings.data_dir}" if stopped
                   else f"no embedded Redis is running for {settings.data_dir}")
        return
    chosen = [s for s in embedded_servers() if everything or not s.dir_exists]
    for s in chosen:
        stop_process(s.pid, save=s.dir_exists)
        click.echo(f"stopped pid {s.pid} ({s.dir}{'' if s.dir_exists else ', gone'})")
    click.echo(f"{len(chosen)} stopped")


@click.command("mlflow-server", short_help="Run the MLflow tracking server (production profile).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True)
@click.option("--workers", default=2, show_default=True, help="uvicorn worker processes.")
def mlflow_server(host: str, port: int, workers: int) -> None:
    """`mlflow server` with its backend store at ML_PLATFORM_MLFLOW_BACKEND_STORE_URI (PostgreSQL)
    and artifacts under ML_PLATFORM_MLFLOW_ARTIFACT_ROOT; point the platform at it with
    MLFLOW_TRACKING_URI=http://HOST:PORT."""
    from ml_platform.registry.tracking_server import server_command

    settings = load_settings()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    try:
        cmd = server_command(settings.mlflow_backend_store_uri or "", settings.mlflow_artifact_root or "",
                             host=host, port=port, workers=workers, mlflow_executable=mlflow)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(cmd.describe())
    click.echo(f"MLFLOW_TRACKING_URI=http://{host}:{port}")
    sys.stdout.flush()
    os.environ.update(cmd.env)
    os.execv(cmd.argv[0], cmd.argv)


@click.command("celery-worker", short_help="Run a Celery worker for Dagster steps.")
@click.option("--name", default=None, help="Worker name prefix (default ml-platform).")
@click.option("--loglevel", default="INFO", show_default=True)
def celery_worker(name: str | None, loglevel: str) -> None:
    """A Celery worker executing Dagster steps (ML_PLATFORM_EXECUTOR=celery) from the broker at
    ML_PLATFORM_CELERY_BROKER_URL, one at a time; it needs the same environment (data directory,
    DAGSTER_HOME and its instance, MLflow, Redis) as the runs."""
    from ml_platform.celery_worker import worker_command
    from ml_platform.dagster_home import prepare_dagster_home

    settings = load_settings()
    prepare_dagster_home(settings)
    cmd = worker_command(settings, name=name, loglevel=loglevel)
    os.environ.update(cmd.env)
    os.execv(cmd.argv[0], cmd.argv)
