"""Dagster steps on an existing distributed executor: `training_pipeline` and `daily_scoring`
with dagster-celery over the machine's RabbitMQ (127.0.0.1:5672, a vhost of the test's own) and two
`ml-platform celery-worker` processes, the instance in a PostgreSQL database of the test's own.
The steps really run in the workers (their pids, recorded by Dagster in each step's events, are
the workers' and not the run's), and every result equals the same runs in one process."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import redis
from fixtures_platform import TEST_REDIS_URL, delete_project_keys
from production_services import create_database, drop_database

pytestmark = pytest.mark.slow

SOURCE = {"seed": 5, "n_users": 300, "n_merchants": 110, "fraud_rate": 0.03}
DAYS = 24
END = dt.date.today() - dt.timedelta(days=1)

RUN = """
import datetime as dt, json, os, sys
from ml_platform.dagster_home import prepare_dagster_home
from ml_platform.defs.pipeline import run_daily_job, run_training_pipeline
from ml_platform.settings import load_settings
settings = load_settings()
prepare_dagster_home(settings)
end = dt.date.fromisoformat(sys.argv[1])
source = json.loads(sys.argv[3])
train = run_training_pipeline(settings, end - dt.timedelta(days=int(sys.argv[2]) - 1), end, event_source=source)
score = run_daily_job(settings, "daily_scoring", end, source) if train.success else None
print(json.dumps({"pid": os.getpid(), "runs": [[o.success, o.run_id, o.failure] for o in (train, score) if o]}))
"""


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def platform_env(root: Path, project: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL", "DAGSTER_"))
    }
    env.update(
        ML_PLATFORM_DATA_DIR=str(root / "data"),
        DAGSTER_HOME=str(root / "home"),
        REDIS_URL=TEST_REDIS_URL,
        ML_PLATFORM_PROJECT=project,
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def start_jobs(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """The training pipeline, then the daily scoring, in a process of their own (see `RUN`)."""
    return subprocess.Popen(
        [sys.executable, "-c", RUN, END.isoformat(), str(DAYS), json.dumps(SOURCE)],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_jobs(proc: subprocess.Popen) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert [ok for ok, _, _ in result["runs"]] == [True, True], result["runs"]
    return result


def step_pids(env: dict[str, str], run_id: str) -> dict[str, int]:
    """step key -> the pid Dagster recorded in its STEP_START event."""
    import dagster as dg

    from ml_platform.dagster_home import open_instance
    from ml_platform.settings import load_settings

    instance = open_instance(load_settings(env))
    try:
        records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_START).records
        return {r.event_log_entry.step_key: r.event_log_entry.dagster_event.pid for r in records}
    finally:
        instance.dispose()


def results(root: Path) -> dict[str, pd.DataFrame]:
    """What the runs produced: the offline feature tables, the training set, the day's predictions."""
    from ml_platform.serving.predictions_db import read_predictions
    from ml_platform.training.pipeline import load_training_set

    data = root / "data"
    out = {
        str(p.relative_to(data)): pd.read_parquet(p) for p in sorted((data / "offline").rglob("*.parquet"))
    }
    out["training_set"] = load_training_set(data)[0]
    predictions = read_predictions(
        data / "predictions.duckdb", END, columns=["transaction_id", "score", "decision", "model_version"]
    )
    out["predictions"] = predictions.sort_values("transaction_id").reset_index(drop=True)
    return out


@pytest.fixture()
def celery_platform(tmp_path):
    """Two Celery workers on a vhost of their own, the instance in a database of its own."""
    vhost, database, project = (
        f"mlp-{uuid.uuid4().hex[:8]}",
        f"mlp_celery_{uuid.uuid4().hex[:8]}",
        f"test_celery_{uuid.uuid4().hex[:8]}",
    )
    rabbitmqctl("add_vhost", vhost)
    workers: list[subprocess.Popen] = []
    try:
        rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        root = tmp_path / "celery"
        env = platform_env(root, project)
        env.update(
            ML_PLATFORM_EXECUTOR="celery",
            ML_PLATFORM_DAGSTER_POSTGRES_URL=create_database(database),
            ML_PLATFORM_CELERY_BROKER_URL=f"pyamqp://guest:guest@127.0.0.1:5672/{vhost}",
        )
        for i in range(2):
            log = open(tmp_path / f"worker{i}.log", "w")  # noqa: SIM115
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "ml_platform.cli", "celery-worker", "--name", f"w{i}"],
                    env=env,
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 90
        while not all("ready." in (tmp_path / f"worker{i}.log").read_text() for i in range(2)):
            assert time.monotonic() < deadline, (tmp_path / "worker0.log").read_text()[-3000:]
            assert all(w.poll() is None for w in workers), (tmp_path / "worker0.log").read_text()[-3000:]
            time.sleep(0.5)
        yield root, env, [w.pid for w in workers]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
        rabbitmqctl("delete_vhost", vhost)
        drop_database(database)
        client = redis.Redis.from_url(TEST_REDIS_URL)
        delete_project_keys(client, project)
        client.close()


def test_training_and_daily_jobs_run_on_two_celery_workers_with_the_in_process_results(
    celery_platform, tmp_path
):
    root, env, worker_pids = celery_platform
    local_root = tmp_path / "local"
    local_project = f"test_local_{uuid.uuid4().hex[:8]}"
    local = start_jobs(platform_env(local_root, local_project), tmp_path)
    try:  # the in-process reference runs side by side with the Celery ones (the suite's time)
        celery = finish_jobs(start_jobs(env, tmp_path))
        finish_jobs(local)
    finally:
        local.kill()
        local.wait(30)
        client = redis.Redis.from_url(TEST_REDIS_URL)
        delete_project_keys(client, local_project)
        client.close()

    pids_by_run = [step_pids(env, run_id) for _, run_id, _ in celery["runs"]]
    for pids in pids_by_run:
        assert len(pids) >= 5, pids
        assert set(pids.values()) <= set(worker_pids), (pids, worker_pids)  # every step on a worker
        assert celery["pid"] not in pids.values()  # none in the process that launched the run
    assert len({pid for pids in pids_by_run for pid in pids.values()}) == 2  # both workers took steps

    ours, theirs = results(local_root), results(root)
    assert set(ours) == set(theirs) and len(ours) >= 5
    for name, frame in ours.items():
        assert len(frame) > 0, name
        # the same rows and values; a table's row order is not part of the result (DuckDB's windows
        # run on 2 threads)
        by_all = list(frame.columns)
        pd.testing.assert_frame_equal(
            frame.sort_values(by_all).reset_index(drop=True),
            theirs[name][by_all].sort_values(by_all).reset_index(drop=True),
            obj=name,
        )
