"""A tiny but real platform for serving tests and benchmarks: generated events, offline feature
tables, two trained + registered model versions in a SQLite MLflow store (v1 the previous champion,
v2 the champion) and the online store materialized into the real Redis under a unique project prefix.

Use the `tiny_platform` fixture (module scope; import it into a test module), or
`build_tiny_platform(root)` + `TinyPlatform.cleanup()` directly (bench/). Everything lives under
`root` except the Redis keys, which all start with `<project>:` and are deleted on cleanup.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Self

import pandas as pd
import pytest
import redis

from ml_platform import features as fr
from ml_platform.featurestore.redis_server import free_port
from ml_platform.settings import Settings

TEST_REDIS_URL = os.environ.get("ML_PLATFORM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
MODEL_NAME = "fraud_detector"
REPO_ROOT = Path(__file__).resolve().parent.parent

# v1 reads only the card holder's views (a different contract from v2, so a swap changes which
# features are looked up too); v2 reads every model feature.
V1_FEATURE_REFS = [
    *fr.user_transaction_stats.feature_refs(),
    "user_profile:account_age_days",
    "user_profile:home_country",
]
SMALL_CONFIG = {"n_users": 400, "n_merchants": 120, "days": 20, "fraud_rate": 0.03, "label_maturity_days": 1}


def unique_project(prefix: str = "test_serving") -> str:
    """A Redis key prefix no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def delete_project_keys(client: redis.Redis, project: str) -> int:
    """Delete every Redis key of `project` (online store, prediction log, ...)."""
    deleted = 0
    keys = list(client.scan_iter(match=f"{project}:*", count=1000))
    for start in range(0, len(keys), 500):
        deleted += client.unlink(*keys[start : start + 500])
    return deleted


def serving_settings(root: Path, project: str, redis_url: str = TEST_REDIS_URL, tenant: Any = None) -> Settings:
    """Settings for a platform living under `root` with its Redis keys under `project:`: embedded
    MLflow (SQLite under `root`), or, with a production `tenant` (production_services), the
    tenant's tracking server, ACL user, model name and Dagster database."""
    data_dir = Path(root).resolve() / "data"
    if tenant is not None:
        return Settings(
            data_dir=data_dir,
            dagster_home=Path(root).resolve() / "dagster_home",
            mlflow_tracking_uri=tenant.mlflow_url,
            redis_url=tenant.redis_url,
            model_name=tenant.model_name,
            project=tenant.project,
            dagster_postgres_url=tenant.dagster_postgres_url,
        )
    return Settings(
        data_dir=data_dir,
        dagster_home=Path(root).resolve() / "dagster_home",
        mlflow_tracking_uri=f"sqlite:///{data_dir / 'mlflow' / 'mlflow.db'}",
        redis_url=redis_url,
        model_name=MODEL_NAME,
        project=project,
    )


@dataclass
class TinyPlatform:
    """What `build_tiny_platform` made, and the handles to use it."""

    root: Path
    settings: Settings
    project: str
    store: Any  # FeatureStore (offline + online)
    online: Any  # RedisOnlineStore
    registry: Any  # ModelRegistry
    redis: redis.Redis
    versions: dict[int, Any]  # version -> RegisteredVersion
    events: pd.DataFrame  # every raw transaction
    materialized_as_of: datetime
    timings: dict[str, float] = field(default_factory=dict)

    def known_pair(self) -> tuple[int, int]:
        """(user_id, merchant_id) of the newest event: present in every online view."""
        last = self.events.sort_values(fr.EVENT_TS).iloc[-1]
        return int(last["user_id"]), int(last["merchant_id"])

    def transaction(self, **overrides: Any) -> dict[str, Any]:
        """A valid /predict body for a known card holder and merchant (JSON-ready)."""
        user_id, merchant_id = self.known_pair()
        body = {
            "transaction_id": f"req-{uuid.uuid4().hex[:12]}",
            "user_id": user_id,
            "merchant_id": merchant_id,
            "merchant_category": "electronics",
            "amount": 123.45,
            "country": "DE",
            "device": "desktop",
            "channel": "online",
            "event_timestamp": datetime.now(UTC).isoformat(),
        }
        body.update(overrides)
        return body

    def cleanup(self) -> None:
        delete_project_keys(self.redis, self.project)
        self.online.close()
        self.redis.close()


