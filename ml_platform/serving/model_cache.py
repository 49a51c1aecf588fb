"""A serving host's local copy of the models it served, for a registry outage at start.

Every version a server loads from the registry is copied here (the MLflow model directory as the
registry gave it, and its contract), and each alias move records which version the alias named.
A server that starts while the registry is unreachable serves the alias's last recorded version
from this copy, loaded through the same skops type allow-list as from the registry, and says so
(`/health/ready`: degraded, and why); once the registry answers again it follows the alias as
always. Nothing else is ever loaded from here: only what the registry served this host.

Layout: <data_dir>/model_cache/<model_name>/v<version>/{model/, contract.json} and
alias-<alias>.json ({"version": n, "saved_at": t}); every write is a rename of a finished file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CachedModel:
    version: int
    model: Any
    contract: Any
    saved_at: float


class ModelCache:
    KEEP = 3  # copies kept besides the versions an alias names (the few a rollback may need)

    def __init__(self, root: str | os.PathLike, model_name: str):
        self.dir = Path(root) / model_name
        self.model_name = model_name

    def staging_dir(self) -> Path:
        """A fresh directory for `ModelRegistry.load_model(copy_to=...)` to fill."""
        path = self.dir / f".staging-{uuid.uuid4().hex}"
        path.mkdir(parents=True)
        return path

    def commit(self, version: int, staged: Path) -> None:
        """Make a filled staging directory the copy of `version` (a copy already there is the same
        registry artifact: kept), then drop copies no alias names beyond the newest KEEP."""
        final = self.dir / f"v{int(version)}"
        if final.exists():
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.rename(final)
        self.prune()

    def versions(self) -> list[int]:
        """The versions held, newest copy first."""
        held = [p for p in self.dir.glob("v*") if p.is_dir() and p.name[1:].isdigit()]
        return [int(p.name[1:]) for p in sorted(held, key=lambda p: p.stat().st_mtime, reverse=True)]

    def prune(self, keep: int | None = None) -> list[int]:
        """Remove the copies of versions no alias names, beyond the newest `keep` (default KEEP);
        returns the versions removed."""
        keep = self.KEEP if keep is None else keep
        named = set()
        for pointer in self.dir.glob("alias-*.json"):
            try:
                named.add(int(json.loads(pointer.read_text())["version"]))
            except (ValueError, KeyError, OSError):
                continue
        removed = [v for v in self.versions()[keep:] if v not in named]
        for version in removed:
            shutil.rmtree(self.dir / f"v{version}", ignore_errors=True)
        return removed

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def point(self, alias: str, version: int) -> None:
        """Record that `alias` named `version` (the copy a registry outage would serve)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".alias-{alias}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps({"version": int(version), "saved_at": time.time()}))
        tmp.replace(self.dir / f"alias-{alias}.json")

    def load(self, alias: str) -> CachedModel | None:
        """The alias's last recorded version from the local copy (None if there is none)."""
        from ml_platform.registry.loading import load_skops_model
        from ml_platform.training.contract import ModelContract

        try:
            pointer = json.loads((self.dir / f"alias-{alias}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        version = int(pointer["version"])
        where = self.dir / f"v{version}"
        if not (where / "contract.json").exists():
            return None
        model = load_skops_model(where / "model", f"{self.model_name} v{version} (local copy)")
        contract = ModelContract.from_json((where / "contract.json").read_text())
        return CachedModel(version, model, contract, float(pointer["saved_at"]))
