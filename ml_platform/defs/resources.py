"""Dagster resources: thin, configurable handles on the domain library.

Each resource holds only settings; the work is done by the plain-Python objects it returns.
Every default comes from `ml_platform.settings` (the platform-wide DEFAULT_* constants and
`SyntheticDefaults`), so the same definitions run on embedded defaults or against real servers
(set MLFLOW_TRACKING_URI, REDIS_URL, ML_PLATFORM_DATA_DIR).
"""

import datetime as dt
import functools
import os
from pathlib import Path
from types import SimpleNamespace

import dagster as dg

from ml_platform.redaction import has_secret, redact_url
from ml_platform.settings import (
    DEFAULT_MODEL_NAME,
    DEFAULT_PROJECT,
    DEFAULT_PROMOTION_MARGIN,
    DEFAULT_PROMOTION_METRIC,
    PREDICTIONS_DB_NAME,
    Settings,
    SyntheticDefaults,
    load_settings,
)

EVENT_SOURCE_KINDS = ("synthetic", "files")


class FeatureStoreResource(dg.ConfigurableResource):
    """The feature store rooted at the data directory: offline (DuckDB over Parquet) and online (Redis)."""

    repo_path: str
    duckdb_threads: int | None = None
    duckdb_memory_limit: str | None = None
    redis_url: str | None = None  # None: REDIS_URL, else the embedded redis-server under repo_path
    project: str = DEFAULT_PROJECT  # key prefix of the online store and the prediction log
    engine: str = "duckdb"  # what computes the offline tables: one of settings.OFFLINE_ENGINES
    batch_engine: str = "duckdb"  # what scores batch_predictions' days: one of settings.OFFLINE_ENGINES

    def offline_engine(self, spark=None):
        """The offline engine (`featurestore.spark_offline`); "spark" runs on `spark`'s session
        (the `spark` resource, dagster-pyspark's)."""
        from ml_platform.featurestore.spark_offline import offline_engine

        return offline_engine(self.engine, (lambda: spark.spark_session) if spark is not None else None)

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
        from ml_platform.featurestore.redis_server import client_from_url, resolve_redis_url

        where = SimpleNamespace(redis_url=self.redis_url or load_settings().redis_url, data_dir=self.data_dir)
        return client_from_url(resolve_redis_url(where))

    @property
    def data_dir(self) -> Path:
        return Path(self.repo_path)

    @property
    def raw_dir(self) -> Path:
        return self.paths.raw_dir

    @property
    def predictions_log_dir(self) -> Path:
        """Where the prediction log is drained to (Settings.predictions_log_dir of this data dir)."""
        return self.paths.predictions_log_dir

    @property
    def predictions_db(self) -> Path:
        """The DuckDB database batch scoring publishes to (`predictions` table)."""
        return self.data_dir / PREDICTIONS_DB_NAME

    @property
    def paths(self) -> Settings:
        """The layout under this data dir (Settings' raw_dir, predictions_log_dir, monitoring_dir,
        reports_dir, ...): only the path properties are meant to be read, so no environment is
        consulted (model_construct validates nothing)."""
        return Settings.model_construct(data_dir=self.data_dir.resolve())


class MLflowRegistryResource(dg.ConfigurableResource):
    """The MLflow tracking server / model registry, by URI (SQLite under data/ by default)."""

    tracking_uri: str
    model_name: str = DEFAULT_MODEL_NAME
    promotion_metric: str = DEFAULT_PROMOTION_METRIC
    promotion_margin: float = DEFAULT_PROMOTION_MARGIN

    def registry(self):
        """The registry client; one per store and model in a process (an MLflow client costs ~70 ms
        to open on SQLite, and the demo's and a scenario's daily runs ask for it a few times a run)."""
        return _registry(self.tracking_uri, self.model_name)


@functools.lru_cache(maxsize=8)
def _registry(tracking_uri: str, model_name: str):
    from ml_platform.registry import ModelRegistry

    return ModelRegistry(tracking_uri, model_name)


class EventSourceResource(dg.ConfigurableResource):
    """Where raw transaction events come from: the synthetic generator or the user's own files.

    kind="synthetic": generated from `seed` (optionally with a drift scenario from `drift_start`);
    kind="files": imported from `import_path` (a Parquet/CSV file or directory with the raw columns),
    labels from `labels_path` (files with transaction_id, merchant_id, is_fraud, label_timestamp).
    """

    kind: str = "synthetic"
    seed: int = SyntheticDefaults.seed
    n_users: int = SyntheticDefaults.n_users
    n_merchants: int = SyntheticDefaults.n_merchants
    txns_per_user_per_day: float = SyntheticDefaults.txns_per_user_per_day
    fraud_rate: float = SyntheticDefaults.fraud_rate
    drift_start: str | None = None
    import_path: str | None = None
    labels_path: str | None = None

    def generator_config(self, start: dt.date, days: int, as_of: dt.datetime | None = None):
        from ml_platform.sources.generator import DriftScenario, GeneratorConfig

        drift = DriftScenario(start_date=dt.date.fromisoformat(self.drift_start)) if self.drift_start else None
        return GeneratorConfig(
            seed=self.seed,
            n_users=self.n_users,
            n_merchants=self.n_merchants,
            txns_per_user_per_day=self.txns_per_user_per_day,
            fraud_rate=self.fraud_rate,
            start=start,
            days=days,
            as_of=as_of,
            drift=drift,
        )


