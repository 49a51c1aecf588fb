"""`ModelRegistry`: one registered model in one MLflow store: register versions with their
lineage, promote and roll back by alias (through the audit trail), load what serves."""

from __future__ import annotations

import json
import math
import numbers
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ml_platform.redaction import redact_url
from ml_platform.registry import lineage
from ml_platform.registry._mlflow import MlflowClient, MlflowException, fluent, infer_signature, mlflow
from ml_platform.registry.audit import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, AliasAuditTrail
from ml_platform.registry.loading import LOADED_VERSIONS, load_skops_model
from ml_platform.registry.promotion import PromotionDecision, check_promotion_metric, decide
from ml_platform.settings import DEFAULT_MODEL_NAME, DEFAULT_PROMOTION_MARGIN, DEFAULT_PROMOTION_METRIC
from ml_platform.training.contract import CONTRACT_FILE, ModelContract
from ml_platform.training.evaluate import evaluate

MODEL_ARTIFACT_NAME = "model"


@dataclass(frozen=True)
class RegisteredVersion:
    """One model version in the registry and where its model lives."""

    version: int
    run_id: str
    model_uri: str
    aliases: tuple[str, ...] = ()
    tags: dict[str, str] = field(default_factory=dict)


class ModelRegistry:
    """One registered model in one MLflow store: versions with lineage, aliases with an audit trail."""

    def __init__(
        self, tracking_uri: str, model_name: str = DEFAULT_MODEL_NAME, artifact_root: str | Path | None = None
    ):
        if not tracking_uri:
            raise ValueError(
                "ModelRegistry needs an explicit tracking_uri (e.g. sqlite:////abs/path/mlflow.db)"
            )
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.artifact_root = self._artifact_location(tracking_uri, artifact_root)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.audit = AliasAuditTrail(self.client, model_name)
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
                f"Tracking URI {redact_url(tracking_uri)!r} is a database: pass artifact_root (a directory or "
                "object-store URI) so artifacts do not land in the current directory"
            )
        return None  # an MLflow tracking server decides

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
        artifact_dirs: dict[str, Path] | None = None,
    ) -> RegisteredVersion:
        """Log one MLflow run (params incl. the model type, metrics, lineage tags, the model,
        contract.json, and each of `artifact_dirs` as the artifact folder of its name), register it
        as a new version and point the `challenger` alias at it."""
        code_version = code_version or lineage.current_code_version()
        tags = {"data_version": data_version, "code_version": code_version, "model_type": contract.model_type}
        with (
            fluent(self.tracking_uri),
            mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name) as run,
        ):
            run_id = run.info.run_id
            mlflow.set_tags(
                {
                    **tags,
                    "model_name": self.model_name,
                    "feature_refs": json.dumps(list(contract.feature_refs)),
                }
            )
            flat_params = {
                k: ("None" if v is None else str(v))[:6000] for k, v in lineage.flat_scalars(params).items()
            }
            mlflow.log_params(
                {
                    **flat_params,
                    "model_type": contract.model_type,
                    "decision_threshold": contract.decision_threshold,
                }
            )
            mlflow.log_metrics(
                {
                    k: float(v)
                    for k, v in lineage.flat_scalars(metrics).items()
                    if isinstance(v, numbers.Real) and math.isfinite(v)
                }
            )
            mlflow.log_text(json.dumps(metrics, indent=2, default=lineage.json_default), "metrics.json")
            mlflow.log_text(contract.to_json(), CONTRACT_FILE)
            for artifact_path, local_dir in (artifact_dirs or {}).items():
                mlflow.log_artifacts(str(local_dir), artifact_path=artifact_path)

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
                pip_requirements=lineage.model_pip_requirements(),
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
                tags={**tags, "run_id": run_id},
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

    # --- aliases (recorded in the audit trail) ------------------------------------------------
    def set_alias(
        self, alias: str, version: int | None, who: str | None = None, why: str = "", action: str = "set"
    ) -> dict[str, Any]:
        """See `AliasAuditTrail.set_alias`: move `alias` (None removes it) and record who/when/why."""
        return self.audit.set_alias(alias, version, who=who, why=why, action=action)

    def alias_history(self, alias: str | None = None) -> list[dict[str, Any]]:
        """Every recorded alias move, oldest first (optionally only those of `alias`)."""
        return self.audit.alias_history(alias)

    def champion_lineage(self) -> list[int]:
        """Champion versions replayed from the audit trail, current last."""
        return self.audit.champion_lineage()

    # --- promotion and rollback ---------------------------------------------------------------
    def promote_if_better(
        self,
        challenger_version: int,
        heldout_frame: pd.DataFrame,
        metric: str = DEFAULT_PROMOTION_METRIC,
        margin: float = DEFAULT_PROMOTION_MARGIN,
        who: str | None = None,
        why: str = "",
    ) -> PromotionDecision:
        """Promote the challenger iff it beats the champion by strictly more than `margin` on
        `metric` (`promotion.decide`), both scored on the same held-out frame, each through its own
        contract. No champion yet: promote. The decision is tagged on the challenger version."""
        check_promotion_metric(metric)
        challenger_version = int(challenger_version)
        champion = self.champion()
        champion_before = champion.version if champion else None
        challenger_model, challenger_contract = self.load_model(challenger_version)
        challenger_metric = evaluate(challenger_model, challenger_contract, heldout_frame)[metric]
        champion_metric = None

        if champion is not None and champion.version == challenger_version:
            promoted, reason = False, f"v{challenger_version} is already the champion"
        else:
            if champion is not None and challenger_metric is not None:
                champion_model, champion_contract = self.load_model(champion.version)
                champion_metric = evaluate(champion_model, champion_contract, heldout_frame)[metric]
            promoted, reason = decide(
                metric, float(margin), challenger_metric, champion_metric, champion_before
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
            self.promote(challenger_version, who=who, why=why)
        self.client.set_model_version_tag(
            self.model_name, str(challenger_version), "promotion_decision", json.dumps(decision.to_dict())
        )
        return decision

    def promote(self, version: int, who: str | None = None, why: str = "") -> int | None:
        """Make `version` the champion (audited); the champion it replaces becomes
        `previous-champion` (serving processes keep it loaded for an instant rollback). Returns
        the replaced champion's version (None if there was none)."""
        version = int(version)
        self.audit.require_version(version)
        before = self.audit.alias_version(CHAMPION)
        if before == version:
            return before
        if before is not None:
            self.set_alias(PREVIOUS_CHAMPION, before, who=who, why=why, action="promote")
        self.set_alias(CHAMPION, version, who=who, why=why, action="promote")
        return before

    def rollback(self, who: str | None = None, why: str = "") -> tuple[int, int]:
        """Move `champion` back to the previous champion; returns (from_version, to_version).

        Repeated rollbacks walk further back through the champion lineage; `previous-champion`
        then points at the champion before the restored one (or is removed when there is none).
        """
        current = self.audit.alias_version(CHAMPION)
        if current is None:
            raise RuntimeError(f"Cannot roll back {self.model_name!r}: it has no champion")
        lineage_ = self.champion_lineage()
        if not lineage_ or lineage_[-1] != current:
            raise RuntimeError(
                f"Cannot roll back {self.model_name!r}: champion v{current} was not set through the platform "
                f"(audit lineage {lineage_}); set it with ModelRegistry.set_alias"
            )
        if len(lineage_) < 2:
            raise RuntimeError(
                f"Cannot roll back {self.model_name!r}: champion v{current} has no previous champion"
            )
        target = lineage_[-2]
        why = why or "rollback"
        self.set_alias(CHAMPION, target, who=who, why=why, action="rollback")
        self.set_alias(
            PREVIOUS_CHAMPION,
            lineage_[-3] if len(lineage_) >= 3 else None,
            who=who,
            why=why,
            action="rollback",
        )
        return current, target

    # --- reading ------------------------------------------------------------------------------
    def champion(self) -> RegisteredVersion | None:
        """The version serving now, or None before the first promotion."""
        version = self.audit.alias_version(CHAMPION)
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

    def download_run_artifacts(self, alias_or_version: int | str, artifact_path: str, dst: Path) -> Path | None:
        """The artifact folder `artifact_path` of a version's run, downloaded into `dst` (None if
        the run has no such folder, e.g. a version registered before it was logged)."""
        version = self._resolve(alias_or_version)
        run_id = self.client.get_model_version(self.model_name, str(version)).run_id
        if not self.client.list_artifacts(run_id, artifact_path):
            return None
        dst.mkdir(parents=True, exist_ok=True)
        return Path(self.client.download_artifacts(run_id, artifact_path, str(dst)))

    def load_model(self, alias_or_version: int | str, copy_to: Path | None = None) -> tuple[Any, ModelContract]:
        """The scikit-learn model of a version (or alias) and its contract.

        The skops file is loaded with the platform's own type allow-list (TRUSTED_MODEL_TYPES);
        a model holding any other type is refused rather than executed. With `copy_to`, the
        downloaded model directory (`model/`) and the contract (`contract.json`) are copied there
        (a serving host's local copy, `serving.model_cache`). Without it, a version this process
        loaded before is not downloaded again (`loading.LOADED_VERSIONS`).
        """
        version = self._resolve(alias_or_version)
        key = None
        if copy_to is None:  # loaded before in this process: the same object (LOADED_VERSIONS)
            run_id = self.client.get_model_version(self.model_name, str(version)).run_id
            key = (self.tracking_uri, self.model_name, version, run_id)
            if (found := LOADED_VERSIONS.get(key)) is not None:
                return found
        with tempfile.TemporaryDirectory() as tmp, fluent(self.tracking_uri):
            local = Path(
                mlflow.artifacts.download_artifacts(artifact_uri=self.model_uri(version), dst_path=tmp)
            )
            model = load_skops_model(local, f"{self.model_name} v{version}")
            if copy_to is not None:
                shutil.copytree(local, Path(copy_to) / "model")
        contract = self.get_contract(version)
        if copy_to is not None:
            (Path(copy_to) / "contract.json").write_text(contract.to_json())
        if key is not None:
            LOADED_VERSIONS.put(key, model, contract)
        return model, contract

    # --- where to find a version --------------------------------------------------------------
    def model_uri(self, version: int) -> str:
        return f"models:/{self.model_name}/{int(version)}"

    def model_ui_path(self, version: int) -> str:
        """The version's page in MLflow's UI, relative to the UI root (`#/models/<name>/versions/<v>`)."""
        return lineage.model_ui_path(self.model_name, version)

    def run_ui_path(self, run_id: str) -> str:
        """The run's page in MLflow's UI, relative to the UI root."""
        return lineage.run_ui_path(self.experiment_id, run_id)

    def ui_url(self, path: str) -> str | None:
        """`path` under the tracking server when the tracking URI is http(s), else None."""
        return lineage.ui_url(self.tracking_uri, path)

    # --- helpers ------------------------------------------------------------------------------
    def _resolve(self, alias_or_version: int | str) -> int:
        if isinstance(alias_or_version, int) or str(alias_or_version).isdigit():
            version = int(alias_or_version)
            self.audit.require_version(version)
            return version
        version = self.audit.alias_version(str(alias_or_version))
        if version is None:
            raise LookupError(
                f"Model {self.model_name!r} has no alias {alias_or_version!r}; "
                f"known aliases: {sorted(self.audit.aliases())}"
            )
        return version

    def _version_info(self, version: int) -> RegisteredVersion:
        mv = self.client.get_model_version(self.model_name, str(version))
        return RegisteredVersion(
            version=int(mv.version),
            run_id=mv.run_id,
            model_uri=self.model_uri(int(mv.version)),
            aliases=tuple(sorted(mv.aliases)),
            tags=dict(mv.tags),
        )
