"""Loading a registered scikit-learn model safely: skops files only, checked against our own
allow-list of types instead of the list stored inside the model (which its writer controls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Types a registered model may contain beyond skops' defaults, one line per model type that needs
# them (training.model_types). Reviewed: plain data holders of scikit-learn/numpy, no code paths.
TRUSTED_MODEL_TYPES = frozenset(
    {
        # hist_gradient_boosting
        "functools.partial",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.utils.validation.check_array",
        # logistic_regression (SimpleImputer keeps its fit dtype)
        "numpy.dtype",
        # random_forest
        "sklearn.tree._tree.Tree",
    }
)


def load_skops_model(local_dir: Path, label: str) -> Any:
    """The model of a downloaded MLflow sklearn model directory; `label` names it in errors."""
    import skops.io
    import yaml

    flavor = yaml.safe_load((local_dir / "MLmodel").read_text())["flavors"]["sklearn"]
    if flavor.get("serialization_format") != "skops":
        raise RuntimeError(
            f"{label} is saved as {flavor.get('serialization_format')!r}; "
            "the platform only loads skops models (register it again with this registry)"
        )
    path = local_dir / flavor["pickled_model"]
    untrusted = set(skops.io.get_untrusted_types(file=path))
    refused = sorted(untrusted - TRUSTED_MODEL_TYPES)
    if refused:
        raise RuntimeError(
            f"{label} contains types outside the platform's allow-list: {refused}; "
            "review them and add them to ml_platform.registry.loading.TRUSTED_MODEL_TYPES if they are safe"
        )
    return skops.io.load(path, trusted=sorted(untrusted))
