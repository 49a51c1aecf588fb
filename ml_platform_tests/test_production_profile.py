"""The production profile (ML_PLATFORM_PROFILE=production) on the machine's real servers: the
Dagster instance in PostgreSQL (dagster-postgres), an MLflow tracking server on PostgreSQL reached
over HTTP, Redis with an ACL user that may touch only the platform's key prefix. The whole demo
(training, batch scoring, monitoring) runs in it as a user would run it, and afterwards no log,
file or database row the platform wrote holds a password."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fixtures_platform import TEST_REDIS_URL
from production_services import dump_database, production_tenant

from ml_platform.dagster_home import EMBEDDED_YAML, HEADER, write_dagster_home
from ml_platform.settings import load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_production_settings_name_every_missing_server():
    with pytest.raises(ValueError) as err:
        load_settings({"ML_PLATFORM_PROFILE": "production", "REDIS_URL": "redis://u:hunter2@cache:6379/0"})
    message = str(err.value)
    assert "ML_PLATFORM_DAGSTER_POSTGRES_URL" in message and "MLFLOW_TRACKING_URI" in message
    assert "REDIS_URL (" not in message  # it was given
    assert "hunter2" not in message  # the error does not print the environment it was given
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI must be http\(s\)://host:port, got 'sqlite://") as err:
        load_settings({"ML_PLATFORM_PROFILE": "production", "REDIS_URL": "redis://h:1/0",
                       "ML_PLATFORM_DAGSTER_POSTGRES_URL": "postgresql://a:pw9@h/db",
                       "MLFLOW_TRACKING_URI": "sqlite:///tmp/m.db"})
    assert "pw9" not in str(err.value)
    with pytest.raises(ValueError, match="must be a postgresql:// URL, got 'mysql://a:\\*\\*\\*@h/db'"):
        load_settings({"ML_PLATFORM_DAGSTER_POSTGRES_URL": "mysql://a:pw9@h/db"})
    # dagster-postgres needs psycopg2 (SQLAlchemy 2.1 opens plain postgresql:// with psycopg 3)
    for given in ("postgresql://a:pw@h:5/db", "postgres://a:pw@h:5/db", "postgresql+psycopg2://a:pw@h:5/db"):
        url = load_settings({"ML_PLATFORM_DAGSTER_POSTGRES_URL": given}).dagster_postgres_url
        assert url == "postgresql+psycopg2://a:pw@h:5/db"


def test_dagster_yaml_follows_the_profile_and_keeps_a_users_own(tmp_path):
    env = {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path / "home")}
    cfg = tmp_path / "home" / "dagster.yaml"
    write_dagster_home(load_settings(env))
    assert cfg.read_text() == EMBEDDED_YAML
    secret = "pg-secret-in-env-only"
    write_dagster_home(load_settings({**env, "ML_PLATFORM_DAGSTER_POSTGRES_URL": f"postgresql://u:{secret}@db:5432/dagster"}))
    text = cfg.read_text()
    assert "postgres_url:\n      env: ML_PLATFORM_DAGSTER_POSTGRES_URL" in text and secret not in text
    write_dagster_home(load_settings(env))  # back to embedded: the platform's own file follows
    assert cfg.read_text() == EMBEDDED_YAML
    cfg.write_text("# mine\nstorage:\n  sqlite:\n    base_dir: /elsewhere\n")
    write_dagster_home(load_settings(env))
    assert cfg.read_text().startswith("# mine") and not cfg.read_text().startswith(HEADER)


def test_a_password_url_reaches_dagster_as_an_env_reference_not_as_its_value(monkeypatch, tmp_path):
    """Resource values are stored in the job snapshot (the instance's database, the launchpad): a
    URL with a password must be stored as the name of its variable."""
    from dagster._serdes import serialize_value

    from ml_platform.defs.pipeline import build_definitions

    url = "redis://user:s3cr3t-pw@127.0.0.1:6379/0"
    tracking = "postgresql://ml:tr4ck-pw@db:5432/mlflow"
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    settings = load_settings({"ML_PLATFORM_DATA_DIR": str(tmp_path), "REDIS_URL": url, "MLFLOW_TRACKING_URI": tracking})
    defs = build_definitions(settings)
    snapshot = serialize_value(defs.resolve_job_def("training_pipeline").get_job_snapshot())
    assert "s3cr3t-pw" not in snapshot and "tr4ck-pw" not in snapshot
    # the resources' config defaults, stored as references to the variables
    assert '{\\"env\\": \\"REDIS_URL\\"}' in snapshot and '{\\"env\\": \\"MLFLOW_TRACKING_URI\\"}' in snapshot
    monkeypatch.setenv("REDIS_URL", "redis://other:1/0")  # the value is not the variable's: refuse
    with pytest.raises(ValueError, match=r"carries a password but is not the value of REDIS_URL") as err:
        build_definitions(settings)
    assert "s3cr3t-pw" not in str(err.value)


@pytest.fixture()
def tenant(mlflow_tracking_server):
    admin = redis.Redis.from_url(TEST_REDIS_URL)
    with production_tenant(admin, mlflow_tracking_server.url) as t:
        yield t
    admin.close()


def files_text(root: Path) -> dict[Path, str]:
    """Every file under `root` as text (binary bytes decoded leniently: a password is ASCII)."""
    return {p: p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_the_demo_runs_in_the_production_profile_and_no_log_holds_a_secret(tenant, mlflow_tracking_server, tmp_path):
    data_dir, home = tmp_path / "data", tmp_path / "dagster_home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ML_PLATFORM_", "MLFLOW_", "REDIS_URL", "DAGSTER_"))}
    env.update(tenant.env(data_dir, home), OMP_NUM_THREADS="1")
    demo = subprocess.run(
        [sys.executable, "-m", "ml_platform.cli", "demo", "--days", "24", "--users", "400", "--merchants", "120",
         "--fraud-rate", "0.03"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900, check=False,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-5000:]

    # Dagster's runs are in the tenant's PostgreSQL database, not in SQLite files under the home.
    import dagster as dg
    from dagster._serdes import serialize_value

    from ml_platform.dagster_home import open_instance
    from ml_platform.registry import ModelRegistry

    settings = load_settings(tenant.env(data_dir, home))
    instance = open_instance(settings)
    stored = []  # what the instance keeps of each run, decoded (snapshots are zlib-compressed in the dump)
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()
        jobs = {r.job_name for r in runs}
        assert {"training_pipeline", "daily_scoring", "daily_monitoring"} <= jobs
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs)
        for run in runs:
            stored += [serialize_value(run), serialize_value(instance.get_job_snapshot(run.job_snapshot_id)),
                       serialize_value(instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)),
                       *(serialize_value(e) for e in instance.all_logs(run.run_id))]
    finally:
        instance.dispose()
    assert not list(home.rglob("*.db")), "a SQLite store was written under DAGSTER_HOME"
    # The model is on the tracking server (HTTP), its artifacts under the server's root.
    champion = ModelRegistry(tenant.mlflow_url, tenant.model_name).champion()
    assert champion is not None
    assert any((mlflow_tracking_server.root / "artifacts").rglob("model.skops"))
    assert not (data_dir / "mlflow" / "mlflow.db").exists()
    # The online store is in Redis under the tenant's prefix (the ACL user can reach nothing else).
    admin = redis.Redis.from_url(TEST_REDIS_URL)
    assert any(admin.scan_iter(match=f"{tenant.project}:*", count=1000))
    admin.close()

    # No secret anywhere the platform wrote: its output, every file under the data dir and the
    # Dagster home (compute logs, event logs, reports), the Dagster and MLflow databases (event
    # log, run config and job snapshots, MLflow params, tags and metrics), the MLflow server's log.
    places = {"demo stdout": demo.stdout, "demo stderr": demo.stderr,
              "dagster database": dump_database(tenant.project),
              "dagster runs, snapshots and events": "\n".join(stored),
              "mlflow database": dump_database(mlflow_tracking_server.database),
              "mlflow server log": mlflow_tracking_server.log_path.read_text()}
    places.update({str(p): t for p, t in files_text(data_dir).items()})
    places.update({str(p): t for p, t in files_text(home).items()})
    places.update({str(p): t for p, t in files_text(mlflow_tracking_server.root / "artifacts").items()})
    assert len(places) > 50 and any("compute_logs" in k or "storage" in k for k in places), sorted(places)[:20]
    assert "training_pipeline" in places["dagster database"]  # the dump is the real event log
    secrets = settings.secrets()  # what the settings say must never be written anywhere
    assert len(secrets) == 2 and all(len(x) > 16 for x in secrets)  # the Redis and the PostgreSQL passwords
    for secret in secrets:
        leaks = [where for where, text in places.items() if secret in text]
        assert not leaks, f"a password was written to {leaks}"
    assert '{\\"env\\": \\"REDIS_URL\\"}' in places["dagster runs, snapshots and events"]  # the snapshots are read