class MonitoringResource(dg.ConfigurableResource):
    """Monitoring's configuration: the thresholds file (TOML; None: the defaults) and where the
    API's Prometheus metrics are (for the error rate; None or unreachable: the log alone)."""

    config_path: str | None = None
    api_metrics_url: str | None = None

    def config(self):
        from ml_platform.monitoring.config import MonitoringConfig, load_monitoring_config

        return load_monitoring_config(self.config_path) if self.config_path else MonitoringConfig()

    def inputs(self, feature_store: FeatureStoreResource, mlflow: MLflowRegistryResource):
        """The plain-Python monitoring inputs of this deployment."""
        from ml_platform.monitoring.daily import MonitoringInputs

        paths = feature_store.paths
        return MonitoringInputs(
            registry=mlflow.registry(),
            raw_dir=paths.raw_dir,
            predictions_log_dir=paths.predictions_log_dir,
            monitoring_dir=paths.monitoring_dir,
            data_dir=feature_store.data_dir,
            config=self.config(),
            store=feature_store.store(),
            api_metrics_url=self.api_metrics_url,
        )

    def reports_dir(self, feature_store: FeatureStoreResource) -> Path:
        return feature_store.paths.reports_dir


class SparkUnavailable(dg.ConfigurableResource):
    """The `spark` resource when the `spark` extra is not installed: any use says how to get it."""

    @property
    def spark_session(self):
        raise RuntimeError("ML_PLATFORM_OFFLINE_ENGINE=spark needs the spark extra: pip install 'ml_platform[spark]'")

    def score_partition(self, *args, **kwargs):
        raise RuntimeError("ML_PLATFORM_BATCH_ENGINE=spark needs the spark extra: pip install 'ml_platform[spark]'")


def spark_resource() -> dg.ConfigurableResource:
    """dagster-pyspark's lazy resource (no JVM until a step asks for the session), or a stand-in."""
    try:
        from ml_platform.defs.spark import SparkResource
    except ImportError:
        return SparkUnavailable()
    return SparkResource()


def secret_reference(value: str | None, env_name: str, *, as_config: bool = False):
    """`value` as config Dagster may store: a URL with a password becomes a reference to the
    environment variable it came from (`dg.EnvVar` for a resource, `{"env": name}` for executor
    config with `as_config`: the run's snapshot in the instance's database keeps the name, the
    step reads the value), any other value stays as it is."""
    if not has_secret(value):
        return value
    if os.environ.get(env_name) == value:
        return {"env": env_name} if as_config else dg.EnvVar(env_name)
    raise ValueError(
        f"{redact_url(value)!r} carries a password but is not the value of {env_name}: set it in the "
        f"environment as {env_name}, so that Dagster records the variable's name and not the secret"
    )


def default_resources(settings: Settings | None = None, **source_overrides) -> dict:
    """Resources built from settings (env vars with embedded defaults)."""
    settings = settings or load_settings()
    if settings.events_path and "kind" not in source_overrides:  # ML_PLATFORM_EVENTS_PATH: the user's files
        source_overrides = {"kind": "files", "import_path": str(settings.events_path.expanduser().resolve())}
        if settings.labels_path:
            source_overrides["labels_path"] = str(settings.labels_path.expanduser().resolve())
    kind = source_overrides.get("kind", "synthetic")
    if kind not in EVENT_SOURCE_KINDS:
        raise ValueError(f"event_source kind must be one of {EVENT_SOURCE_KINDS}, got {kind!r}")
    return {
        "feature_store": FeatureStoreResource(
            repo_path=str(settings.data_dir),
            redis_url=secret_reference(settings.redis_url, "REDIS_URL"),
            project=settings.project,
            engine=settings.offline_engine,
            batch_engine=settings.batch_engine,
        ),
        "spark": spark_resource(),
        "mlflow": MLflowRegistryResource(
            tracking_uri=secret_reference(settings.mlflow_tracking_uri, "MLFLOW_TRACKING_URI"),
            model_name=settings.model_name,
            promotion_metric=settings.promotion_metric,
            promotion_margin=settings.promotion_margin,
        ),
        "event_source": EventSourceResource(**source_overrides),
        "monitoring": MonitoringResource(
            config_path=str(settings.monitoring_config) if settings.monitoring_config else None,
            api_metrics_url=settings.api_metrics_url,
        ),
    }
