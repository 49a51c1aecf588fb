"""Shared fixtures: every test gets its own data directory, MLflow store and Dagster home; tests
that talk to Redis directly get a client of the real server (`client`); tests on Redis Cluster
share one local three-master cluster per session (`redis_cluster`, `cluster_client`)."""

from __future__ import annotations

import os
import warnings

import pytest
import redis
from fixtures_platform import TEST_REDIS_URL

warnings.filterwarnings("ignore", message=".*noload.*")


def pytest_collection_modifyitems(session, config, items):
    """test_scenarios last: it waits for the two scenarios, which by then have run beside the rest
    of the suite (and a pytest-xdist worker hands its module out last, not waiting midway)."""
    items.sort(key=lambda item: item.nodeid.split("::", 1)[0].endswith("test_scenarios.py"))


def pytest_collection_finish(session):
    """Start the two 60-day scenarios now when a test reading them will run: they overlap the suite
    (a plain pytest; under pytest-xdist the controller starts them, `pytest_sessionstart`)."""
    if _xdist_worker(session.config) or _xdist_controller(session.config):
        return
    if any("scenarios" in getattr(item, "fixturenames", ()) for item in session.items):
        import scenario_runs

        scenario_runs.start()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """pytest-xdist's controller collects nothing: it starts the scenarios, before its workers
    start, when the selection takes in test_scenarios.py (no -k or -m; a path that holds it); the
    worker that runs test_scenarios finds them (`scenario_runs.HANDOFF_ENV`)."""
    config = session.config
    if not _xdist_controller(config) or config.option.markexpr or config.option.keyword:
        return
    from pathlib import Path

    target = (Path(__file__).parent / "test_scenarios.py").resolve()
    given = [a.split("::", 1)[0] for a in config.args] or config.getini("testpaths") or ["."]
    paths = [(Path(config.invocation_params.dir) / a).resolve() for a in given]
    if any(p == target or p in target.parents for p in paths):
        import scenario_runs

        scenario_runs.start()


def pytest_sessionfinish(session):
    """The scenarios' processes and folder never outlive the session (test_scenarios normally
    cleans them up; a run stopped early, or one that deselected it, leaves them to this)."""
    if _xdist_worker(session.config):
        return
    import scenario_runs

    if scenario_runs._RUNS is not None:
        scenario_runs.cleanup(scenario_runs._RUNS)


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config) -> bool:
    return not _xdist_worker(config) and bool(getattr(config.option, "numprocesses", None))


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    """Settings pointing at a fresh temp data dir (and a SQLite MLflow store inside it)."""
    from ml_platform.settings import load_settings

    env = {"ML_PLATFORM_DATA_DIR": str(tmp_path / "data")}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    s = load_settings(dict(os.environ))
    s.ensure_dirs()
    return s


@pytest.fixture()
def client():
    """A client of the real Redis (127.0.0.1:6379, or ML_PLATFORM_TEST_REDIS_URL); each test keys
    its data under its own prefix and deletes it."""
    c = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        c.ping()
    except redis.ConnectionError:
        pytest.fail(f"these tests need the Redis server at {TEST_REDIS_URL} (.ci/run starts it)")
    yield c
    c.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A local Redis Cluster of three masters (`LocalRedisCluster`: the system redis-server on free
    loopback ports), started on first use and stopped at the end of the session; each test keys
    its data under its own project and deletes it."""
    from ml_platform.featurestore.redis_cluster import LocalRedisCluster

    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis_cluster"), masters=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def cluster_client(redis_cluster):
    """A RedisCluster client of `redis_cluster` with the platform's client options."""
    from ml_platform.featurestore.redis_cluster import cluster_client_from_url

    client = cluster_client_from_url(redis_cluster.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def mlflow_tracking_server(tmp_path_factory):
    """An MLflow tracking server on its own PostgreSQL database (the production profile's; the
    command `ml-platform mlflow-server` runs), started on first use, stopped and dropped at the end."""
    from production_services import TrackingServer

    server = TrackingServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()
