"""The models a serving process holds: the champion it serves, and the ones it can swap to at once.

Models are loaded once (never per request). A watcher polls the registry's aliases (one cheap
MLflow call) every `poll_interval_s`; when `champion` moves, the new version is loaded and
prepared off the request path (in a thread), then swapped in with one reference assignment, so
requests in flight finish on the model they started with and none is dropped. The version served
before and the `previous-champion` alias's version stay loaded, so a rollback swaps instantly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ml_platform.serving.fast_scorer import ScoringPath, build_scoring_path
from ml_platform.serving.scoring import LoadedModel

_log = logging.getLogger(__name__)

CHAMPION = "champion"
PREVIOUS_CHAMPION = "previous-champion"
# A version that failed to load is retried after this long, not on every poll.
LOAD_RETRY_S = 30.0


@dataclass
class ServingModel:
    """One model version ready to serve: its scoring path (contract, estimator, fast scorer)."""

    scoring: ScoringPath
    loaded_at: float
    load_seconds: float

    @property
    def version(self) -> int:
        return self.scoring.version

    @property
    def contract(self):
        return self.scoring.contract

    def describe(self) -> dict[str, Any]:
        return {
            **self.scoring.describe(),
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 3),
        }


@dataclass
class SwapEvent:
    from_version: int | None
    to_version: int
    at: float
    preloaded: bool  # True when the new version was already in memory (an instant swap)
    swap_seconds: float  # from the start of the poll that saw the move to serving the new version


@dataclass
class ModelHolder:
    """Holds the served champion and a few loaded versions; `refresh()` follows the alias.

    `registry` is a `ModelRegistry`; `scorer` is passed to `build_scoring_path` ("auto",
    "treelite" or "sklearn"); `keep` bounds how many versions stay in memory (>= 2).
    """

    registry: Any
    alias: str = CHAMPION
    previous_alias: str | None = PREVIOUS_CHAMPION
    scorer: str = "auto"
    keep: int = 3
    poll_interval_s: float = 1.0
    on_swap: Callable[[SwapEvent], None] | None = None
    current: ServingModel | None = None
    previous: ServingModel | None = None
    swaps: list[SwapEvent] = field(default_factory=list)
    last_poll_at: float | None = None
    last_error: str | None = None
    _loaded: OrderedDict[int, ServingModel] = field(default_factory=OrderedDict)
    _failed: dict[int, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- registry

    def aliases(self) -> dict[str, int]:
        """alias -> version, in one registry call (the poll)."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.registry.client.get_registered_model(self.registry.model_name)
        except MlflowException as exc:
            if (
                "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))
                or "not found" in str(exc).lower()
            ):
                return {}
            raise
        return {alias: int(version) for alias, version in model.aliases.items()}

    def load(self, version: int) -> ServingModel:
        """The version from memory, or loaded from the registry and prepared (parity-checked scorer)."""
        cached = self._loaded.get(version)
        if cached is not None:
            self._loaded.move_to_end(version)
            return cached
        started = time.perf_counter()
        model, contract = self.registry.load_model(version)
        loaded = LoadedModel(version=int(version), model=model, contract=contract, loaded_at=time.time())
        serving = ServingModel(build_scoring_path(loaded, self.scorer), time.time(), 0.0)
        serving.load_seconds = time.perf_counter() - started
        _log.info("loaded model v%s in %.2f s (%s)", version, serving.load_seconds, serving.scoring.name)
        self._loaded[version] = serving
        self._evict()
        return serving

    def _evict(self) -> None:
        pinned = {m.version for m in (self.current, self.previous) if m is not None}
        while len(self._loaded) > max(self.keep, 2):
            victim = next((v for v in self._loaded if v not in pinned), None)
            if victim is None:
                break
            del self._loaded[victim]

    def loaded_versions(self) -> list[int]:
        return list(self._loaded)

    # ---- following the alias

    def refresh(self) -> SwapEvent | None:
        """One poll: if the alias moved, load (unless in memory) and swap. Also preloads the
        previous-champion version so a rollback is instant. Returns the swap, if any. Errors are
        recorded in `last_error` and the current model keeps serving."""
        with self._lock:  # one refresh at a time (the watcher and an explicit call)
            noticed = time.perf_counter()
            try:
                aliases = self.aliases()
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                self.last_error = f"registry poll failed: {type(exc).__name__}: {exc}"
                _log.warning(self.last_error)
                return None
            self.last_poll_at = time.time()
            target = aliases.get(self.alias)
            event = None
            if target is not None and (self.current is None or self.current.version != target):
                event = self._swap_to(target, noticed)
            elif target is None and self.current is not None and self.last_error is None:
                _log.warning("alias %r is not set; still serving v%s", self.alias, self.current.version)
                self.last_error = (
                    f"alias {self.alias!r} is not set in the registry; serving the last champion"
                )
            wanted = aliases.get(self.previous_alias) if self.previous_alias else None
            if wanted is not None and wanted not in self._loaded and self._may_try(wanted):
                try:
                    self.load(wanted)
                except Exception as exc:  # noqa: BLE001
                    self._failed[wanted] = time.monotonic()
                    _log.warning("could not preload %s v%s: %s", self.previous_alias, wanted, exc)
            return event

    def _may_try(self, version: int) -> bool:
        failed = self._failed.get(version)
        return failed is None or time.monotonic() - failed > LOAD_RETRY_S

    def _swap_to(self, version: int, noticed: float) -> SwapEvent | None:
        preloaded = version in self._loaded
        if not preloaded and not self._may_try(version):
            return None
        try:
            model = self.load(version)
        except Exception as exc:  # noqa: BLE001 - keep serving the current model
            self._failed[version] = time.monotonic()
            self.last_error = f"could not load {self.alias} v{version}: {type(exc).__name__}: {exc}"
            _log.error("%s; still serving %s", self.last_error, self.current and f"v{self.current.version}")
            return None
        before = self.current
        self.previous, self.current = before, model  # the swap: readers see one or the other
        self._failed.pop(version, None)
        self.last_error = None
        event = SwapEvent(
            from_version=before.version if before else None,
            to_version=version,
            at=time.time(),
            preloaded=preloaded,
            swap_seconds=time.perf_counter() - noticed,
        )
        self.swaps.append(event)
        del self.swaps[:-50]
        _log.info(
            "now serving %s v%s (was %s; %s in %.3f s)",
            self.alias,
            version,
            f"v{event.from_version}" if event.from_version else "none",
            "already in memory" if preloaded else "loaded",
            event.swap_seconds,
        )
        if self.on_swap is not None:
            self.on_swap(event)
        return event

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; each poll runs in a thread so requests keep flowing."""
        while not stop.is_set():
            await asyncio.to_thread(self.refresh)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.poll_interval_s)
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        return {
            "alias": self.alias,
            "serving": self.current.describe() if self.current else None,
            "previous_version": self.previous.version if self.previous else None,
            "loaded_versions": self.loaded_versions(),
            "last_poll_at": self.last_poll_at,
            "last_error": self.last_error,
            "poll_interval_s": self.poll_interval_s,
        }
