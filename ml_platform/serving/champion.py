"""The model a serving process scores with: the one way to load a registered version for serving,
and the one watcher that follows the `champion` alias.

- `load_registered(registry, version_or_alias)`: the estimator and its contract as a `LoadedModel`
  (the reference path: `LoadedModel.predict_proba` on an `assemble_features` frame).
- `load_version(registry, version, scorer="auto")`: that model prepared for serving, a
  `fast_scorer.ScoringPath` (`.loaded` the LoadedModel, `.contract`, `.version`; the fast path
  where it passes its parity check against scikit-learn, else the reference path).
- `alias_versions(registry)`: alias -> version in one registry call (what a poll costs).
- `ChampionWatcher`: polls the alias, loads the new version off the scoring path and swaps it in
  with one reference assignment when the alias moves (`check_now()` returns the `ChampionChange`);
  a failed load keeps the old model serving. Synchronous; driven by its own thread (`start`/`stop`,
  the stream worker) or by an event loop (`await watcher.watch(stop)`, each poll in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ml_platform.registry import CHAMPION, PREVIOUS_CHAMPION
from ml_platform.serving.scoring import LoadedModel

__all__ = [
    "CHAMPION",
    "PREVIOUS_CHAMPION",
    "ChampionChange",
    "ChampionWatcher",
    "alias_versions",
    "load_registered",
    "load_version",
]

_log = logging.getLogger(__name__)

M = TypeVar("M")  # what the watcher's loader returns (a ScoringPath by default)


def load_registered(registry, version_or_alias: int | str) -> LoadedModel:
    """A registered version (or the version an alias points at) as a LoadedModel: the
    scikit-learn estimator, its input contract and its version number."""
    version = int(registry.get_version(version_or_alias).version)
    model, contract = registry.load_model(version)
    return LoadedModel(version=version, model=model, contract=contract, loaded_at=time.time())


def load_version(registry, version: int, scorer: str = "auto", copy_to=None):
    """A registered version ready to score: a `fast_scorer.ScoringPath` holding the LoadedModel.

    scorer="auto": compiled request features + treelite where each passes its parity check
    against scikit-learn, else the reference path; "treelite": the same, an error if treelite
    cannot serve the model; "sklearn": the reference path only (`build_scoring_path`). With
    `copy_to`, the registry's artifacts are copied there too (`serving.model_cache`)."""
    model, contract = registry.load_model(int(version), copy_to=copy_to)
    return scoring_path(int(version), model, contract, scorer)


def scoring_path(version: int, model, contract, scorer: str = "auto"):
    """A loaded model and its contract, ready to score (see load_version)."""
    from ml_platform.serving.fast_scorer import build_scoring_path

    loaded = LoadedModel(version=int(version), model=model, contract=contract, loaded_at=time.time())
    return build_scoring_path(loaded, scorer=scorer)


def alias_versions(registry) -> dict[str, int]:
    """alias -> version of the registry's model, in one MLflow call ({} if the model is not
    registered yet). Other registry errors are raised (a poll must not read them as 'no alias')."""
    from mlflow.exceptions import MlflowException

    try:
        model = registry.client.get_registered_model(registry.model_name)
    except MlflowException as exc:
        if (
            "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", ""))
            or "not found" in str(exc).lower()
        ):
            return {}
        raise
    return {alias: int(version) for alias, version in model.aliases.items()}


@dataclass(frozen=True)
class ChampionChange:
    """The alias moved and the new version now serves."""

    from_version: int | None
    to_version: int
    at: float  # wall-clock time of the swap
    seconds: float  # from the start of the poll that saw the move to serving the new version


