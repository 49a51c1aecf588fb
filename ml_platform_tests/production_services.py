"""The production profile's servers for tests, on the machine's own services: PostgreSQL
(127.0.0.1:5432, ML_PLATFORM_TEST_POSTGRES_URL), Redis (127.0.0.1:6379, conftest's TEST_REDIS_URL)
and an MLflow tracking server started here on a PostgreSQL backend.

Each user of the profile gets its own PostgreSQL role and database (with a password, so that a
leaked password can be searched for), its own Redis ACL user that may touch only its own key
prefix, and its own model name on the session's MLflow server; everything is dropped afterwards.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
import redis

from ml_platform.featurestore.redis_server import free_port
from ml_platform.registry.tracking_server import server_command

TEST_POSTGRES_URL = os.environ.get("ML_PLATFORM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# ML_PLATFORM_TEST_PROFILE=production: the integration tests run their platforms in this profile.
PRODUCTION = os.environ.get("ML_PLATFORM_TEST_PROFILE", "") == "production"


def _admin():
    conn = psycopg2.connect(TEST_POSTGRES_URL)
    conn.autocommit = True
    return conn


def _where(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def create_database(name: str) -> str:
    """A role `name` with a random password owning a new database `name`; its URL."""
    password = "pg-" + secrets.token_urlsafe(18)
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE ROLE "{name}" LOGIN PASSWORD %s', (password,))
        cur.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
    host, port = _where(TEST_POSTGRES_URL)
    return f"postgresql://{name}:{password}@{host}:{port}/{name}"


def drop_database(name: str) -> None:
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cur.execute(f'DROP ROLE IF EXISTS "{name}"')


def dump_database(name: str) -> str:
    """The database's whole content as SQL text (pg_dump), to search for leaked secrets."""
    host, port = _where(TEST_POSTGRES_URL)
    out = subprocess.run(["pg_dump", "-h", host, "-p", str(port), "-U", "postgres", "--data-only", name],
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout


def create_acl_user(admin: redis.Redis, project: str) -> str:
    """A Redis ACL user that may use only keys and channels starting with `project` (the platform's
    `project:` prefix, and the sibling projects `project-...` some tests make), no admin commands;
    its URL."""
    password = "rd-" + secrets.token_urlsafe(18)
    admin.execute_command("ACL", "SETUSER", project, "reset", "on", f">{password}", f"~{project}*",
                          f"&{project}*", "+@all", "-@admin")
    kwargs = admin.connection_pool.connection_kwargs
    return f"redis://{project}:{password}@{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def delete_acl_user(admin: redis.Redis, project: str) -> None:
    admin.execute_command("ACL", "DELUSER", project)


@dataclass
class TrackingServer:
    """`ml-platform mlflow-server`'s command (registry.tracking_server) on its own database."""

    root: Path
    database: str = field(default_factory=lambda: f"mlp_mlflow_{uuid.uuid4().hex[:10]}")
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    backend_url: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / "mlflow-server.log"

    def start(self, timeout: float = 180.0) -> TrackingServer:
        import httpx

        self.root.mkdir(parents=True, exist_ok=True)
        self.backend_url = create_database(self.database)
        mlflow = str(Path(sys.executable).parent / "mlflow")
        cmd = server_command(self.backend_url, self.root / "artifacts", port=self.port, mlflow_executable=mlflow)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd.argv, env={**os.environ, **cmd.env}, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        drop_database(self.database)


@dataclass
class ProductionTenant:
    """One user of the profile: its database, ACL user, key prefix and model name."""

    project: str
    dagster_postgres_url: str
    redis_url: str
    mlflow_url: str
    model_name: str

    def env(self, data_dir: Path, dagster_home: Path) -> dict[str, str]:
        """The environment of a platform process in the production profile (README, "Production")."""
        return {
            "ML_PLATFORM_PROFILE": "production",
            "ML_PLATFORM_DATA_DIR": str(data_dir),
            "DAGSTER_HOME": str(dagster_home),
            "ML_PLATFORM_DAGSTER_POSTGRES_URL": self.dagster_postgres_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "REDIS_URL": self.redis_url,
            "ML_PLATFORM_PROJECT": self.project,
            "ML_PLATFORM_MODEL_NAME": self.model_name,
        }


@contextlib.contextmanager
def production_tenant(admin: redis.Redis, mlflow_url: str, prefix: str = "mlp"):
    """A tenant (database, ACL user, prefix, model name), dropped with all its keys on exit."""
    project = f"{prefix}_{uuid.uuid4().hex[:10]}"
    db_url = create_database(project)
    try:
        redis_url = create_acl_user(admin, project)
        try:
            yield ProductionTenant(project, db_url, redis_url, mlflow_url, model_name=f"model_{project}")
        finally:
            delete_acl_user(admin, project)
            keys = list(admin.scan_iter(match=f"{project}:*", count=1000))
            for start in range(0, len(keys), 500):
                admin.unlink(*keys[start : start + 500])
    finally:
        drop_database(project)
