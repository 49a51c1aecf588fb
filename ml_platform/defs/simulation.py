"""Runs a scenario day by day through Dagster on a simulated clock (`ml-platform demo --scenario`).

Nothing here calls the domain functions: every step is what the Dagster daemon does in production,
on one persistent DagsterInstance (the scenario's own, under `<data_dir>/scenarios/<name>/`, so
`ml-platform ui` pointed there shows every run with its tags):

1. the initial champion: one `training_pipeline` run over the history before day 1;
2. each day D: `daily_scoring_schedule` is evaluated at its tick D+1 02:00 (the RunRequest it
   yields, for partition D, is launched with the daemon's tags); when that run succeeds,
   `monitor_after_scoring` is evaluated on its success event and its request, `daily_monitoring`
   for D, is launched; then `retrain_sensor` is evaluated with the cursor stored after its previous
   tick, and any `retrain` it requests is launched with its run_key (Dagster's dedup key: a key seen
   before is skipped, as the daemon does); after a retrain the sensor is evaluated once more (its
   next tick), which records the attempt's outcome in the cursor;
3. after the last day, `cost_reporting_schedule` ticks once (05:00), and for a scenario whose
   champion changed, a rollback drill: an API server (`ml-platform serve`) serves the champion,
   `ml-platform rollback` moves the alias back, and the time until the API serves the old
   champion is measured.

Runs execute in this process (`execute_in_process` on the instance, the way `ml-platform demo`
runs the pipeline) instead of through a run launcher, so a day costs its work and no process
start-ups. The sensor's cursor is kept in `<scenario>/retrain_sensor_cursor.json` between ticks,
and the instance is reopened every `reopen_every` days: a daemon restart in the middle of an
episode changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from ml_platform.dagster_home import open_instance
from ml_platform.defs import pipeline as p
from ml_platform.defs.sensors import RETRAIN_JOB, RUN_KEY_TAG, retrain_sensor
from ml_platform.monitoring.dashboard import MONITORS
from ml_platform.monitoring.results import load_result
from ml_platform.monitoring.retrain_policy import REASON_TAG
from ml_platform.monitoring.status import ALERT
from ml_platform.scenario import DayRecord, ScenarioPlan, ScenarioReport
from ml_platform.settings import Settings

SCHEDULE_HOUR = 2  # daily_scoring_schedule's tick: 02:00 UTC the day after the partition
COST_HOUR = 5  # cost_reporting_schedule's tick
SENSOR_TAG = "dagster/sensor_name"
SCHEDULE_TAG = "dagster/schedule_name"
CURSOR_FILE = "retrain_sensor_cursor.json"
REOPEN_EVERY = 10  # days between two reopenings of the Dagster instance (a daemon restart)


def scenario_settings(base: Settings, name: str) -> Settings:
    """The scenario's own platform: data, MLflow and Dagster home under <data_dir>/scenarios/<name>,
    a project (Redis key prefix) of its own; the same Redis server and model name as `base`."""
    data_dir = base.data_dir / "scenarios" / name
    return Settings(
        data_dir=data_dir,
        dagster_home=data_dir / "dagster_home",
        mlflow_tracking_uri=f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}",
        redis_url=base.redis_url,
        model_name=base.model_name,
        project=f"{base.project}-scenario-{name}",
        model_type=base.model_type,
        monitoring_config=base.monitoring_config,
        cost_config=base.cost_config,
    )


def scenario_env(settings: Settings) -> dict[str, str]:
    """Environment variables that point a CLI process (`ml-platform ui|serve|rollback`) at the scenario."""
    env = {
        "ML_PLATFORM_DATA_DIR": str(settings.data_dir),
        "DAGSTER_HOME": str(settings.dagster_home),
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "ML_PLATFORM_PROJECT": settings.project,
        "ML_PLATFORM_MODEL_NAME": settings.model_name,
    }
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    return env


def reset_scenario(settings: Settings) -> None:
    """Remove a previous run of the scenario (its embedded Redis server stopped first)."""
    from ml_platform.featurestore.redis_server import EmbeddedRedis

    if settings.data_dir.exists():
        EmbeddedRedis(settings.data_dir).stop()
        shutil.rmtree(settings.data_dir)


class Simulation:
    """One scenario on its own Dagster instance; `run()` returns the report."""

    def __init__(self, base: Settings, plan: ScenarioPlan, echo: Callable[[str], None] = print,
                 reopen_every: int = REOPEN_EVERY, rollback_drill: bool = True):
        self.plan = plan
        self.settings = scenario_settings(base, plan.name)
        self.reports_dir = base.reports_dir
        self.echo = echo
        self.reopen_every = reopen_every
        self.rollback_drill = rollback_drill
        self.defs = p.build_definitions(self.settings, plan.event_source())
        self.instance: dg.DagsterInstance | None = None
        self.report = ScenarioReport(plan, data_dir=str(self.settings.data_dir))

    # --- the instance and the sensor's stored cursor ------------------------------------------
    def _open(self) -> dg.DagsterInstance:
        if self.instance is not None:
            self.instance.dispose()
        self.instance = open_instance(self.settings)
        return self.instance

    @property
    def _cursor_path(self) -> Path:
        return self.settings.data_dir / CURSOR_FILE

    def _cursor(self) -> str | None:
        return self._cursor_path.read_text() if self._cursor_path.exists() else None

    def _store_cursor(self, cursor: str | None) -> None:
        from ml_platform.atomic_files import write_text_atomic

        if cursor is not None:
            write_text_atomic(self._cursor_path, cursor)

    # --- launching what a tick requested ------------------------------------------------------
    def _launch(self, job_name: str, request: dg.RunRequest, tags: dict[str, str]) -> p.PipelineOutcome | None:
        """Execute `request` of `job_name` as the daemon would launch it (None: its run_key ran before)."""
        run_tags = {**(request.tags or {}), **tags}
        if request.run_key:
            seen = self.instance.get_runs(dg.RunsFilter(job_name=job_name, tags={RUN_KEY_TAG: request.run_key}),
                                          limit=1)
            if seen:
                return None
            run_tags[RUN_KEY_TAG] = request.run_key
        job = self.defs.resolve_job_def(job_name)
        selected = {"partition_key": request.partition_key} if request.partition_key else {}
        result = job.execute_in_process(
            instance=self.instance,
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            tags=run_tags,
            raise_on_error=False,
            **selected,
        )
        return p._outcome(result, all_metadata=True, checks_fail=job_name != "daily_monitoring")

    def _tick_schedule(self, name: str, at: dt.datetime) -> list[p.PipelineOutcome]:
        schedule = self.defs.resolve_schedule_def(name)
        context = dg.build_schedule_context(instance=self.instance, scheduled_execution_time=at)
        data = schedule.evaluate_tick(context)
        outcomes = []
        for request in data.run_requests or []:
            outcome = self._launch(schedule.job_name, request, {SCHEDULE_TAG: schedule.name})
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    def _after_success(self, run_id: str) -> p.PipelineOutcome | None:
        """monitor_after_scoring evaluated on the success event of run `run_id`."""
        run = self.instance.get_run_by_id(run_id)
        events = self.instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
        if run is None or not events:
            return None
        context = dg.build_run_status_sensor_context(
            sensor_name=p.monitor_after_scoring.name, dagster_event=events[-1].dagster_event,
            dagster_instance=self.instance, dagster_run=run,
        )
        request = p.monitor_after_scoring(context)
        if not isinstance(request, dg.RunRequest):
            return None
        return self._launch("daily_monitoring", request, {SENSOR_TAG: p.monitor_after_scoring.name})

    def _tick_retrain_sensor(self) -> tuple[list[tuple[dg.RunRequest, p.PipelineOutcome]], str]:
        context = dg.build_sensor_context(
            instance=self.instance, cursor=self._cursor(), sensor_name=retrain_sensor.name,
            resources={name: self.defs.resources[name] for name in ("feature_store", "monitoring")},
        )
        data = retrain_sensor.evaluate_tick(context)
        self._store_cursor(data.cursor)
        launched = []
        for request in data.run_requests or []:
            outcome = self._launch(RETRAIN_JOB, request, {SENSOR_TAG: retrain_sensor.name})
            if outcome is not None:
                launched.append((request, outcome))
        return launched, data.skip_message or ""

    # --- the scenario ---------------------------------------------------------------------------
    def run(self) -> ScenarioReport:
        import logging

        plan, settings = self.plan, self.settings
        logging.getLogger("dagster").setLevel(logging.WARNING)  # the sensor's per-tick lines: in its cursor
        started = time.monotonic()
        reset_scenario(settings)
        self._open()
        self.echo(f"Scenario {plan.name}: the initial champion on {plan.history_start} .. {plan.history_end} "
                  f"({plan.history_days} days, {plan.n_users} users), then days 1-{plan.days} = "
                  f"{plan.first_day} .. {plan.end}" + (f", drift from day {plan.drift_day} ({plan.onset})"
                                                       if plan.onset else ", no drift"))
        outcome = p.run_training_pipeline(settings, plan.history_start, plan.history_end, plan.event_source(),
                                          instance=self.instance, log_level="WARNING")
        if not outcome.success:
            raise RuntimeError(f"the initial training run {outcome.run_id} failed: {outcome.failure}")
        self.report.initial_champion = self._champion()
        self.report.setup_seconds = time.monotonic() - started
        self.echo(f"Initial champion v{self.report.initial_champion} in {self.report.setup_seconds:.0f} s\n")
        self.echo(self.report.table().splitlines()[0])
        for number in range(1, plan.days + 1):
            if number > 1 and self.reopen_every and (number - 1) % self.reopen_every == 0:
                self._open()  # a daemon restart: only the instance and the stored cursor carry over
            record = self._day(number)
            self.report.days.append(record)
            self.echo(self.report.table().splitlines()[-1])
        last = plan.end + dt.timedelta(days=1)
        for cost in self._tick_schedule(p.cost_reporting_schedule.name, dt.datetime.combine(last, dt.time(COST_HOUR),
                                                                                         dt.UTC)):
            self.report.cost = {k: v for k, v in cost.metadata.get("cost_report", {}).items()
                                if isinstance(v, int | float | str) and not isinstance(v, bool)}
        if self.rollback_drill and self.report.days and self._champion() != self.report.initial_champion:
            self.report.rollback = rollback_drill(settings)
        self.report.save(self.reports_dir)
        self.instance.dispose()
        return self.report

    def _day(self, number: int) -> DayRecord:
        started = time.monotonic()
        day = self.plan.day(number)
        record = DayRecord(number=number, date=day.isoformat())
        tick = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(SCHEDULE_HOUR), dt.UTC)
        for scoring in self._tick_schedule(p.daily_scoring_schedule.name, tick):
            record.runs["daily_scoring"] = scoring.run_id
            if not scoring.success:
                raise RuntimeError(f"daily_scoring for {day} failed (run {scoring.run_id}): {scoring.failure}")
            monitoring = self._after_success(scoring.run_id)
            if monitoring is not None:
                record.runs["daily_monitoring"] = monitoring.run_id
                if not monitoring.success:
                    raise RuntimeError(f"daily_monitoring for {day} failed (run {monitoring.run_id}): "
                                       f"{monitoring.failure}")
        self._read_monitoring(record, day)
        launched, message = self._tick_retrain_sensor()
        record.sensor_message = message
        for request, outcome in launched:
            record.retrain_run_key = request.run_key
            record.retrain_reason = (request.tags or {}).get(REASON_TAG)
            record.retrain_run_id = outcome.run_id
            record.runs[RETRAIN_JOB] = outcome.run_id
            registered = outcome.metadata.get("registered_model", {})
            record.retrain_outcome = ("failed" if not outcome.success
                                      else "promoted" if registered.get("promoted") else "not_promoted")
            record.promotion = {k: registered.get(k) for k in (
                "version", "champion_version", "promoted", "reason", "compared_on", "promotion_metric",
                "challenger_metric", "champion_metric")}
            record.promotion["champion_before"] = record.monitored_version
        if launched:
            self._tick_retrain_sensor()  # the next tick records the attempt's outcome in the cursor
        record.champion_version = self._champion()
        record.seconds = time.monotonic() - started
        return record

    def _read_monitoring(self, record: DayRecord, day: dt.date) -> None:
        for monitor in MONITORS:
            result = load_result(self.settings.monitoring_dir, monitor, day)
            if result is None:
                continue
            record.statuses[monitor] = result.status
            if result.status == ALERT:
                record.alert_details[monitor] = "; ".join(
                    f"{r.metric} {r.value}" for r in result.rows if r.status == ALERT)[:500]
            if monitor == "model_performance":
                record.champion_pr_auc = result.metrics.get("window_pr_auc")
            if result.model_version is not None:
                record.monitored_version = result.model_version

    def _champion(self) -> int | None:
        return _champion_version(self.settings)


def rollback_drill(settings: Settings, timeout_s: float = 30.0) -> dict:
    """Serve the champion with `ml-platform serve`, run `ml-platform rollback`, and time how long
    the API takes to serve the previous champion (polling GET /model every 50 ms)."""
    import httpx

    from ml_platform.featurestore.redis_server import free_port

    env = {**os.environ, **scenario_env(settings), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cli = [sys.executable, "-m", "ml_platform.cli"]
    log = settings.data_dir / "rollback_drill_api.log"
    with open(log, "w") as out:
        server = subprocess.Popen([*cli, "serve", "--port", str(port), "--log-level", "warning"],
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        served = _wait_served(url, server, timeout_s)
        started = time.monotonic()
        done = subprocess.run([*cli, "rollback", "--reason", "scenario rollback drill", "--who", "scenario"],
                              check=False, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            return {"error": f"ml-platform rollback exited {done.returncode}: {done.stderr.strip()[-500:]}"}
        registry_champion = _champion_version(settings)
        rolled_at = time.monotonic()
        while time.monotonic() - rolled_at < timeout_s:
            now_serving = _serving_version(url)
            if now_serving == registry_champion:
                return {"from": served, "to": registry_champion, "served": now_serving,
                        "seconds": round(time.monotonic() - rolled_at, 3),
                        "command_seconds": round(rolled_at - started, 3), "output": done.stdout.strip()}
            time.sleep(0.05)
        return {"from": served, "to": registry_champion, "served": _serving_version(url), "seconds": None,
                "error": f"the API still served v{_serving_version(url)} after {timeout_s} s"}
    except (RuntimeError, TimeoutError, httpx.HTTPError) as exc:
        return {"error": f"{exc} (API log: {log})"}
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()


def _serving_version(url: str) -> int | None:
    import httpx

    serving = httpx.get(url + "/model", timeout=2.0).json().get("serving") or {}
    return serving.get("version")


def _wait_served(url: str, server: subprocess.Popen, timeout_s: float) -> int:
    import httpx

    deadline = time.monotonic() + max(timeout_s, 90.0)
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"ml-platform serve exited with {server.returncode}")
        try:
            version = _serving_version(url)
            if version is not None:
                return version
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("ml-platform serve did not serve a model in time")


def _champion_version(settings: Settings) -> int | None:
    from ml_platform.registry import ModelRegistry

    champion = ModelRegistry(settings.mlflow_tracking_uri, settings.model_name).champion()
    return None if champion is None else int(champion.version)


def run_scenario(base: Settings, plan: ScenarioPlan, echo: Callable[[str], None] = print, **options) -> ScenarioReport:
    return Simulation(base, plan, echo, **options).run()

