"""MLflow, imported once for the registry package, quietly, and pointed at one store at a time.

`import mlflow` costs ~4 s, so only `ml_platform.registry` imports it, never at package import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

# Downloading a model is local and instant here; MLflow's tqdm bars would only clutter logs.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's SQLite store triggers a SQLAlchemy deprecation warning about `noload` on each use.
warnings.filterwarnings("ignore", message=r".*noload.*")
# MLflow's input-example code compares columns with a range, which pandas 3 deprecates.
warnings.filterwarnings("ignore", message=r"Operation with range is deprecated", module=r"mlflow\.")
# Printed once when MLflow's pyfunc module loads its own chat types; nothing to do with our models.
warnings.filterwarnings("ignore", message=r".*Any type hint is inferred as AnyType")

import mlflow
import mlflow.sklearn
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

for _noisy in ("alembic", "mlflow.store.db.utils"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)

__all__ = ["MlflowClient", "MlflowException", "fluent", "infer_signature", "mlflow"]


@contextlib.contextmanager
def fluent(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's global (fluent) API at `tracking_uri` for the duration, then restore it
    exactly, including the MLFLOW_*_URI env vars MLflow sets as a side effect."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
    saved_registry = getattr(registry_utils, "_registry_uri", None)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        registry_utils._registry_uri = saved_registry
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
