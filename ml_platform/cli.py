"""`ml-platform`: the user-facing commands that are not Dagster's own.

Imports of the heavy libraries (dagster, mlflow, pandera) happen inside each command, so
`ml-platform --help` answers at once.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time

import click

from ml_platform.settings import Settings, load_settings

DAGSTER_YAML = """\
# Written by ml-platform: a local Dagster instance under the data directory.
telemetry:
  enabled: false
"""


def prepare_dagster_home(settings: Settings) -> None:
    """Create DAGSTER_HOME (under data/ by default) and point this process at it."""
    settings.ensure_dirs()
    cfg = settings.dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """An ML platform on Dagster: feature store, validated training, MLflow registry, serving."""


@main.command()
@click.option("--days", default=45, show_default=True, help="Days of events, ending yesterday (UTC).")
@click.option("--users", "n_users", default=5000, show_default=True, help="Card holders.")
@click.option("--merchants", "n_merchants", default=500, show_default=True, help="Merchants.")
@click.option("--txns-per-user-per-day", default=0.6, show_default=True, help="Mean transactions per user a day.")
@click.option("--seed", default=7, show_default=True, help="Seed of the synthetic generator.")
@click.option("--drift-start", default=None, help="Shift distributions from this date (YYYY-MM-DD).")
def demo(days: int, n_users: int, n_merchants: int, txns_per_user_per_day: float, seed: int,
         drift_start: str | None) -> None:
    """Generate demo data and materialize the whole asset graph through Dagster."""
    if days < 21:
        # Legit labels settle 7 days after the event and training may only use labels known at its
        # cut, so shorter histories leave the train split without enough labelled rows.
        raise click.BadParameter(f"needs at least 21 days of history to split train/validation/test, got {days}",
                                 param_hint="--days")
    settings = load_settings()
    prepare_dagster_home(settings)
    started = time.monotonic()

    from ml_platform.defs.pipeline import run_training_pipeline

    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    start = end - dt.timedelta(days=days - 1)
    click.echo(f"Materializing the asset graph for {start} .. {end} ({days} days, {n_users} users, seed {seed}) ...")
    outcome = run_training_pipeline(
        settings,
        start=start,
        end=end,
        event_source={
            "seed": seed,
            "n_users": n_users,
            "n_merchants": n_merchants,
            "txns_per_user_per_day": txns_per_user_per_day,
            "drift_start": drift_start,
        },
    )
    took = time.monotonic() - started
    if not outcome.success:
        click.echo(f"\nThe run failed after {took:.0f} s: {outcome.failure}", err=True)
        click.echo(f"Look at run {outcome.run_id} in the UI (ml-platform ui).", err=True)
        sys.exit(1)
    click.echo(outcome.summary())
    click.echo(f"\nDone in {took:.0f} s. Where to look:")
    click.echo("  Dagster UI:   make ui   (or: ml-platform ui)  -> http://127.0.0.1:3000")
    click.echo(f"  Dagster home: {settings.dagster_home}")
    click.echo(f"  MLflow:       {settings.mlflow_tracking_uri}")
    click.echo(f"                mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--workers", default=1, show_default=True, help="uvicorn worker processes.")
@click.option("--scorer", type=click.Choice(["auto", "treelite", "sklearn"]), default="auto", show_default=True,
              help="auto: treelite where it matches scikit-learn on a parity sample, else scikit-learn.")
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, workers: int, scorer: str, log_level: str) -> None:
    """Real-time prediction API: POST /predict, POST /predict/batch, GET /health, GET /metrics, /docs."""
    from ml_platform.serving.api import ServingConfig, run_server

    settings = load_settings()
    click.echo(f"Serving {settings.model_name}@champion on http://{host}:{port} (docs: /docs)")
    run_server(settings, host=host, port=port, workers=workers, config=ServingConfig(scorer=scorer),
               log_level=log_level)


@main.command()
@click.option("--group", default="scorers", show_default=True, help="Consumer group shared by the workers.")
@click.option("--consumer", default=None, help="This worker's name in the group (default: host-pid).")
@click.option("--batch-size", default=500, show_default=True)
@click.option("--until-idle", is_flag=True, help="Stop once the input stream is drained (for batch replays).")
@click.option("--no-seed", is_flag=True, help="Do not fold recent raw history into cold feature state.")
def stream(group: str, consumer: str | None, batch_size: int, until_idle: bool, no_seed: bool) -> None:
    """Streaming prediction worker on Redis Streams (at-least-once, idempotent per event id)."""
    import logging

    from ml_platform.serving.stream import StreamConfig, run_worker, stream_names

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    config = StreamConfig(group=group, consumer=consumer, batch_size=batch_size, seed_history=not no_seed)
    names = stream_names(settings.project, config)
    click.echo(f"Reading {names.input} (group {group}) -> {names.output}; dead letters -> {names.dead_letter}")
    stats = run_worker(settings, config, until_idle=until_idle)
    click.echo(f"Stopped: {stats}")


@main.command()
@click.option("--reason", "-r", required=True, help="Why: recorded with the alias move in MLflow.")
@click.option("--model", "model_name", default=None, help="Registered model (default: ML_PLATFORM_MODEL_NAME).")
@click.option("--who", default=None, help="Who asks (default: the OS user).")
def rollback(reason: str, model_name: str | None, who: str | None) -> None:
    """Move `champion` back to the previous champion (one step; repeat to walk further back)."""
    settings = load_settings()
    from ml_platform.registry import ModelRegistry

    registry = ModelRegistry(settings.mlflow_tracking_uri, model_name or settings.model_name)
    try:
        from_version, to_version = registry.rollback(who=who, why=reason)
    except (LookupError, ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{registry.model_name}: champion v{from_version} -> v{to_version} ({reason})")
    click.echo("Running servers and stream workers pick the change up within seconds.")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True)
def ui(host: str, port: int) -> None:
    """Serve the Dagster web UI for this platform (dagster dev, DAGSTER_HOME under data/)."""
    settings = load_settings()
    prepare_dagster_home(settings)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    workspace = os.path.join(root, "workspace.yaml")
    args = [sys.executable, "-m", "dagster", "dev", "-w", workspace, "-h", host, "-p", str(port)]
    click.echo(f"DAGSTER_HOME={settings.dagster_home} dagster dev -w {workspace} -h {host} -p {port}")
    os.chdir(root)
    os.execv(args[0], args)


if __name__ == "__main__":
    main()