class ChampionWatcher(Generic[M]):
    """The model `alias` points at, followed by polling (one registry call per poll).

    `loader(registry, version)` loads a version (default: `load_version` with `scorer`); the
    previous model keeps serving while the new one loads, and keeps serving if the load fails
    (the error is in `last_error`; the version is tried again after `retry_after_s`, 0 = at the
    next poll). `on_change` is called with each `ChampionChange`. `aliases` holds the last poll's
    alias -> version map (e.g. to preload `PREVIOUS_CHAMPION`)."""

    def __init__(
        self,
        registry,
        alias: str = CHAMPION,
        poll_s: float = 3.0,
        loader: Callable[[Any, int], M] | None = None,
        *,
        scorer: str = "auto",
        retry_after_s: float = 0.0,
        on_change: Callable[[ChampionChange], None] | None = None,
    ) -> None:
        self.registry = registry
        self.alias = alias
        self.poll_s = float(poll_s)
        self.loader: Callable[[Any, int], M] = loader or (
            lambda reg, version: load_version(reg, version, scorer)
        )
        self.retry_after_s = float(retry_after_s)
        self.on_change = on_change
        self.aliases: dict[str, int] = {}
        self.last_error: str | None = None
        self.poll_error: str | None = None  # the last poll's error (None: the registry answered)
        self.last_poll_at: float | None = None
        self._model: M | None = None
        self._version: int | None = None
        self._failed: dict[int, float] = {}  # version -> monotonic time of its failed load
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> M | None:
        """The model serving now (None before the alias is first set and loaded)."""
        return self._model

    @property
    def version(self) -> int | None:
        return self._version

    def check_now(self) -> ChampionChange | None:
        """Poll the alias once; if it moved, load the version and swap it in. Returns the change,
        or None (no move, the alias is unset, or the load failed: see `last_error`)."""
        with self._lock:  # one poll at a time (the thread and an explicit call)
            noticed = time.perf_counter()
            try:
                self.aliases = alias_versions(self.registry)
            except Exception as exc:  # noqa: BLE001 - a registry hiccup must not stop serving
                self.last_error = self.poll_error = f"registry poll failed: {type(exc).__name__}: {exc}"
                _log.warning(self.last_error)
                return None
            self.poll_error = None
            self.last_poll_at = time.time()
            target = self.aliases.get(self.alias)
            if target is None:
                self.last_error = f"alias {self.alias!r} is not set in the registry" + (
                    "" if self._version is None else f"; still serving v{self._version}"
                )
                return None
            if target == self._version:
                return None
            failed = self._failed.get(target)
            if failed is not None and time.monotonic() - failed < self.retry_after_s:
                return None
            try:
                model = self.loader(self.registry, target)
            except Exception as exc:  # noqa: BLE001 - keep serving the old model
                self._failed[target] = time.monotonic()
                self.last_error = f"loading {self.alias} v{target} failed: {type(exc).__name__}: {exc}"
                _log.exception("loading %s v%s failed", self.alias, target)
                return None
            before = self._version
            self._model, self._version = model, target  # readers see the old or the new one
            self._failed.pop(target, None)
            self.last_error = None
            change = ChampionChange(before, target, time.time(), time.perf_counter() - noticed)
            _log.info("%s: %s -> v%s", self.alias, "none" if before is None else f"v{before}", target)
        if self.on_change is not None:
            self.on_change(change)
        return change

    def adopt(self, model: M, version: int) -> bool:
        """Serve `model` (version `version`) when nothing serves yet, e.g. a local copy while the
        registry is unreachable; the next poll that reaches the registry follows the alias again."""
        with self._lock:
            if self._model is not None:
                return False
            self._model, self._version = model, int(version)
            return True

    # ---- driving the polls

    def start(self) -> ChampionWatcher[M]:
        """Poll once now, then every `poll_s` seconds in a daemon thread."""
        self.check_now()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name=f"{self.alias}-watcher", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - e.g. on_change failed; keep polling
                _log.exception("polling the %s alias failed", self.alias)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll every `poll_s` seconds until `stop` is set, each poll in a worker thread (so an
        event loop keeps serving while a version loads)."""
        while not stop.is_set():
            try:
                await asyncio.to_thread(self.check_now)
            except Exception:  # noqa: BLE001
                _log.exception("polling the %s alias failed", self.alias)
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.poll_s)
            except TimeoutError:
                pass
