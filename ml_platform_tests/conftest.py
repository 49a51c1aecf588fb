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


def pytest_collection_finish(session):
    """Start the two 60-day scenarios now when a test reading them will run: they overlap the suite."""
    if any("scenarios" in getattr(item, "fixturenames", ()) for item in session.items):
        import scenario_runs

        scenario_runs.start()


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
