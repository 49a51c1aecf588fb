"""Every setting and every platform-wide default, in one place.

Settings are read from the environment (pydantic-settings) with embedded defaults that keep
everything on this machine under one data directory, so a fresh clone runs with no server:
DuckDB/Parquet files, the MLflow SQLite store, the embedded Redis and DAGSTER_HOME all live in
`data/`. Point at real services with env vars (see README, "Settings"):

    ML_PLATFORM_DATA_DIR, DAGSTER_HOME, MLFLOW_TRACKING_URI, REDIS_URL,
    ML_PLATFORM_MODEL_NAME, ML_PLATFORM_MODEL_TYPE, ML_PLATFORM_PROJECT, ML_PLATFORM_PROMOTION_MARGIN,
    ML_PLATFORM_STREAM_BATCH_SIZE, ML_PLATFORM_EVENTS_PATH

and, for the production profile (ML_PLATFORM_PROFILE=production: every service a real server,
nothing embedded; README "Production"): ML_PLATFORM_DAGSTER_POSTGRES_URL,
ML_PLATFORM_MLFLOW_BACKEND_STORE_URI, ML_PLATFORM_MLFLOW_ARTIFACT_ROOT, ML_PLATFORM_API_TOKEN.
Secrets (passwords in URLs, the API token) never appear in a repr: `repr(settings)` redacts them.

The module-level constants below are the defaults every consumer (resources, CLI, generator,
stream worker) derives from; nothing else writes these values down again.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from ml_platform.redaction import redact_url, url_secret

_REPO_ROOT = Path(__file__).resolve().parent.parent

# --- Platform-wide defaults (the one copy of each) ---
DEFAULT_MODEL_NAME = "fraud_detector"
DEFAULT_PROJECT = "ml_platform"  # key prefix of everything the platform keeps in Redis
DEFAULT_PROMOTION_METRIC = "pr_auc"
# A challenger must beat the champion by strictly more than this on the same held-out rows.
DEFAULT_PROMOTION_MARGIN = 0.0
DEFAULT_MODEL_TYPE = "hist_gradient_boosting"  # one of ml_platform.training.model_types.MODEL_TYPES
DEFAULT_STREAM_BATCH_SIZE = 1000  # events per XREADGROUP of the stream worker (measured best, docs/streaming.md)
DEFAULT_STREAM_GROUP = "scorers"
DEFAULT_HTTP_PORT = 8000
DEFAULT_UI_PORT = 3000
PREDICTIONS_DB_NAME = "predictions.duckdb"  # batch predictions, under the data directory
# The engines that compute offline feature tables, and score batch days, from the same
# declarations (docs/spark.md).
OFFLINE_ENGINES = ("duckdb", "spark")
DEFAULT_CELERY_BROKER_URL = "pyamqp://guest@127.0.0.1:5672//"  # RabbitMQ on this machine
# An embedded Redis with no client for this long stops itself; the next use starts it again.
DEFAULT_EMBEDDED_REDIS_IDLE_S = 1800.0
# The variable dagster.yaml reads the instance's PostgreSQL URL from (`{env: ...}`): the password
# stays in the environment, never in a file the platform writes.
DAGSTER_POSTGRES_URL_ENV = "ML_PLATFORM_DAGSTER_POSTGRES_URL"
# What the production profile needs set, and why (the error names the missing ones).
PRODUCTION_REQUIRED = {
    DAGSTER_POSTGRES_URL_ENV: "the Dagster instance's PostgreSQL (runs, event log, schedules)",
    "MLFLOW_TRACKING_URI": "the MLflow tracking server, http(s)://host:port",
    "REDIS_URL": "the online store's Redis, redis://user:password@host:port/db or rediss://",
}


def dagster_postgres_url(url: str) -> str:
    """The instance's URL with the driver dagster-postgres is written for: SQLAlchemy 2.1 opens a
    plain postgresql:// URL with psycopg 3, on which dagster-postgres's NOTIFY fails."""
    for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg2://" + url[len(prefix):]
    raise ValueError(f"{DAGSTER_POSTGRES_URL_ENV} must be a postgresql:// URL, got {redact_url(url)!r}")


class SyntheticDefaults:
    """The synthetic population of the demo (generator, `event_source` resource and CLI)."""

    seed = 7
    n_users = 5000
    n_merchants = 500
    txns_per_user_per_day = 0.6
    fraud_rate = 0.008  # target share of fraudulent transactions
    demo_days = 75  # the features' 37-day warm-up, then a month of steady state (see features.history_warmup)
    label_maturity_days = 7  # a legit label is confirmed this long after the event
    min_demo_days = 21  # labels settle 7 days after the event: shorter histories cannot split


