"""The local Dagster instance under the data directory (DAGSTER_HOME, `data/dagster_home` by default)."""

from __future__ import annotations

import os

from ml_platform.settings import Settings

DAGSTER_YAML = """\
# Written by ml-platform: a local Dagster instance under the data directory.
telemetry:
  enabled: false
"""


def write_dagster_home(settings: Settings) -> None:
    """Create the data directories and DAGSTER_HOME with its dagster.yaml (kept if present)."""
    settings.ensure_dirs()
    cfg = settings.dagster_home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(DAGSTER_YAML)


def prepare_dagster_home(settings: Settings) -> None:
    """Create DAGSTER_HOME (under data/ by default) and point this process at it."""
    write_dagster_home(settings)
    os.environ["DAGSTER_HOME"] = str(settings.dagster_home)


def open_instance(settings: Settings):
    """The persistent Dagster instance at `settings.dagster_home` (created if needed), without
    touching this process's DAGSTER_HOME."""
    import dagster as dg

    write_dagster_home(settings)
    return dg.DagsterInstance.from_config(str(settings.dagster_home))
