"""Aliases of one registered model with their audit trail.

MLflow keeps no history of alias moves (mlflow/mlflow#2169), so every move goes through
`AliasAuditTrail.set_alias`, which writes an audit record as registered-model tag `audit.NNNNNN`
(and the same record on the versions involved). The champion lineage is replayed from those
records: promotions push, rollbacks pop, so repeated rollbacks walk back through past champions.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from ml_platform.registry._mlflow import MlflowClient, MlflowException
from ml_platform.registry.lineage import default_user

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS_CHAMPION = "previous-champion"
AUDIT_TAG_PREFIX = "audit."

_log = logging.getLogger("ml_platform.registry")


class AliasAuditTrail:
    """The aliases of `model_name` in one MLflow registry, every move recorded (who/when/why)."""

    def __init__(self, client: MlflowClient, model_name: str):
        self.client = client
        self.model_name = model_name

    def set_alias(
        self, alias: str, version: int | None, who: str | None = None, why: str = "", action: str = "set"
    ) -> dict[str, Any]:
        """Point `alias` at `version` (None removes the alias) and record the move; returns the
        audit record. Every alias move of the platform goes through here, so `alias_history()` is
        complete. The move happens first, then the record (MLflow has no transactions); the
        sequence number assumes one writer at a time (one training/promotion run per model)."""
        who = who or default_user()
        before = self.alias_version(alias)
        if version is not None:
            version = int(version)
            self.require_version(version)
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
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
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

    def aliases(self) -> dict[str, int]:
        try:
            rm = self.client.get_registered_model(self.model_name)
        except MlflowException:
            return {}
        return {a: int(v) for a, v in rm.aliases.items()}

    def alias_version(self, alias: str) -> int | None:
        return self.aliases().get(alias)

    def require_version(self, version: int) -> None:
        try:
            self.client.get_model_version(self.model_name, str(version))
        except MlflowException as exc:
            raise LookupError(f"Model {self.model_name!r} has no version {version}") from exc
