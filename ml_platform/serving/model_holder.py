"""The models an HTTP serving process holds: the champion it serves, and the ones it can swap to
at once.

Following the alias is `champion.ChampionWatcher`'s job (one registry call per poll; a new version
is loaded off the request path, in a thread, and swapped in with one reference assignment, so
requests in flight finish on the model they started with; a failed load keeps the old model
serving and is reported in `last_error`). The holder adds what an API needs on top: a few
versions kept in memory (the version served before and the `previous-champion` alias's version
stay loaded, so a rollback swaps instantly), the swap history, and the status /model reports.
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

from ml_platform.registry import CHAMPION, PREVIOUS_CHAMPION
from ml_platform.serving.champion import ChampionChange, ChampionWatcher, load_version, scoring_path
from ml_platform.serving.model_cache import ModelCache
from ml_platform.serving.scorer import ScoringPath

_log = logging.getLogger(__name__)

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

    `registry` is a `ModelRegistry`; `scorer` is passed to `champion.load_version` ("auto",
    "treelite" or "sklearn"); `keep` bounds how many versions stay in memory (>= 2).
    """

    registry: Any
    alias: str = CHAMPION
    previous_alias: str | None = PREVIOUS_CHAMPION
    scorer: str = "auto"
    keep: int = 3
    poll_interval_s: float = 1.0
    on_swap: Callable[[SwapEvent], None] | None = None
    pinned: Callable[[], set[int]] | None = None  # versions others serve (an experiment's arms): never evicted
    cache: ModelCache | None = None  # the host's local copy of what it served (registry outage at start)
    degraded: str | None = None  # why the model serving is not the registry's word (a local copy)
    previous: ServingModel | None = None
    swaps: list[SwapEvent] = field(default_factory=list)
    preload_error: str | None = None
    _loaded: OrderedDict[int, ServingModel] = field(default_factory=OrderedDict)
    _failed_preloads: dict[int, float] = field(default_factory=dict)
    _was_cached: bool = False

    def __post_init__(self) -> None:
        self._load_lock = threading.RLock()  # the alias watcher and the experiment router both load
        self.watcher: ChampionWatcher[ServingModel] = ChampionWatcher(
            self.registry,
            alias=self.alias,
            poll_s=self.poll_interval_s,
            loader=lambda registry, version: self.load(version),
            retry_after_s=LOAD_RETRY_S,
            on_change=self._swapped,
        )

    @property
    def current(self) -> ServingModel | None:
        """The model serving now (None until the alias is set and its version loaded)."""
        return self.watcher.current()

    @property
    def last_error(self) -> str | None:
        """The last poll's or load's error (e.g. the new champion failed to load: the old serves)."""
        return self.watcher.last_error

    @property
    def last_poll_at(self) -> float | None:
        return self.watcher.last_poll_at

    # ---- loading

    def load(self, version: int) -> ServingModel:
        """The version from memory, or loaded from the registry and prepared (parity-checked scorer)."""
        with self._load_lock:
            return self._load(version)

    def _load(self, version: int) -> ServingModel:
        cached = self._loaded.get(version)
        if cached is not None:
            self._loaded.move_to_end(version)
            self._was_cached = True
            return cached
        self._was_cached = False
        started = time.perf_counter()
        staged = self.cache.staging_dir() if self.cache is not None else None
        try:
            serving = ServingModel(load_version(self.registry, version, self.scorer, copy_to=staged), time.time(), 0.0)
        except BaseException:
            if staged is not None:
                self.cache.discard(staged)
            raise
        if staged is not None:
            self.cache.commit(version, staged)
        serving.load_seconds = time.perf_counter() - started
        _log.info("loaded model v%s in %.2f s (%s)", version, serving.load_seconds, serving.scoring.name)
        self._loaded[version] = serving
        self._evict()
        return serving

    def _evict(self) -> None:
        pinned = {m.version for m in (self.current, self.previous) if m is not None}
        if self.pinned is not None:
            pinned |= self.pinned()
        while len(self._loaded) > max(self.keep, 2, len(pinned)):
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
        before = len(self.swaps)
        self.watcher.check_now()
        if self.watcher.poll_error is None:
            self.degraded = None
        elif self.current is None:
            self._serve_local_copy()
        self._preload_previous()
        return self.swaps[-1] if len(self.swaps) > before else None

    def _serve_local_copy(self) -> None:
        """The registry is unreachable and nothing serves: the alias's last version from the cache."""
        if self.cache is None:
            return
        try:
            cached = self.cache.load(self.alias)
        except Exception as exc:  # noqa: BLE001 - a broken copy is reported, not served
            self.degraded = f"{self.watcher.poll_error}; the local copy could not be loaded: {type(exc).__name__}: {exc}"
            return
        if cached is None:
            return
        serving = ServingModel(scoring_path(cached.version, cached.model, cached.contract, self.scorer), time.time(), 0.0)
        if self.watcher.adopt(serving, cached.version):
            with self._load_lock:
                self._loaded[cached.version] = serving
            age_h = (time.time() - cached.saved_at) / 3600
            self.degraded = (f"{self.watcher.poll_error}; serving {self.alias} v{cached.version} from this host's "
                             f"local copy (recorded {age_h:.1f} h ago) until the registry answers")
            _log.warning(self.degraded)

    def _swapped(self, change: ChampionChange) -> None:
        self.previous = self._loaded.get(change.from_version) if change.from_version is not None else None
        if self.cache is not None:
            self.cache.point(self.alias, change.to_version)
        event = SwapEvent(
            from_version=change.from_version,
            to_version=change.to_version,
            at=change.at,
            preloaded=self._was_cached,
            swap_seconds=change.seconds,
        )
        self.swaps.append(event)
        del self.swaps[:-50]
        _log.info(
            "now serving %s v%s (was %s; %s in %.3f s)",
            self.alias,
            event.to_version,
            f"v{event.from_version}" if event.from_version else "none",
            "already in memory" if event.preloaded else "loaded",
            event.swap_seconds,
        )
        if self.on_swap is not None:
            self.on_swap(event)

    def _preload_previous(self) -> None:
        wanted = self.watcher.aliases.get(self.previous_alias) if self.previous_alias else None
        if wanted is None or wanted in self._loaded:
            return
        failed = self._failed_preloads.get(wanted)
        if failed is not None and time.monotonic() - failed < LOAD_RETRY_S:
            return
        try:
            self.load(wanted)
            self.preload_error = None
        except Exception as exc:  # noqa: BLE001 - a rollback target that fails to load is reported
            self._failed_preloads[wanted] = time.monotonic()
            self.preload_error = f"could not preload {self.previous_alias} v{wanted}: {type(exc).__name__}: {exc}"
            _log.warning(self.preload_error)

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll until `stop` is set; each poll runs in a thread so requests keep flowing."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:  # noqa: BLE001 - e.g. on_swap failed; keep polling
                _log.exception("polling the %s alias failed", self.alias)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.poll_interval_s)
            except TimeoutError:
                pass

    def status(self) -> dict[str, Any]:
        current = self.current
        return {
            "alias": self.alias,
            "serving": current.describe() if current else None,
            "previous_version": self.previous.version if self.previous else None,
            "loaded_versions": self.loaded_versions(),
            "last_poll_at": self.last_poll_at,
            "last_error": self.last_error,
            "preload_error": self.preload_error,
            "degraded": self.degraded,
            "poll_interval_s": self.poll_interval_s,
        }
