"""The Dagster instance the platform runs on: DAGSTER_HOME (`data/dagster_home` by default) and its
dagster.yaml, written from the settings.

- embedded profile: the local instance (SQLite files under DAGSTER_HOME);
- production profile: runs, event log and schedules in PostgreSQL (`dagster-postgres`), the URL
  read by Dagster from the environment variable ML_PLATFORM_DAGSTER_POSTGRES_URL (`{env: ...}`), so
  the password is never written to disk. The platform's processes get the URL in the form
  dagster-postgres needs (postgresql+psycopg2://, `settings.dagster_postgres_url`); start Dagster's
  own commands (daemon, webserver) with that form too, or through `ml-platform ui`.

A dagster.yaml the platform wrote (its first line says so) follows the settings: it is rewritten
when the profile changes. A dagster.yaml of the user's own (any other first line) is kept as it is.
"""

from __future__ import annotations

import os

from ml_platform.settings import DAGSTER_POSTGRES_URL_ENV, Settings

HEADER = "# Written by ml-platform"

EMBEDDED_YAML = f"""\
{HEADER}: a local Dagster instance under the data directory (embedded profile).
telemetry:
  enabled: false
"""

PRODUCTION_YAML = f"""\
{HEADER} (production profile): runs, event log and schedules in PostgreSQL.
# The URL (with its password) stays in the environment: {DAGSTER_POSTGRES_URL_ENV}.
telemetry:
  enabled: false
storage:
  postgres:
    postgres_url:
      env: {DAGSTER_POSTGRES_URL_ENV}
"""


def dagster_yaml(settings: Settings) -> str:
    """The dagster.yaml the settings call for."""
    return PRODUCTION_YAML if settings.dagster_postgres_url else EMBEDDED_YAML


def write_dagster_home(settings: Settings) -> None:
    """Create the data directories and DAGSTER_HOME with its dagster.yaml (see the module doc)."""
    settings.ensure_dirs()
    cfg = settings.dagster_home / "dagster.yaml"
    wanted = dagster_yaml(settings)
    current = cfg.read_text() if cfg.exists() else None
    if current == wanted or (current is not None and not current.startswith(HEADER)):
        return
    tmp = cfg.with_name(f".dagster.yaml.{os.getpid()}.tmp")
    tmp.write_text(wanted)
    tmp.replace(cfg)


def instance_env(settings: Settings) -> dict[str, str]:
    """The variables a process must have to open this instance (dagster.yaml reads the PostgreSQL
    URL from the environment)."""
    env = {"DAGSTER_HOME": str(settings.dagster_home)}
    if settings.dagster_postgres_url:
        env[DAGSTER_POSTGRES_URL_ENV] = settings.dagster_postgres_url
    return env


def prepare_dagster_home(settings: Settings) -> None:
    """Create DAGSTER_HOME (under data/ by default) and point this process at it."""
    write_dagster_home(settings)
    os.environ.update(instance_env(settings))


def open_instance(settings: Settings):
    """The persistent Dagster instance at `settings.dagster_home` (created if needed), without
    touching this process's DAGSTER_HOME."""
    import dagster as dg

    write_dagster_home(settings)
    if settings.dagster_postgres_url:
        # dagster-postgres resolves `{env: ...}` from os.environ when the instance is built
        os.environ[DAGSTER_POSTGRES_URL_ENV] = settings.dagster_postgres_url
    return dg.DagsterInstance.from_config(str(settings.dagster_home))