def _train_and_register(registry, store, raw_dir: Path, refs: list[str], params: dict, run_name: str):
    from ml_platform.sources.raw_events import labelled_events, latest_label_time
    from ml_platform.training import ModelContract, data_version, evaluate, time_split, train_model
    from ml_platform.training.dataset import build_training_frame

    as_of = latest_label_time(raw_dir)
    frame = build_training_frame(store, labelled_events(raw_dir, as_of), refs)
    split = time_split(frame, as_of=as_of)
    contract = ModelContract.from_features(feature_refs=refs)
    model, contract = train_model(split.train, split.validation, contract, params=params, random_state=0)
    return registry.log_and_register(
        model,
        contract,
        metrics={"test": evaluate(model, contract, split.test)},
        params=params,
        data_version=data_version(split.train),
        code_version="test",
        training_frame_sample=split.train.head(20),
        run_name=run_name,
        who="fixture",
    )


def build_tiny_platform(
    root: str | Path,
    *,
    project: str | None = None,
    redis_url: str = TEST_REDIS_URL,
    config: dict | None = None,
    v1_params: dict | None = None,
    v2_params: dict | None = None,
    tenant: Any = None,
) -> TinyPlatform:
    """Generate events ending yesterday, build the offline views, train and register v1 (fewer
    features) and v2 (all features), make v1 then v2 champion (so v1 is the previous champion) and
    materialize the online store as of now. ~15 s with the default small config. With a production
    `tenant` (production_services.production_tenant), on its servers."""
    from threadpoolctl import threadpool_limits

    from ml_platform.featurestore.online import RedisOnlineStore
    from ml_platform.featurestore.redis_server import client_from_url
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.registry import CHAMPION, PREVIOUS_CHAMPION, ModelRegistry
    from ml_platform.sources.generator import GeneratorConfig, write_dataset
    from ml_platform.sources.raw_events import all_partition_days, read_days

    root = Path(root).resolve()
    if tenant is not None:
        project, redis_url = tenant.project, tenant.redis_url
    project = project or unique_project()
    settings = serving_settings(root, project, redis_url, tenant=tenant)
    settings.ensure_dirs()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    cfg = {**SMALL_CONFIG, **(config or {})}
    days = int(cfg.pop("days"))
    # Events end yesterday (UTC), so today's requests see features well within every view's TTL.
    start = datetime.now(UTC).date() - timedelta(days=days)
    gen = GeneratorConfig(start=start, days=days, **cfg)
    write_dataset(gen, settings.raw_dir)
    timings["generate_s"] = time.perf_counter() - t

    client = client_from_url(redis_url)
    online = RedisOnlineStore(client, project=project, views=fr.FEATURE_VIEWS)
    store = FeatureStore(settings.data_dir, duckdb_threads=1, online_store=online, project=project)
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    t = time.perf_counter()
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            store.materialize_offline(view.name)
    timings["offline_s"] = time.perf_counter() - t

    registry = ModelRegistry(settings.mlflow_tracking_uri, settings.model_name)
    t = time.perf_counter()
    with threadpool_limits(limits=1):
        v1 = _train_and_register(
            registry,
            store,
            settings.raw_dir,
            V1_FEATURE_REFS,
            v1_params or {"max_iter": 20},
            "v1-user-features",
        )
        v2 = _train_and_register(
            registry,
            store,
            settings.raw_dir,
            list(fr.MODEL_FEATURE_REFS),
            v2_params or {"max_iter": 40},
            "v2-all",
        )
    registry.set_alias(CHAMPION, v1.version, who="fixture", why="first champion", action="promote")
    registry.set_alias(PREVIOUS_CHAMPION, v1.version, who="fixture", why="v2 promoted", action="promote")
    registry.set_alias(CHAMPION, v2.version, who="fixture", why="v2 beats v1", action="promote")
    timings["train_register_s"] = time.perf_counter() - t

    t = time.perf_counter()
    as_of = datetime.now(UTC)
    store.materialize(as_of=as_of)
    timings["materialize_s"] = time.perf_counter() - t
    events = read_days(settings.raw_dir, all_partition_days(settings.raw_dir))
    return TinyPlatform(
        root=root,
        settings=settings,
        project=project,
        store=store,
        online=online,
        registry=registry,
        redis=client,
        versions={v1.version: v1, v2.version: v2},
        events=events,
        materialized_as_of=as_of,
        timings=timings,
    )


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """os.environ with `values` set, restored on exit (a module-scoped monkeypatch)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def tiny_platform(request, tmp_path_factory):
    """A module's own tiny platform (its own MLflow store and Redis project), cleaned up after. With
    ML_PLATFORM_TEST_PROFILE=production: on the session's MLflow tracking server, with its own
    Redis ACL user (allowed only its key prefix), model name and PostgreSQL database."""
    from production_services import PRODUCTION, production_tenant

    with contextlib.ExitStack() as stack:
        tenant = None
        if PRODUCTION:
            server = request.getfixturevalue("mlflow_tracking_server")
            admin = redis.Redis.from_url(TEST_REDIS_URL)
            stack.callback(admin.close)
            tenant = stack.enter_context(production_tenant(admin, server.url, prefix="test_serving"))
            # as a deployment has them: Dagster's resources refer to the variables (never the values)
            stack.enter_context(environment({"REDIS_URL": tenant.redis_url, "MLFLOW_TRACKING_URI": tenant.mlflow_url}))
        platform = build_tiny_platform(tmp_path_factory.mktemp("platform"), tenant=tenant)
        try:
            yield platform
        finally:
            platform.cleanup()


@pytest.fixture(scope="module")
def experiment_api(tiny_platform):
    """The module's tiny platform served in process, with the experiment router refreshing every
    0.1 s (and the champion polled every 0.2 s)."""
    from ml_platform.serving.api import ServingConfig, create_app
    from ml_platform.serving.api.testing import InProcessClient

    app = create_app(tiny_platform.settings, ServingConfig(poll_interval_s=0.2, experiment_refresh_s=0.1))
    with InProcessClient(app) as client:
        yield client


# --------------------------------------------------------------------------- a real server


def settings_to_json(settings: Settings) -> str:
    return json.dumps(
        {
            "data_dir": str(settings.data_dir),
            "dagster_home": str(settings.dagster_home),
            "mlflow_tracking_uri": settings.mlflow_tracking_uri,
            "redis_url": settings.redis_url,
            "model_name": settings.model_name,
            "project": settings.project,
        }
    )


_SERVER_CODE = """
import json, sys
from pathlib import Path
from ml_platform.settings import Settings
from ml_platform.serving.api import ServingConfig, run_server
s = json.loads(sys.argv[1])
settings = Settings(data_dir=Path(s["data_dir"]), dagster_home=Path(s["dagster_home"]),
                    mlflow_tracking_uri=s["mlflow_tracking_uri"], redis_url=s["redis_url"],
                    model_name=s["model_name"], project=s["project"])
