"""Shared fixtures: every test gets its own data directory, MLflow store and Dagster home."""

from __future__ import annotations

import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*noload.*")


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    """Settings pointing at a fresh temp data dir (and a SQLite MLflow store inside it)."""
    from ml_platform.settings import load_settings

    env = {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    s = load_settings(dict(os.environ))
    s.ensure_dirs()
    return s
