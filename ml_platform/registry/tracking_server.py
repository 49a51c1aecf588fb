"""The MLflow tracking server of the production profile: `mlflow server` with its backend store in
PostgreSQL and a configurable artifact root, which clients reach over HTTP only (the server
proxies artifact uploads and downloads: `--artifacts-destination`, so no client needs the
artifact store's credentials).

`server_command` is the one place the command line is built: `ml-platform mlflow-server` runs it,
the production-profile tests start their server with it. The backend store URI (with its
password) goes to the server in its environment (MLFLOW_BACKEND_STORE_URI), not on its command
line, where `ps` would show it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ml_platform.redaction import redact_url

DEFAULT_PORT = 5000
# MLflow 3's server also starts a job runner (Huey consumers, for its GenAI evaluation jobs); the
# platform uses none of them.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True)
class ServerCommand:
    argv: list[str]
    env: dict[str, str]  # to add to the environment the server starts in

    def describe(self) -> str:
        """The command as it may be printed (the backend URI redacted)."""
        uri = self.env.get("MLFLOW_BACKEND_STORE_URI")
        return f"MLFLOW_BACKEND_STORE_URI={redact_url(uri)!r} " + " ".join(self.argv) if uri else " ".join(self.argv)


def server_command(
    backend_store_uri: str,
    artifact_root: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    workers: int = 1,
    mlflow_executable: str = "mlflow",
) -> ServerCommand:
    """`mlflow server` on `backend_store_uri` (postgresql://... in production; any SQLAlchemy URI)
    keeping artifacts under `artifact_root` (a directory, s3://..., gs://...), listening on host:port."""
    if not backend_store_uri:
        raise ValueError("ML_PLATFORM_MLFLOW_BACKEND_STORE_URI is not set (e.g. postgresql://user:pw@host:5432/mlflow)")
    if not str(artifact_root):
        raise ValueError("ML_PLATFORM_MLFLOW_ARTIFACT_ROOT is not set (a directory, s3://bucket/path, ...)")
    root = str(artifact_root)
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    argv = [
        mlflow_executable, "server",
        "--host", host, "--port", str(int(port)),
        "--workers", str(int(workers)),
        "--artifacts-destination", root,
        "--serve-artifacts",
    ]
    if host not in ("127.0.0.1", "localhost", "::1"):
        argv += ["--allowed-hosts", "*"]  # behind a load balancer the Host header is the service's name
    return ServerCommand(argv=argv, env={**SERVER_ENV, "MLFLOW_BACKEND_STORE_URI": backend_store_uri})
