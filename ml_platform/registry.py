"""The MLflow model registry as the platform uses it: register with lineage, promote by alias,
roll back, load what serves.

The registered model's `champion` alias is the single source of truth for what is live;
`challenger` marks the newest candidate and `previous-champion` the version a rollback returns to.
MLflow keeps no history of alias moves (mlflow/mlflow#2169), so every move goes through
`ModelRegistry.set_alias`, which writes an audit record as registered-model tag `audit.NNNNNN`
(and the same record on the versions involved). The champion lineage is replayed from those
records: promotions push, rollbacks pop, so repeated rollbacks walk back through past champions.

`import mlflow` costs ~4 s, so it happens inside this module only and never at package import.
"""

from __future__ import annotations

import contextlib
import getpass
import importlib.metadata
import json
import logging
import math
import numbers
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

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

from ml_platform.training.contract import CONTRACT_FILE, ModelContract
from ml_platform.training.evaluate import HIGHER_IS_BETTER, evaluate

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
AUDIT_TAG_PREFIX = "audit."
MODEL_ARTIFACT_NAME = "model"
MODEL_REQUIREMENTS = ("scikit-learn", "skops", "numpy", "pandas", "scipy")
# Types a registered model may contain beyond skops' defaults. Our own allow-list, checked at load
# time, instead of the list stored inside the model (which whoever wrote the model controls).
TRUSTED_MODEL_TYPES = frozenset(
    {
        "functools.partial",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.utils.validation.check_array",
    }
)

