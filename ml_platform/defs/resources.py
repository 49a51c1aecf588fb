"""Dagster resources: thin, configurable handles on the domain library.

Each resource holds only settings; the work is done by the plain-Python objects it returns.
Defaults come from `ml_platform.settings`, so the same definitions run on embedded defaults or
against real servers (set MLFLOW_TRACKING_URI, REDIS_URL, ML_PLATFORM_DATA_DIR).
"""


import datetime as dt
from pathlib import Path

import dagster as dg

from ml_platform.settings import load_settings


class FeatureStoreResource(dg.ConfigurableResource):
    """The offline feature store (DuckDB over Parquet) rooted at the data directory."""

    repo_path: str
    duckdb_threads: int | None = None
    duckdb_memory_limit: str | None = None
    redis_url: str | None = None  # None: REDIS_URL, else the embedded redis-server under repo_path
    project: str = "ml_platform"  # key prefix of the online store

    def store(self):
        from ml_platform.features import ENTITIES, FEATURE_VIEWS
        from ml_platform.featurestore import FeatureStore

        store = FeatureStore(
            self.repo_path,
            duckdb_threads=self.duckdb_threads,
            duckdb_memory_limit=self.duckdb_memory_limit,
            redis_url=self.redis_url,
            project=self.project,
        )
        store.apply([*ENTITIES, *FEATURE_VIEWS])
        return store

    def redis_client(self):
        """A Redis client on the online store's server (redis_url, REDIS_URL, else the embedded one)."""
        from ml_platform.featurestore.redis_server import EmbeddedRedis, client_from_url
        from ml_platform.settings import load_settings

        return client_from_url(self.redis_url or load_settings().redis_url or EmbeddedRedis(self.repo_path).start())

    @property
    def data_dir(self) -> Path:
        return Path(self.repo_path)


class MLflowRegistryResource(dg.ConfigurableResource):
    """The MLflow tracking server / model registry, by URI (SQLite under data/ by default)."""

    tracking_uri: str
    model_name: str = "fraud_detector"
    promotion_metric: str = "pr_auc"
    promotion_margin: float = 0.0

    def registry(self):
        from ml_platform.registry import ModelRegistry

        return ModelRegistry(self.tracking_uri, self.model_name)


class EventSourceResource(dg.ConfigurableResource):
    """Where raw transaction events come from: the synthetic generator or the user's own files.

    kind="synthetic": generated from `seed` (optionally with a drift scenario from `drift_start`);
    kind="files": imported from `import_path` (a Parquet/CSV file or directory with the raw columns).
    """

    kind: str = "synthetic"
    seed: int = 7
    n_users: int = 5000
    n_merchants: int = 500
    txns_per_user_per_day: float = 0.6
    drift_start: str | None = None
    import_path: str | None = None

    def generator_config(self, start: dt.date, days: int, as_of: dt.datetime | None = None):
        from ml_platform.sources.generator import DriftScenario, GeneratorConfig

        drift = DriftScenario(start_date=dt.date.fromisoformat(self.drift_start)) if self.drift_start else None
        return GeneratorConfig(
            seed=self.seed,
            n_users=self.n_users,
            n_merchants=self.n_merchants,
            txns_per_user_per_day=self.txns_per_user_per_day,
            start=start,
            days=days,
            as_of=as_of,
            drift=drift,
        )


def default_resources(settings=None, **source_overrides) -> dict:
    """Resources built from settings (env vars with embedded defaults)."""
    settings = settings or load_settings()
    return {
        "feature_store": FeatureStoreResource(
            repo_path=str(settings.data_dir), redis_url=settings.redis_url, project=settings.project
        ),
        "mlflow": MLflowRegistryResource(
            tracking_uri=settings.mlflow_tracking_uri,
            model_name=settings.model_name,
            promotion_metric=settings.promotion_metric,
            promotion_margin=settings.promotion_margin,
        ),
        "event_source": EventSourceResource(**source_overrides),
    }
