"""Redis restarted under the platform (a real redis-server of the test's own, restarted with
SHUTDOWN and started again on the same port with its append-only file):

- during a materialization (1M rows): the write fails, the previous snapshot keeps serving, the retry
  completes and the new values serve;
- during serving: the API answers 503 while Redis is down, then scores again by itself, without
  a restart of the server process.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import httpx
import pyarrow as pa
import pytest
import redis
from fixtures_platform import ServerProcess, build_tiny_platform
from private_redis import PrivateRedis

from ml_platform.featurestore.definitions import Entity, FeatureView, Field, FileSource, Float64
from ml_platform.featurestore.online import RedisOnlineStore

pytestmark = pytest.mark.slow
user = Entity("user", join_keys=["user_id"])
VIEW = FeatureView("restart_stats", [user], FileSource("unused.parquet"),
                   schema=[Field("a", Float64), Field("b", Float64)], ttl=timedelta(days=1))
ROWS = 1_000_000


def table(value: float) -> pa.Table:
    now = datetime.now(UTC)
    return pa.table({"user_id": pa.array(range(ROWS), pa.int64()),
                     "event_timestamp": pa.array([now] * ROWS, pa.timestamp("us", tz="UTC")),
                     "a": pa.array([value] * ROWS), "b": pa.array([-value] * ROWS)})


def read_a(store: RedisOnlineStore, ids: list[int]) -> list[float]:
    return store.read(["restart_stats:a"], [{"user_id": i} for i in ids])["a"]


@pytest.fixture()
def private_redis(tmp_path):
    server = PrivateRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def test_a_restart_during_materialization_keeps_the_old_snapshot_and_the_retry_completes(private_redis):
    def store() -> RedisOnlineStore:
        return RedisOnlineStore(redis.Redis.from_url(private_redis.url, socket_timeout=5), project="restart",
                                views=[VIEW])

    first = store()
    first.write_view(VIEW, table(1.0))
    old_version = first.metadata("restart_stats")["version"]
    sample = [0, 1234, ROWS - 1]
    assert read_a(first, sample) == [1.0, 1.0, 1.0]

    failure: list[BaseException] = []

    def rebuild():
        try:
            store().write_view(VIEW, table(2.0))
        except BaseException as exc:  # noqa: BLE001 - what the restart did to the writer
            failure.append(exc)

    watcher = redis.Redis.from_url(private_redis.url)
    before = set(watcher.scan_iter(match="restart:*"))
    writer = threading.Thread(target=rebuild)
    writer.start()
    # The restart lands in the middle of the write: as soon as the new version's first keys exist
    # (1M rows take ~2 s to write here), and before the write has finished.
    deadline = time.monotonic() + 60
    while not set(watcher.scan_iter(match="restart:*")) - before:
        assert writer.is_alive() and time.monotonic() < deadline, "the write finished before it was seen"
        time.sleep(0.002)
    watcher.close()
    assert writer.is_alive(), "the write finished before the restart"
    private_redis.restart()
    writer.join(timeout=120)
    assert failure and isinstance(failure[0], (redis.ConnectionError, redis.TimeoutError, OSError)), failure

    after = store()  # a reader after the restart: the previous snapshot, whole
    assert after.metadata("restart_stats")["version"] == old_version
    assert read_a(after, sample) == [1.0, 1.0, 1.0]
    after.write_view(VIEW, table(2.0))  # the retry
    assert after.metadata("restart_stats")["version"] != old_version
    assert read_a(after, sample) == [2.0, 2.0, 2.0]
    assert after.read(["restart_stats:b"], [{"user_id": 7}])["b"] == [-2.0]


def test_a_restart_during_serving_is_a_503_then_the_api_recovers_by_itself(private_redis, tmp_path):
    platform = build_tiny_platform(tmp_path / "platform", redis_url=private_redis.url)
    server = ServerProcess(platform.settings, log_path=tmp_path / "api.log").start()
    try:
        body = platform.transaction()
        assert httpx.post(server.url + "/predict", json=body).status_code == 200
        pid = server.proc.pid
        private_redis.stop()
        down = httpx.post(server.url + "/predict", json=body, timeout=10)
        assert down.status_code == 503 and down.json()["error"] == "redis_unavailable", down.text
        assert httpx.get(server.url + "/health/ready").json()["checks"]["redis"]["ok"] is False
        private_redis.start()
        deadline = time.monotonic() + 20
        while (answer := httpx.post(server.url + "/predict", json=body, timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, answer.text
            time.sleep(0.2)
        assert answer.json()["model_version"] == platform.registry.champion().version
        assert server.proc.pid == pid and server.proc.poll() is None  # the same process: no restart
    finally:
        server.stop()
        platform.online.close()
        platform.redis.close()
