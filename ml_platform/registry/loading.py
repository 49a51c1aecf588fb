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


class LoadedVersions:
    """The models this process loaded, by (tracking URI, model name, version, run id): a registered
    version's artifacts never change (MLflow numbers versions once; the run id tells a version of a
    store recreated at the same path from the old one), so loading it again in the same process
    (the daily jobs of `ml-platform demo` and of a scenario, a promotion comparing the champion
    again) reuses what was loaded instead of downloading and re-checking the skops file. The
    newest `size` are kept. Callers only read the models they get (predict); none modifies them."""

    def __init__(self, size: int = 4):
        import threading
        from collections import OrderedDict

        self.size = size
        self._items: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple) -> tuple[Any, Any] | None:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
            return found

    def put(self, key: tuple, model: Any, contract: Any) -> None:
        with self._lock:
            self._items[key] = (model, contract)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


LOADED_VERSIONS = LoadedVersions()
