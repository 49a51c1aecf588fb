"""PostgreSQL (the Dagster instance's storage) stopped in the middle of a run and started again,
with real processes: the run fails and says why (the database), no table it was writing is left
half written, and the same run again succeeds on the restarted server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
from fixtures_platform import TEST_REDIS_URL, delete_project_keys
from private_postgres import PrivatePostgres

pytestmark = pytest.mark.slow

RUN = """
import datetime as dt, json, sys
from ml_platform.dagster_home import prepare_dagster_home
from ml_platform.defs.pipeline import run_training_pipeline
from ml_platform.settings import load_settings
settings = load_settings()
prepare_dagster_home(settings)
end = dt.date.today() - dt.timedelta(days=1)
out = run_training_pipeline(settings, end - dt.timedelta(days=23), end,
                            event_source={"seed": 5, "n_users": 300, "n_merchants": 110, "fraud_rate": 0.03})
print(json.dumps({"success": out.success, "run_id": out.run_id, "failure": out.failure}))
"""


def every_table_reads_whole(data_dir: Path) -> list[str]:
    """The Parquet tables under data/ that the platform publishes; each must read whole."""
    tables = [p for p in data_dir.rglob("*.parquet") if not any(part.startswith(".") for part in p.parts)]
    for path in tables:
        pq.read_table(path)  # raises on a truncated or half-written file
    return [str(p.relative_to(data_dir)) for p in tables]


def test_postgres_stopped_during_a_run_fails_it_clearly_and_a_retry_succeeds(tmp_path):
    pg = PrivatePostgres().init()
    project = f"test_pgrestart_{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL", "DAGSTER_"))}
    env.update(ML_PLATFORM_DATA_DIR=str(tmp_path / "data"), DAGSTER_HOME=str(tmp_path / "home"),
               ML_PLATFORM_DAGSTER_POSTGRES_URL=pg.url, REDIS_URL=TEST_REDIS_URL, ML_PLATFORM_PROJECT=project,
               OMP_NUM_THREADS="1")
    try:
        with open(tmp_path / "run1.log", "w") as log:
            run = subprocess.Popen([sys.executable, "-c", RUN], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
            offline = tmp_path / "data" / "offline"
            deadline = time.monotonic() + 300
            while not list(offline.glob("*.parquet")):  # the run is past ingestion, into the features
                assert run.poll() is None, (tmp_path / "run1.log").read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.05)
            pg.stop()
            out, _ = run.communicate(timeout=300)
        pg.start()
        failed = (tmp_path / "run1.log").read_text()
        # It fails, and the failure names the database: an exit status or a failed outcome.
        ended = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
        assert run.returncode != 0 or (ended is not None and not ended["success"]), out
        assert "OperationalError" in failed or "connection" in failed.lower(), failed[-3000:]
        assert f"127.0.0.1:{pg.port}" in failed or "port " + str(pg.port) in failed or "postgres" in failed.lower()
        assert every_table_reads_whole(tmp_path / "data")  # nothing half written

        retry = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=600,
                               check=False)
        assert retry.returncode == 0, retry.stderr[-3000:]
        result = json.loads(retry.stdout.strip().splitlines()[-1])
        assert result["success"], result
        tables = every_table_reads_whole(tmp_path / "data")
        assert any(t.startswith("training") for t in tables)
        from ml_platform.training.pipeline import load_training_set

        frame, _ = load_training_set(tmp_path / "data")
        assert isinstance(frame, pd.DataFrame) and len(frame) > 1000
    finally:
        pg.destroy()
        client = redis.Redis.from_url(TEST_REDIS_URL)
        delete_project_keys(client, project)
        client.close()
