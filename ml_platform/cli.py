"""`ml-platform`: the user-facing commands that are not Dagster's own.

Imports of the heavy libraries (dagster, mlflow, pandera, redis) happen inside each command, so
`ml-platform --help` answers at once. Every default comes from `ml_platform.settings`.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
import uuid
from pathlib import Path

import click

from ml_platform.dagster_home import prepare_dagster_home
from ml_platform.redaction import redact_url
from ml_platform.settings import (
    DEFAULT_HTTP_PORT,
    DEFAULT_STREAM_BATCH_SIZE,
    DEFAULT_STREAM_GROUP,
    DEFAULT_UI_PORT,
    Settings,
    SyntheticDefaults,
    load_settings,
)

REPO_ROOT = Path(__file__).resolve().parent.parent


def venv_command(executable: str, module: str) -> str:
    """How to run `executable` of this Python environment, as a command that works as printed
    (no activated venv needed): its absolute path next to the interpreter, else `python -m module`."""
    path = Path(sys.executable).parent / executable
    return str(path) if path.exists() else f"{sys.executable} -m {module}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ml_platform", prog_name="ml-platform")
def main() -> None:
    """An ML platform on Dagster: feature store, validated training, MLflow registry, serving."""


@main.command(short_help="Generate demo data and run the whole asset graph.")
@click.option("--days", default=SyntheticDefaults.demo_days, show_default=True,
              help="Days of events, ending yesterday (UTC).")
@click.option("--users", "n_users", default=SyntheticDefaults.n_users, show_default=True, help="Card holders.")
@click.option("--merchants", "n_merchants", default=SyntheticDefaults.n_merchants, show_default=True,
              help="Merchants.")
@click.option("--txns-per-user-per-day", default=SyntheticDefaults.txns_per_user_per_day, show_default=True,
              help="Mean transactions per user a day.")
@click.option("--fraud-rate", default=SyntheticDefaults.fraud_rate, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of fraudulent transactions.")
@click.option("--seed", default=SyntheticDefaults.seed, show_default=True, help="Seed of the synthetic generator.")
@click.option("--drift-start", default=None, help="Shift distributions from this date (YYYY-MM-DD).")
@click.option("--scenario", type=click.Choice(["drift", "quiet"]), default=None,
              help="Instead: the closed-loop scenario, day by day through Dagster's schedule and sensors "
              "(the initial champion trained on --days of history first).")
@click.option("--scenario-days", default=60, show_default=True, type=click.IntRange(2, 366),
              help="Days the scenario runs day by day.")
@click.option("--drift-day", default=40, show_default=True, type=click.IntRange(2, 366),
              help="The drift scenario's first drifted day.")
def demo(days: int, n_users: int, n_merchants: int, txns_per_user_per_day: float, fraud_rate: float, seed: int,
         drift_start: str | None, scenario: str | None, scenario_days: int, drift_day: int) -> None:
    """Generate demo data and materialize the whole asset graph through Dagster; or, with
    --scenario, run the closed loop for --scenario-days simulated days and check its goals."""
    if days < SyntheticDefaults.min_demo_days:
        # Legit labels settle 7 days after the event and training may only use labels known at its
        # cut, so shorter histories leave the train split without enough labelled rows.
        raise click.BadParameter(
            f"needs at least {SyntheticDefaults.min_demo_days} days of history to split "
            f"train/validation/test, got {days}",
            param_hint="--days",
        )
    settings = load_settings()
    if scenario:
        if drift_start:
            raise click.BadParameter("a scenario places its drift itself (--drift-day)", param_hint="--drift-start")
        _run_scenario(settings, scenario, history_days=days, days=scenario_days, drift_day=drift_day,
                      n_users=n_users, n_merchants=n_merchants, txns_per_user_per_day=txns_per_user_per_day,
                      fraud_rate=fraud_rate, seed=seed)
        return
    prepare_dagster_home(settings)
    started = time.monotonic()

    from ml_platform.defs.pipeline import run_training_pipeline

    end = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)
    start = end - dt.timedelta(days=days - 1)
    click.echo(f"Materializing the asset graph for {start} .. {end} ({days} days, {n_users} users, seed {seed}) ...")
    event_source = {
        "seed": seed,
        "n_users": n_users,
        "n_merchants": n_merchants,
        "txns_per_user_per_day": txns_per_user_per_day,
        "fraud_rate": fraud_rate,
        "drift_start": drift_start,
    }
    outcome = run_training_pipeline(settings, start=start, end=end, event_source=event_source)
    ml_platform = venv_command("ml-platform", "ml_platform.cli")
    if not outcome.success:
        click.echo(f"\nThe run failed after {time.monotonic() - started:.0f} s: {outcome.failure}", err=True)
        click.echo(f"Look at run {outcome.run_id} in the UI ({ml_platform} ui).", err=True)
        sys.exit(1)
    click.echo(outcome.summary())
    _score_and_monitor(settings, end, event_source)
    took = time.monotonic() - started
    click.echo(f"\nDone in {took:.0f} s. Where to look:")
    click.echo(f"  Dagster UI:   {ml_platform} ui   -> http://127.0.0.1:{DEFAULT_UI_PORT}")
    click.echo(f"  Dagster home: {settings.dagster_home}")
    click.echo(f"  MLflow:       {redact_url(settings.mlflow_tracking_uri)}")
    if not settings.mlflow_tracking_uri.startswith(("http://", "https://")):
        click.echo(f"                {venv_command('mlflow', 'mlflow')} ui --backend-store-uri {redact_url(settings.mlflow_tracking_uri)}")


def _run_scenario(settings: Settings, name: str, **plan_fields) -> None:
    """`demo --scenario`: the scenario's table as it runs, its goals, where its runs and report are.
    Exits 1 when a goal is missed."""
    from ml_platform.defs.simulation import run_scenario, scenario_env, scenario_settings
    from ml_platform.scenario import ScenarioPlan

    try:
        plan = ScenarioPlan(name, **plan_fields)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc
    report = run_scenario(settings, plan, echo=click.echo)
    scenario = scenario_settings(settings, name)
    click.echo("\nGoals:\n" + report.goals_text())
    if report.rollback:
        click.echo(f"Rollback drill: {report.rollback}")
    env = " ".join(f"{k}={v}" for k, v in scenario_env(scenario).items() if k in ("ML_PLATFORM_DATA_DIR",))
    click.echo(f"\nReport: {settings.reports_dir / f'scenario_{name}.json'}")
    click.echo(f"The scenario's runs, with their tags, in the Dagster UI: {env} "
               f"{venv_command('ml-platform', 'ml_platform.cli')} ui")
    if not report.ok:
        click.echo("Some goals were missed (above).", err=True)
        sys.exit(1)


SCORED_DAYS = 14  # the demo scores the last two weeks: labelled performance has mature days to show
MONITORED_DAYS = 7  # ... and monitors the last week, a run per day: the UI plots each figure over them


def _score_and_monitor(settings: Settings, day: dt.date, event_source: dict) -> None:
    """The daily half of the lifecycle: score the last SCORED_DAYS days up to `day` in batch (one
    daily_scoring run), then monitor each of the last MONITORED_DAYS days (a daily_monitoring run
    each, oldest first); prints the last day's dashboard. Exits 1 if a run fails."""
    from ml_platform.defs.pipeline import run_daily_job, run_monitoring

    first = day - dt.timedelta(days=SCORED_DAYS - 1)
    monitored = [day - dt.timedelta(days=i) for i in range(MONITORED_DAYS - 1, -1, -1)]
    click.echo(f"\nScoring {first} .. {day} in batch, then monitoring {monitored[0]} .. {day} ...")
    runs = [lambda: run_daily_job(settings, "daily_scoring", first, event_source, until=day)]
    runs += [lambda d=d: run_monitoring(settings, d, event_source) for d in monitored]
    for run in runs:
        outcome = run()
        if not outcome.success:
            click.echo(f"The run {outcome.run_id} failed: {outcome.failure}", err=True)
            sys.exit(1)
    _print_dashboard(settings, day)


