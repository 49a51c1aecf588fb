"""The stream worker's entry point (`ml-platform stream`): a worker wired from settings
(`build_worker`) and run until a signal (`run_worker`)."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import redis

from ml_platform import features as fr
from ml_platform.featurestore.online import RedisOnlineStore
from ml_platform.featurestore.streaming import StreamingUpdater
from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.seeding import seed_once
from ml_platform.serving.stream.worker import StreamWorker

_log = logging.getLogger(__name__)


def build_worker(
    settings, config: StreamConfig | None = None, *, client: redis.Redis | None = None, model_source=None,
    router=None,
) -> StreamWorker:
    """A worker wired from settings: Redis, online store, updater, and (unless `model_source` is
    given) a `ChampionWatcher` of the settings' registered model and an `ExperimentRouter` of the
    project's experiments loading versions the same way (neither started)."""
    from ml_platform.featurestore.redis_server import redis_client

    config = config or StreamConfig()
    client = client or redis_client(settings)
    # Larger write batches than the API's store: one upsert script per view and batch.
    online = RedisOnlineStore(client, project=settings.project, views=fr.FEATURE_VIEWS, batch_size=1000)
    updater = StreamingUpdater(client, settings.project, fr.FEATURE_VIEWS, trim_slack=config.trim_slack)
    if model_source is None:
        from ml_platform.registry import ModelRegistry
        from ml_platform.serving.champion import ChampionWatcher

        model_source = ChampionWatcher(
            ModelRegistry(settings.mlflow_tracking_uri, settings.model_name),
            poll_s=config.model_poll_s,
            scorer=config.scorer,
        )
        if router is None:
            from ml_platform.experiments.router import ExperimentRouter
            from ml_platform.experiments.store import ExperimentStore

            router = ExperimentRouter(ExperimentStore(client, settings.project), _cached_loader(model_source))
    return StreamWorker(client, online, updater, model_source, settings.project, config, router=router)


def _cached_loader(watcher):
    """Versions loaded as the watcher loads the champion, each once (an experiment's few arms)."""
    loaded: dict[int, Any] = {}

    def load(version: int):
        if version not in loaded:
            loaded[version] = watcher.loader(watcher.registry, version)
        return loaded[version]

    return load


def run_worker(
    settings,
    config: StreamConfig | None = None,
    *,
    stop: threading.Event | None = None,
    max_entries: int | None = None,
    until_idle: bool = False,
    log_every_s: float = 10.0,
) -> dict[str, Any]:
    """`ml-platform stream`: run one worker until SIGINT/SIGTERM (or `stop`, `max_entries`,
    `until_idle`); finishes the batch in hand before exiting. Returns the worker's stats."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # one OpenMP thread: much faster predict on a small shared machine
    config = config or StreamConfig()
    worker = build_worker(settings, config)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    worker.ensure_group()
    worker.ensure_online_views()
    if config.seed_history:
        record = seed_once(worker.client, worker.updater, worker.names, settings.raw_dir)
        _log.info("stream state seeded: %s", record)
    from ml_platform.serving.champion import ChampionWatcher  # (imports MLflow: only when run)

    watcher = worker.model_source if isinstance(worker.model_source, ChampionWatcher) else None
    if watcher is not None:
        watcher.start()
    if worker.router is not None:
        worker.router.start()
    reporter_stop = threading.Event()

    def report() -> None:
        while not reporter_stop.wait(log_every_s):
            _log.info("stream worker %s: %s", worker.consumer, worker.stats.as_dict())

    reporter = threading.Thread(target=report, name="stream-stats", daemon=True)
    reporter.start()
    try:
        worker.run(stop, max_entries=max_entries, until_idle=until_idle)
    finally:
        worker.close()
        reporter_stop.set()
        if watcher is not None:
            watcher.stop()
        if worker.router is not None:
            worker.router.stop()
    _log.info("stream worker %s stopped: %s", worker.consumer, worker.stats.as_dict())
    return worker.stats.as_dict()