run_server(settings, host="127.0.0.1", port=int(sys.argv[2]), config=ServingConfig(**json.loads(sys.argv[3])))
"""


class ServerProcess:
    """`run_server` in a child process on a free loopback port (stopped with SIGTERM)."""

    def __init__(
        self, settings: Settings, port: int | None = None, log_path: Path | None = None, **config: Any
    ):
        self.settings = settings
        self.port = port or free_port()
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, ready_path: str = "/health/ready") -> Self:
        """Start and wait until `ready_path` answers 200 (/health: up, whether ready or not)."""
        import httpx

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SERVER_CODE,
                settings_to_json(self.settings),
                str(self.port),
                json.dumps(self.config),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(self.url + ready_path, timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server on port {self.port} not ready within {timeout} s; log: {self.log_path}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------- a Redis outage


class TcpProxy:
    """A loopback TCP proxy in front of the real Redis: `stop()` is an outage (the port refuses
    connections and open ones are cut), `start()` brings Redis back on the same port."""

    def __init__(self, target: tuple[str, int] = ("127.0.0.1", 6379), port: int | None = None):
        self.target = target
        self.port = port or free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def url_for(self, redis_url: str) -> str:
        """`redis_url` (its user, password and db) through this proxy."""
        from urllib.parse import urlsplit

        return redis_url.replace(urlsplit(redis_url).netloc.rpartition("@")[2], f"127.0.0.1:{self.port}", 1)

    def start(self) -> Self:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        if self._listener is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone would leave it listening
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
