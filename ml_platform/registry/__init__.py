"""The MLflow model registry as the platform uses it: register with lineage, promote by alias,
roll back, load what serves.

The registered model's `champion` alias is the single source of truth for what is live;
`challenger` marks the newest candidate and `previous-champion` the version a rollback returns to.

  model_registry.py  ModelRegistry: registering with lineage, promotion, rollback, loading
  audit.py           the aliases and their audit trail (MLflow keeps no history of alias moves)
  promotion.py       the promotion rule (strictly better by more than the margin), pure
  loading.py         loading skops models against the platform's type allow-list
  lineage.py         code version, pinned requirements, MLflow UI links
  _mlflow.py         the one `import mlflow` (~4 s: never at package import of ml_platform)
"""

from ml_platform.registry.audit import (
    AUDIT_TAG_PREFIX,
    CHALLENGER,
    CHAMPION,
    PREVIOUS_CHAMPION,
    AliasAuditTrail,
)
from ml_platform.registry.lineage import MODEL_REQUIREMENTS, current_code_version, model_pip_requirements
from ml_platform.registry.loading import TRUSTED_MODEL_TYPES
from ml_platform.registry.model_registry import MODEL_ARTIFACT_NAME, ModelRegistry, RegisteredVersion
from ml_platform.registry.promotion import PromotionDecision

__all__ = [
    "AUDIT_TAG_PREFIX",
    "CHALLENGER",
    "CHAMPION",
    "MODEL_ARTIFACT_NAME",
    "MODEL_REQUIREMENTS",
    "PREVIOUS_CHAMPION",
    "TRUSTED_MODEL_TYPES",
    "AliasAuditTrail",
    "ModelRegistry",
    "PromotionDecision",
    "RegisteredVersion",
    "current_code_version",
    "model_pip_requirements",
]