def _print_dashboard(settings: Settings, day: dt.date, monitors=None, details: bool = False):
    """Print the saved dashboard of `day` (only `monitors`, default all) and the report's path."""
    from ml_platform.monitoring.daily_report import report_path
    from ml_platform.monitoring.dashboard import MONITORS, Dashboard
    from ml_platform.monitoring.results import load_result

    found = {m: load_result(settings.monitoring_dir, m, day) for m in (monitors or MONITORS)}
    board = Dashboard(day.isoformat(), {m: r for m, r in found.items() if r is not None})
    click.echo(board.to_text(details=details))
    report = report_path(settings.reports_dir, day.isoformat())
    if report.exists():
        click.echo(f"Report: {report}")
    return board


@main.command(short_help="Real-time prediction API (HTTP).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_HTTP_PORT, show_default=True)
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


@main.command(short_help="Streaming prediction worker (Redis Streams).")
@click.option("--group", default=DEFAULT_STREAM_GROUP, show_default=True, help="Consumer group shared by the workers.")
@click.option("--consumer", default=None, help="This worker's name in the group (default: host-pid).")
@click.option("--batch-size", type=click.IntRange(1, 10_000), default=None,
              help=f"Events per read [default: ML_PLATFORM_STREAM_BATCH_SIZE, else {DEFAULT_STREAM_BATCH_SIZE}].")
@click.option("--until-idle", is_flag=True, help="Stop once the input stream is drained (for batch replays).")
@click.option("--no-seed", is_flag=True, help="Do not fold recent raw history into cold feature state.")
@click.option("--claim-idle-ms", type=click.IntRange(0), default=None,
              help="Take over another worker's pending events idle this long: its worker died "
              "[default: StreamConfig.claim_idle_ms].")
def stream(group: str, consumer: str | None, batch_size: int | None, until_idle: bool, no_seed: bool,
           claim_idle_ms: int | None) -> None:
    """Streaming prediction worker on Redis Streams (at-least-once, idempotent per event id)."""
    import logging

    from ml_platform.serving.stream import StreamConfig, run_worker, stream_names

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    config = StreamConfig(group=group, consumer=consumer, batch_size=batch_size or settings.stream_batch_size,
                          seed_history=not no_seed,
                          **({} if claim_idle_ms is None else {"claim_idle_ms": claim_idle_ms}))
    names = stream_names(settings.project, config)
    click.echo(f"Reading {names.input} (group {group}) -> {names.output}; dead letters -> {names.dead_letter}")
    stats = run_worker(settings, config, until_idle=until_idle)
    click.echo(f"Stopped: {stats}")


@main.command(short_help="Put transactions on the stream the worker reads.")
@click.option("--from", "from_path", type=click.Path(path_type=Path), default=None,
              help="A Parquet/CSV file (or a directory of them) with the raw transaction columns.")
@click.option("--generate", "generate", type=click.IntRange(min=1), default=None,
              help="This many synthetic transactions of --day instead (the demo's population).")
@click.option("--day", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
              help="Day of the generated transactions [default: today, UTC].")
@click.option("--seed", default=SyntheticDefaults.seed, show_default=True, help="Seed of the generated transactions.")
@click.option("--stream", "stream_key", default=None,
              help="Stream key [default: <project>:stream:transactions, what `ml-platform stream` reads].")
def publish(from_path: Path | None, generate: int | None, day: dt.datetime | None, seed: int,
            stream_key: str | None) -> None:
    """Publish transaction events to the stream worker's input stream (from a file, or generated)."""
    if (from_path is None) == (generate is None):
        raise click.UsageError("give exactly one of --from PATH or --generate N")
    events = _events_from_file(from_path) if from_path is not None else _generated_events(generate, day, seed)

    from ml_platform.featurestore.redis_server import redis_client
    from ml_platform.serving.stream import publish_events, stream_names

    settings = load_settings()
    key = stream_key or stream_names(settings.project).input
    client = redis_client(settings)
    try:
        ids = publish_events(client, key, events)
    finally:
        client.close()
    if ids:
        click.echo(f"Published {len(ids)} events to {key} (ids {ids[0].decode()} .. {ids[-1].decode()})")
    else:
        click.echo(f"Published no events to {key}")


def _events_from_file(path: Path):
    from ml_platform.sources.files import EventsFormatError, load_events

    try:
        events = load_events(path)
    except (FileNotFoundError, EventsFormatError) as exc:
        raise click.BadParameter(str(exc), param_hint="--from") from exc
    if events.empty:
        raise click.BadParameter(f"{path} holds no events", param_hint="--from")
    if events["event_timestamp"].isna().any():
        raise click.BadParameter(f"{path}: {int(events['event_timestamp'].isna().sum())} events have no "
                                 "event_timestamp", param_hint="--from")
    return events


def _generated_events(n: int, day: dt.datetime | None, seed: int):
    """The first `n` synthetic transactions of `day` (and the days after it when one is not enough),
    from the demo's population (SyntheticDefaults), so their card holders and merchants are known."""
    import pandas as pd

    from ml_platform.sources.generator import GeneratorConfig, generate_day

    first = day.date() if day else dt.datetime.now(dt.UTC).date()
    config = GeneratorConfig(seed=seed, start=first, days=1)
    frames, rows = [], 0
    current = first
    while rows < n:
        frame = generate_day(config, current)
        frames.append(frame)
        rows += len(frame)
        current += dt.timedelta(days=1)
    events = pd.concat(frames, ignore_index=True).head(n)
    # New ids on every publish: the worker treats a known id as a replay (scored once).
    token = uuid.uuid4().hex[:8]
    events["transaction_id"] = f"pub-{token}-" + events["transaction_id"].astype(str)
    return events


@main.command(short_help="Monitor one day and print its dashboard.")
@click.option("--date", "day", type=click.DateTime(formats=["%Y-%m-%d"]), required=True,
              help="The day (partition) to monitor, YYYY-MM-DD.")
@click.option("--details", is_flag=True, help="Add each row's detail column.")
@click.option("--fail-on-alert", is_flag=True, help="Exit with status 2 when any monitor alerts (for scripts).")
def monitor(day: dt.datetime, details: bool, fail_on_alert: bool) -> None:
    """Materialize label_feed, data_drift, prediction_drift, model_performance, serving_health and
    monitoring_dashboard for DATE through Dagster (the run shows in the UI), then print the table."""
    settings = load_settings()
    prepare_dagster_home(settings)
    from ml_platform.defs.pipeline import run_monitoring
    from ml_platform.monitoring.dashboard import MONITORS

    date = day.date()
    outcome = run_monitoring(settings, date)
    # Only what this run materialized: a failed monitor's older result would be stale.
    board = _print_dashboard(settings, date, [m for m in MONITORS if m in outcome.metadata], details)
    if not outcome.success:
        click.echo(f"\nThe monitoring run failed: {outcome.failure} (run {outcome.run_id})", err=True)
        sys.exit(1)
    if fail_on_alert and board.status == "alert":
        sys.exit(2)


@main.command(short_help="Move `champion` back to the previous champion.")
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


@main.command(short_help="Serve the Dagster web UI (dagster dev).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=DEFAULT_UI_PORT, show_default=True)
def ui(host: str, port: int) -> None:
    """Serve the Dagster web UI for this platform (dagster dev, DAGSTER_HOME under data/)."""
    settings = load_settings()
    prepare_dagster_home(settings)
    workspace = REPO_ROOT / "workspace.yaml"
    args = [sys.executable, "-m", "dagster", "dev", "-w", str(workspace), "-h", host, "-p", str(port)]
    click.echo(f"DAGSTER_HOME={settings.dagster_home} {' '.join(args)}")
    os.chdir(REPO_ROOT)
    os.execv(args[0], args)


def _register_groups() -> None:
    from ml_platform.experiment_cli import experiment, rollout
    from ml_platform.services_cli import celery_worker, mlflow_server, services

    main.add_command(experiment)
    main.add_command(rollout)
    main.add_command(services)
    main.add_command(mlflow_server)
    main.add_command(celery_worker)


_register_groups()

if __name__ == "__main__":
    main()
