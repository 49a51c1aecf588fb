"""What a registered version records about where it came from: code version, pinned requirements,
flattened params/metrics, and where to see it in MLflow's UI."""

from __future__ import annotations

import getpass
import importlib.metadata
import numbers
import os
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ml_platform.redaction import redact_url

MODEL_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "pandas", "scipy")
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def current_code_version() -> str:
    """The git commit of the code (with `-dirty` if it has local changes), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"ml_platform=={importlib.metadata.version('ml_platform')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_pip_requirements() -> list[str]:
    """Exactly what loading the model needs, pinned to this environment (never inferred)."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in MODEL_REQUIREMENTS]


def default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no user name in some containers
        return os.environ.get("USER") or "unknown"


def json_default(value: Any) -> Any:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"test": {"pr_auc": 0.4}} -> {"test_pr_auc": 0.4}; lists are skipped."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_scalars(value, f"{name}_"))
        elif not isinstance(value, (list, tuple)):
            out[name] = value
    return out


# --- MLflow UI routes (the UI is a single-page app: routes follow the '#') -----------------------
def model_ui_path(model_name: str, version: int) -> str:
    return f"#/models/{model_name}/versions/{int(version)}"


def run_ui_path(experiment_id: str, run_id: str) -> str:
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def ui_url(tracking_uri: str, path: str) -> str | None:
    """`path` under the tracking server's UI when the tracking URI is http(s) (the server serves
    its UI at the same address); None for a local store (file, SQLite, database): no UI to link."""
    if urlsplit(tracking_uri).scheme not in ("http", "https"):
        return None
    return f"{redact_url(tracking_uri).rstrip('/')}/{path}"