class Settings(BaseSettings):
    """Where the platform keeps things and which servers it talks to."""

    # hide_input_in_errors: a validation error must not print the environment (it holds secrets).
    model_config = SettingsConfigDict(frozen=True, extra="forbid", populate_by_name=True, hide_input_in_errors=True)

    data_dir: Path = Field(default=_REPO_ROOT / "data", validation_alias="ML_PLATFORM_DATA_DIR")
    dagster_home: Path | None = Field(default=None, validation_alias="DAGSTER_HOME")
    mlflow_tracking_uri: str | None = Field(default=None, validation_alias="MLFLOW_TRACKING_URI")
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    model_name: str = Field(default=DEFAULT_MODEL_NAME, validation_alias="ML_PLATFORM_MODEL_NAME")
    project: str = Field(default=DEFAULT_PROJECT, validation_alias="ML_PLATFORM_PROJECT")
    model_type: str = Field(default=DEFAULT_MODEL_TYPE, validation_alias="ML_PLATFORM_MODEL_TYPE")
    promotion_metric: str = DEFAULT_PROMOTION_METRIC
    promotion_margin: float = Field(default=DEFAULT_PROMOTION_MARGIN, validation_alias="ML_PLATFORM_PROMOTION_MARGIN")
    # The user's own events (a Parquet/CSV file or folder with the contract's columns): when set,
    # the `event_source` resource imports them instead of generating synthetic ones.
    events_path: Path | None = Field(default=None, validation_alias="ML_PLATFORM_EVENTS_PATH")
    # Your own label files (transaction_id, merchant_id, is_fraud, label_timestamp), with your events.
    labels_path: Path | None = Field(default=None, validation_alias="ML_PLATFORM_LABELS_PATH")
    stream_batch_size: int = Field(
        default=DEFAULT_STREAM_BATCH_SIZE, ge=1, le=10_000, validation_alias="ML_PLATFORM_STREAM_BATCH_SIZE"
    )

    # A TOML file overriding monitoring thresholds ([drift], [prediction], [performance], [serving]).
    monitoring_config: Path | None = Field(default=None, validation_alias="ML_PLATFORM_MONITORING_CONFIG")
    # A TOML file overriding the cost asset's unit prices ([prices]).
    cost_config: Path | None = Field(default=None, validation_alias="ML_PLATFORM_COST_CONFIG")
    # The API's Prometheus endpoint, read by serving_health for the error rate (unset: the log alone).
    api_metrics_url: str | None = Field(default=None, validation_alias="ML_PLATFORM_API_METRICS_URL")

    # --- The production profile (README, "Production") ---
    profile: Literal["embedded", "production"] = Field(default="embedded", validation_alias="ML_PLATFORM_PROFILE")
    # postgresql://user:password@host:port/db of the Dagster instance (written into dagster.yaml
    # as a reference to this variable, not as its value).
    dagster_postgres_url: str | None = Field(default=None, validation_alias=DAGSTER_POSTGRES_URL_ENV)
    # What `ml-platform mlflow-server` serves: its backend store (postgresql://...) and where it
    # keeps artifacts (a directory, s3://..., gs://...); clients reach both through the server.
    mlflow_backend_store_uri: str | None = Field(default=None, validation_alias="ML_PLATFORM_MLFLOW_BACKEND_STORE_URI")
    mlflow_artifact_root: str | None = Field(default=None, validation_alias="ML_PLATFORM_MLFLOW_ARTIFACT_ROOT")
    # What computes the offline feature tables: DuckDB (one machine) or Spark (the `spark` resource's
    # spark_config: local[2] by default, a cluster's master URL for more).
    offline_engine: str = Field(default="duckdb", validation_alias="ML_PLATFORM_OFFLINE_ENGINE")
    # What scores a day in `batch_predictions`: DuckDB (`serving.batch`, one machine) or Spark
    # (`serving.spark_batch` on the same `spark` resource), the same predictions and prediction log.
    batch_engine: str = Field(default="duckdb", validation_alias="ML_PLATFORM_BATCH_ENGINE")
    # Where a job's steps run: unset, Dagster's default (the CLI's runs in its own process, the UI's
    # in subprocesses); "celery": on Celery workers (`ml-platform celery-worker`) over the broker;
    # "k8s": each step a Kubernetes Job (dagster-k8s).
    executor: Literal["in_process", "multiprocess", "celery", "k8s"] | None = Field(
        default=None, validation_alias="ML_PLATFORM_EXECUTOR")
    # "k8s": the k8s_job_executor's config (YAML; deploy/k8s/executor.yaml is a worked example).
    k8s_executor_config: Path | None = Field(default=None, validation_alias="ML_PLATFORM_K8S_EXECUTOR_CONFIG")
    celery_broker_url: str = Field(default=DEFAULT_CELERY_BROKER_URL, validation_alias="ML_PLATFORM_CELERY_BROKER_URL")
    celery_backend_url: str = Field(default="rpc://", validation_alias="ML_PLATFORM_CELERY_BACKEND_URL")
    # The embedded Redis stops itself after this long with no client (0: never); it starts again on use.
    embedded_redis_idle_s: float = Field(default=DEFAULT_EMBEDDED_REDIS_IDLE_S, ge=0, validation_alias="ML_PLATFORM_EMBEDDED_REDIS_IDLE_S")
    # The HTTP API's bearer token: once set, every mutating endpoint requires it.
    api_token: SecretStr | None = Field(default=None, validation_alias="ML_PLATFORM_API_TOKEN")

    @field_validator("redis_url", "mlflow_tracking_uri", "dagster_home", "events_path", "labels_path",
                     "monitoring_config", "cost_config", "api_metrics_url", "dagster_postgres_url",
                     "mlflow_backend_store_uri", "mlflow_artifact_root", "api_token", "executor",
                     "k8s_executor_config", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("offline_engine", "batch_engine")
    @classmethod
    def _known_engine(cls, value: str, info) -> str:
        if value not in OFFLINE_ENGINES:
            variable = cls.model_fields[info.field_name].validation_alias
            raise ValueError(f"{variable} must be one of {list(OFFLINE_ENGINES)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _derive(self) -> Settings:
        data_dir = Path(self.data_dir).expanduser().resolve()
        object.__setattr__(self, "data_dir", data_dir)
        home = Path(self.dagster_home or data_dir / "dagster_home").expanduser().resolve()
        object.__setattr__(self, "dagster_home", home)
        if self.profile == "production":
            self._check_production()
        if self.dagster_postgres_url:
            object.__setattr__(self, "dagster_postgres_url", dagster_postgres_url(self.dagster_postgres_url))
        if not self.mlflow_tracking_uri:
            object.__setattr__(self, "mlflow_tracking_uri", f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}")
        return self

    def _check_production(self) -> None:
        """The production profile embeds nothing: name every missing server, and refuse a tracking
        URI that is not a tracking server (a file or SQLite store would be one machine's)."""
        given = {
            DAGSTER_POSTGRES_URL_ENV: self.dagster_postgres_url,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "REDIS_URL": self.redis_url,
        }
        missing = [f"{name} ({why})" for name, why in PRODUCTION_REQUIRED.items() if not given[name]]
        if missing:
            raise ValueError("ML_PLATFORM_PROFILE=production needs " + "; ".join(missing))
        if not self.mlflow_tracking_uri.startswith(("http://", "https://")):
            raise ValueError(
                "ML_PLATFORM_PROFILE=production talks to an MLflow tracking server: MLFLOW_TRACKING_URI must be "
                f"http(s)://host:port, got {redact_url(self.mlflow_tracking_uri)!r} (start one with `ml-platform mlflow-server`)"
            )

    def __repr_args__(self):
        """Like pydantic's, with every URL's password hidden (the token is a SecretStr already)."""
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if isinstance(value, str) and "://" in value else value

    @property
    def api_token_value(self) -> str | None:
        return self.api_token.get_secret_value() if self.api_token else None

    def secrets(self) -> list[str]:
        """Every secret these settings hold (URL passwords, the API token): what must never be logged."""
        found = [url_secret(u) for u in (self.redis_url, self.mlflow_tracking_uri, self.dagster_postgres_url,
                                         self.mlflow_backend_store_uri, self.celery_broker_url,
                                         self.celery_backend_url)]
        return [s for s in [*found, self.api_token_value] if s]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        env = _ENVIRON.get()
        return init_settings, (env_settings if env is None else _MappingEnvSource(settings_cls, env))

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"

    @property
    def mlflow_dir(self) -> Path:
        return self.data_dir / "mlflow"

    @property
    def predictions_log_dir(self) -> Path:
        """The API's and the stream's prediction log, as Parquet (date=YYYY-MM-DD/ parts)."""
        return self.data_dir / "predictions_log"

    @property
    def predictions_db_path(self) -> Path:
        """The DuckDB database batch scoring publishes to (`predictions` table)."""
        return self.data_dir / PREDICTIONS_DB_NAME

    @property
    def reports_dir(self) -> Path:
        """Self-contained HTML reports (monitoring_<day>.html) and scenario results."""
        return self.data_dir / "reports"

    @property
    def monitoring_dir(self) -> Path:
        """Monitoring results per asset and day (JSON) and the cached model references."""
        return self.data_dir / "monitoring"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.dagster_home, self.raw_dir, self.offline_dir, self.mlflow_dir):
            d.mkdir(parents=True, exist_ok=True)


class _MappingEnvSource(EnvSettingsSource):
    """Environment variables from a given mapping instead of os.environ (load_settings(env=...))."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        self._mapping = dict(env)
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._mapping.items()}


# The mapping load_settings(env=...) reads instead of os.environ (None: os.environ).
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("settings_env", default=None)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from `env` (default: os.environ), with the embedded defaults for what is unset."""
    token = _ENVIRON.set(None if env is None else dict(env))
    try:
        return Settings()
    finally:
        _ENVIRON.reset(token)
