"""Every setting of the platform, read from the environment with embedded defaults.

Defaults keep everything on this machine under one data directory, so a fresh clone runs with
no server: DuckDB/Parquet files, the MLflow SQLite store and DAGSTER_HOME all live in `data/`.
Point at real services with env vars: REDIS_URL, MLFLOW_TRACKING_URI, ML_PLATFORM_DATA_DIR.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    return _REPO_ROOT / "data"


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    dagster_home: Path
    mlflow_tracking_uri: str
    redis_url: str | None
    model_name: str = "fraud_detector"
    project: str = "ml_platform"
    # Promotion: a challenger replaces the champion only if its PR AUC on the same held-out
    # data beats the champion's by at least this much.
    promotion_metric: str = "pr_auc"
    promotion_margin: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"

    @property
    def duckdb_path(self) -> Path:
        return self.data_dir / "warehouse.duckdb"

    @property
    def mlflow_dir(self) -> Path:
        return self.data_dir / "mlflow"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.dagster_home, self.raw_dir, self.offline_dir, self.mlflow_dir):
            d.mkdir(parents=True, exist_ok=True)


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build settings from `env` (default: os.environ)."""
    env = dict(os.environ if env is None else env)
    data_dir = Path(env.get("ML_PLATFORM_DATA_DIR") or _default_data_dir()).expanduser().resolve()
    dagster_home = Path(env.get("DAGSTER_HOME") or data_dir / "dagster_home").expanduser().resolve()
    mlflow_dir = data_dir / "mlflow"
    tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{mlflow_dir / 'mlflow.db'}"
    margin = env.get("ML_PLATFORM_PROMOTION_MARGIN")
    return Settings(
        data_dir=data_dir,
        dagster_home=dagster_home,
        mlflow_tracking_uri=tracking,
        redis_url=env.get("REDIS_URL") or None,
        model_name=env.get("ML_PLATFORM_MODEL_NAME") or "fraud_detector",
        project=env.get("ML_PLATFORM_PROJECT") or "ml_platform",
        promotion_margin=float(margin) if margin else 0.0,
    )