_log = logging.getLogger(__name__)
for _noisy in ("alembic", "mlflow.store.db.utils"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version in the registry and where its model lives."""

    version: int
    run_id: str
    model_uri: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of comparing a challenger with the champion on the same held-out data."""

    promoted: bool
    reason: str
    metric: str
    challenger_version: int
    challenger_metric: float | None
    champion_metric: float | None
    champion_version_before: int | None
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_code_version() -> str:
    """The git commit of the code (with `-dirty` if it has local changes), else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"ml_platform=={importlib.metadata.version('ml_platform')}"
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def model_pip_requirements() -> list[str]:
    """Exactly what loading the model needs, pinned to this environment (never inferred)."""
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in MODEL_REQUIREMENTS]


def _default_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError, ImportError):  # no user name in some containers
        return os.environ.get("USER") or "unknown"


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_default(value: Any) -> Any:
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def _flat_scalars(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"test": {"pr_auc": 0.4}} -> {"test_pr_auc": 0.4}; lists are skipped."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat_scalars(value, f"{name}_"))
        elif not isinstance(value, (list, tuple)):
            out[name] = value
    return out


class ModelRegistry:
    """One registered model in one MLflow store: versions with lineage, aliases with an audit trail."""

    def __init__(self, tracking_uri: str, model_name: str, artifact_root: str | Path | None = None):
        if not tracking_uri:
            raise ValueError(
                "ModelRegistry needs an explicit tracking_uri (e.g. sqlite:////abs/path/mlflow.db)"
            )
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = self._artifact_location(tracking_uri, artifact_root)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._experiment_id: str | None = None

    @staticmethod
    def _artifact_location(tracking_uri: str, artifact_root: str | Path | None) -> str | None:
        """Artifacts next to the SQLite file (<dir>/artifacts) unless given: never in the cwd."""
        if artifact_root is not None:
            root = str(artifact_root)
            return Path(root).resolve().as_uri() if "://" not in root else root
        if tracking_uri.startswith("sqlite:///"):
            db_path = Path(tracking_uri[len("sqlite:///") :]).resolve()
            db_path.parent.mkdir(parents=True, exist_ok=True)
            return (db_path.parent / "artifacts").as_uri()
        if tracking_uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
            # Without a server, MLflow would put artifacts in ./mlruns of whatever the cwd is.
            raise ValueError(
                f"Tracking URI {tracking_uri!r} is a database: pass artifact_root (a directory or "
                "object-store URI) so artifacts do not land in the current directory"
            )
        return None  # an MLflow tracking server decides

    @contextlib.contextmanager
    def _fluent(self) -> Iterator[None]:
        """Point MLflow's global (fluent) API at this store for the duration, then restore it
        exactly, including the MLFLOW_*_URI env vars MLflow sets as a side effect."""
        from mlflow.tracking._model_registry import utils as registry_utils
        from mlflow.tracking._tracking_service import utils as tracking_utils

        saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
        saved_tracking = getattr(tracking_utils, "_tracking_uri", None)
        saved_registry = getattr(registry_utils, "_registry_uri", None)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
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

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.model_name)
            if exp is None:
                self._experiment_id = self.client.create_experiment(
                    self.model_name, artifact_location=self.artifact_root
                )
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    # --- registering ----------------------------------------------------------------------------
    def log_and_register(
        self,
        model: Any,
        contract: ModelContract,
        metrics: dict[str, Any],
        params: dict[str, Any],
        data_version: str,
        code_version: str | None = None,
        training_frame_sample: pd.DataFrame | None = None,
        run_name: str | None = None,
        who: str | None = None,
    ) -> RegisteredVersion:
        """Log one MLflow run (params, metrics, lineage tags, the model, contract.json), register it
        as a new version and point the `challenger` alias at it."""
        code_version = code_version or current_code_version()
        lineage = {"data_version": data_version, "code_version": code_version}
        with self._fluent(), mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name) as run:
            run_id = run.info.run_id
            mlflow.set_tags(
                {
                    **lineage,
                    "model_name": self.model_name,
                    "feature_refs": json.dumps(list(contract.feature_refs)),
                }
            )
            flat_params = {
                k: ("None" if v is None else str(v))[:6000] for k, v in _flat_scalars(params).items()
            }
            mlflow.log_params({**flat_params, "decision_threshold": contract.decision_threshold})
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in _flat_scalars(metrics).items()
                    if isinstance(v, numbers.Real) and math.isfinite(v)
                }
            )
            mlflow.log_text(json.dumps(metrics, indent=2, default=_json_default), "metrics.json")
            mlflow.log_text(contract.to_json(), CONTRACT_FILE)

            example = None
            signature = None
            if training_frame_sample is not None and len(training_frame_sample):
                example = contract.model_input(training_frame_sample.head(5)).reset_index(drop=True)
                signature = infer_signature(example, model.predict_proba(example))
            import skops.io

            model_info = mlflow.sklearn.log_model(
                model,
                name=MODEL_ARTIFACT_NAME,
                signature=signature,
                input_example=example,
                pip_requirements=model_pip_requirements(),
                pyfunc_predict_fn="predict_proba",
                metadata={"contract": contract.to_dict()},
                skops_trusted_types=sorted(skops.io.get_untrusted_types(data=skops.io.dumps(model))),
            )
            # Inside the fluent context: MLflow's SQL registry looks the logged model up globally.
            self._ensure_registered_model()
            mv = self.client.create_model_version(
                self.model_name,
                source=model_info.model_uri,
                run_id=run_id,
                tags={**lineage, "run_id": run_id},
                model_id=model_info.model_id,
            )
        version = int(mv.version)
        self.client.set_model_version_tag(
            self.model_name, str(version), "feature_refs", json.dumps(list(contract.feature_refs))
        )
        self.client.set_model_version_tag(
            self.model_name,
            str(version),
            "contract",
            contract.with_registration(self.model_name, version).to_json(),
        )
        self.set_alias(CHALLENGER, version, who=who, why=f"registered from run {run_id}", action="register")
        return self._version_info(version)

    def _ensure_registered_model(self) -> None:
        try:
            self.client.get_registered_model(self.model_name)
        except MlflowException:
            self.client.create_registered_model(
                self.model_name,
                description="Card-fraud classifier of the ml_platform (aliases: champion, challenger)",
            )

    # --- aliases and their audit trail --------------------------------------------------------
    def set_alias(
        self, alias: str, version: int | None, who: str | None = None, why: str = "", action: str = "set"
    ) -> dict[str, Any]:
        """Point `alias` at `version` (None removes the alias) and record the move; returns the
        audit record. Every alias move of the platform goes through here, so `alias_history()` is
        complete. The move happens first, then the record (MLflow has no transactions); the
        sequence number assumes one writer at a time (one training/promotion run per model)."""
        who = who or _default_user()
        before = self._alias_version(alias)
        if version is not None:
            version = int(version)
            self._require_version(version)
            self.client.set_registered_model_alias(self.model_name, alias, str(version))
        elif before is not None:
            self.client.delete_registered_model_alias(self.model_name, alias)
        else:
            return {}  # removing an alias that is not set: nothing moved, nothing to record
        history = self.alias_history()
        seq = (history[-1]["seq"] + 1) if history else 1
        record = {
            "seq": seq,
            "alias": alias,
            "from_version": before,
            "to_version": version,
            "action": action,
            "who": who,
            "when": _utc_now(),
            "why": why,
        }
        key, value = f"{AUDIT_TAG_PREFIX}{seq:06d}", json.dumps(record, sort_keys=True)
        self.client.set_registered_model_tag(self.model_name, key, value)
        for v in {before, version} - {None}:
            self.client.set_model_version_tag(self.model_name, str(v), key, value)
        _log.info("alias %s: v%s -> v%s by %s (%s)", alias, before, version, who, why)
        return record

    def alias_history(self, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded alias move, oldest first (optionally only those of `alias`)."""
        try:
            tags = self.client.get_registered_model(self.model_name).tags
        except MlflowException:
            return []
        records = [json.loads(v) for k, v in tags.items() if k.startswith(AUDIT_TAG_PREFIX)]
        records.sort(key=lambda r: r["seq"])
        return [r for r in records if alias is None or r["alias"] == alias]

    def champion_lineage(self) -> list[int]:
        """Champion versions replayed from the audit trail, current last: a promotion (or a manual
        set) pushes, a rollback pops, removing the champion alias clears it."""
        stack: list[int] = []
        for r in self.alias_history(CHAMPION):
            if r["to_version"] is None:
                stack = []
            elif r["action"] == "rollback":
                stack = stack[:-1]
                if not stack or stack[-1] != r["to_version"]:
                    stack.append(r["to_version"])
            else:
                stack.append(r["to_version"])
        return stack

    # --- promotion and rollback ---------------------------------------------------------------
    def promote_if_better(
        self,
        challenger_version: int,
        heldout_frame: pd.DataFrame,
        metric: str = "pr_auc",
        margin: float = 0.0,
        who: str | None = None,
        why: str = "",
    ) -> PromotionDecision:
        """Promote the challenger iff it beats the champion by `margin` on `metric`, both scored on
        the same held-out frame, each through its own contract. No champion yet: promote."""
        if metric not in HIGHER_IS_BETTER:
            raise ValueError(f"Unknown promotion metric {metric!r}; use one of {sorted(HIGHER_IS_BETTER)}")
        challenger_version = int(challenger_version)
        champion = self.champion()
        champion_before = champion.version if champion else None
        challenger_model, challenger_contract = self.load_model(challenger_version)
        challenger_metric = evaluate(challenger_model, challenger_contract, heldout_frame)[metric]
        champion_metric = None

        if challenger_metric is None:
            promoted, reason = False, f"{metric} is undefined on the held-out frame (it has a single class)"
        elif champion is None:
            promoted, reason = True, "no champion yet"
        elif champion.version == challenger_version:
            promoted, reason = False, f"v{challenger_version} is already the champion"
        else:
            champion_model, champion_contract = self.load_model(champion.version)
            champion_metric = evaluate(champion_model, champion_contract, heldout_frame)[metric]
            sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
            if champion_metric is None:
                promoted, reason = True, f"champion's {metric} is undefined on the held-out frame"
            else:
                gain = sign * (challenger_metric - champion_metric)
                promoted = gain >= margin
                reason = (
                    f"challenger {metric} {challenger_metric:.4f} vs champion v{champion.version} "
                    f"{champion_metric:.4f}: improvement {gain:+.4f} "
                    f"{'>=' if promoted else '<'} required margin {margin:.4f}"
                )
        decision = PromotionDecision(
            promoted=promoted,
            reason=reason,
            metric=metric,
            challenger_version=challenger_version,
            challenger_metric=challenger_metric,
            champion_metric=champion_metric,
            champion_version_before=champion_before,
            margin=float(margin),
        )
        why = why or reason
        if promoted:
            if champion_before is not None:
                self.set_alias(PREVIOUS_CHAMPION, champion_before, who=who, why=why, action="promote")
            self.set_alias(CHAMPION, challenger_version, who=who, why=why, action="promote")
        self.client.set_model_version_tag(
            self.model_name, str(challenger_version), "promotion_decision", json.dumps(decision.to_dict())
        )
        return decision

    def rollback(self, who: str | None = None, why: str = "") -> tuple[int, int]:
        """Move `champion` back to the previous champion; returns (from_version, to_version).

        Repeated rollbacks walk further back through the champion lineage; `previous-champion`
        then points at the champion before the restored one (or is removed when there is none).
        """
        current = self._alias_version(CHAMPION)
        if current is None:
            raise RuntimeError(f"Cannot roll back {self.model_name!r}: it has no champion")
        lineage = self.champion_lineage()
        if not lineage or lineage[-1] != current:
            raise RuntimeError(
                f"Cannot roll back {self.model_name!r}: champion v{current} was not set through the platform "
                f"(audit lineage {lineage}); set it with ModelRegistry.set_alias"
            )
        if len(lineage) < 2:
            raise RuntimeError(
                f"Cannot roll back {self.model_name!r}: champion v{current} has no previous champion"
            )
        target = lineage[-2]
        why = why or "rollback"
        self.set_alias(CHAMPION, target, who=who, why=why, action="rollback")
        self.set_alias(
            PREVIOUS_CHAMPION, lineage[-3] if len(lineage) >= 3 else None, who=who, why=why, action="rollback"
        )
        return current, target

    # --- reading ------------------------------------------------------------------------------
    def champion(self) -> RegisteredVersion | None:
        """The version serving now, or None before the first promotion."""
        version = self._alias_version(CHAMPION)
        return None if version is None else self._version_info(version)

    def get_version(self, alias_or_version: int | str) -> RegisteredVersion:
        return self._version_info(self._resolve(alias_or_version))

    def list_versions(self) -> list[RegisteredVersion]:
        found = self.client.search_model_versions(f"name='{self.model_name}'")
        return [self._version_info(int(mv.version)) for mv in sorted(found, key=lambda m: int(m.version))]

    def get_contract(self, alias_or_version: int | str) -> ModelContract:
        """The contract saved with this version (its run's contract.json), with name and version set."""
        version = self._resolve(alias_or_version)
        run_id = self.client.get_model_version(self.model_name, str(version)).run_id
        with tempfile.TemporaryDirectory() as tmp:
            path = self.client.download_artifacts(run_id, CONTRACT_FILE, tmp)
            contract = ModelContract.from_json(Path(path).read_text())
        return contract.with_registration(self.model_name, version)

    def load_model(self, alias_or_version: int | str) -> tuple[Any, ModelContract]:
        """The scikit-learn model of a version (or alias) and its contract.

        The skops file is loaded with the platform's own type allow-list (TRUSTED_MODEL_TYPES);
        a model holding any other type is refused rather than executed.
        """
        import skops.io
        import yaml

        version = self._resolve(alias_or_version)
        with tempfile.TemporaryDirectory() as tmp, self._fluent():
            local = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{self.model_name}/{version}", dst_path=tmp
                )
            )
            flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["sklearn"]
            if flavor.get("serialization_format") != "skops":
                raise RuntimeError(
                    f"{self.model_name} v{version} is saved as {flavor.get('serialization_format')!r}; "
                    "the platform only loads skops models (register it again with this registry)"
                )
            path = local / flavor["pickled_model"]
            untrusted = set(skops.io.get_untrusted_types(file=path))
            refused = sorted(untrusted - TRUSTED_MODEL_TYPES)
            if refused:
                raise RuntimeError(
                    f"{self.model_name} v{version} contains types outside the platform's allow-list: {refused}; "
                    "review them and add them to ml_platform.registry.TRUSTED_MODEL_TYPES if they are safe"
                )
            model = skops.io.load(path, trusted=sorted(untrusted))
        return model, self.get_contract(version)

    # --- helpers ------------------------------------------------------------------------------
    def _resolve(self, alias_or_version: int | str) -> int:
        if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
            version = int(alias_or_version)
            self._require_version(version)
            return version
        version = self._alias_version(str(alias_or_version))
        if version is None:
            raise LookupError(
                f"Model {self.model_name!r} has no alias {alias_or_version!r}; "
                f"known aliases: {sorted(self._aliases())}"
            )
        return version

    def _aliases(self) -> dict[str, int]:
        try:
            rm = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return {}
        return {a: int(v) for a, v in rm.aliases.items()}

    def _alias_version(self, alias: str) -> int | None:
        return self._aliases().get(alias)

    def _require_version(self, version: int) -> None:
        try:
            self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            raise LookupError(f"Model {self.model_name!r} has no version {version}") from exc

    def _version_info(self, version: int) -> RegisteredVersion:
        mv = self.client.get_model_version(self.model_name, str(version))
        return RegisteredVersion(
            version=int(mv.version),
            run_id=mv.run_id,
            model_uri=f"models:/{self.model_name}/{int(mv.version)}",
            aliases=tuple(sorted(mv.aliases)),
            tags=dict(mv.tags),
        )
