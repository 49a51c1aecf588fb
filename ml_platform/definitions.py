"""The single Dagster `Definitions` object that workspace.yaml, `dagster dev` and the CLI load."""

from __future__ import annotations

from ml_platform.defs.pipeline import build_definitions

defs = build_definitions()
