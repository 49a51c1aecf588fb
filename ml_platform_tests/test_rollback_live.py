"""Rollback end to end with a running server: `run_server` in a subprocess (uvicorn, 1 worker) on a
free loopback port serves v2; `ModelRegistry.rollback` moves `champion` back to v1 while a client
keeps sending requests; within seconds the server answers with v1, and not one request fails."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from ml_platform.registry import CHAMPION, PREVIOUS_CHAMPION
from ml_platform.serving.champion import alias_versions
from ml_platform.serving.prediction_log import ENTRY_FIELD, prediction_stream_key

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

try:
    from fixtures_platform import ServerProcess, tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import ServerProcess, tiny_platform  # noqa: F401


@pytest.fixture(scope="module")
def server(tiny_platform, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(tiny_platform.settings, log_path=log, poll_interval_s=0.5) as srv:
        yield srv
    print(log.read_text()[-3000:])


class ClientLoop(threading.Thread):
    """Sends /predict back to back and records (time, status, model version) of every answer."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.answers: list[tuple[float, int, int | None]] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as client:
            while not self.stop.is_set():
                try:
                    resp = client.post(self.url + "/predict", json=self.body)
                    version = resp.json().get("model_version") if resp.status_code == 200 else None
                    self.answers.append((time.monotonic(), resp.status_code, version))
                    if resp.status_code != 200:
                        self.failures.append(f"{resp.status_code}: {resp.text[:200]}")
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")

    def versions_since(self, t: float) -> list[int | None]:
        return [v for at, _, v in self.answers if at >= t]


def test_rollback_is_served_within_seconds_without_a_failed_request(server, tiny_platform):
    registry = tiny_platform.registry
    body = tiny_platform.transaction(transaction_id="rollback-live")
    first = httpx.post(server.url + "/predict", json=body, timeout=5).json()
    assert first["model_version"] == 2
    model = httpx.get(server.url + "/model", timeout=5).json()
    assert model["serving"]["version"] == 2 and 1 in model["loaded_versions"]  # v1 already in memory

    loop = ClientLoop(server.url, body)
    loop.start()
    try:
        time.sleep(1.0)  # traffic before the rollback
        asked_at = time.monotonic()
        assert registry.rollback(who="oncall-alice", why="v2 flags too many good customers") == (2, 1)
        rolled_at = time.monotonic()  # the alias has moved in the registry
        while time.monotonic() < rolled_at + 5.0 and 1 not in loop.versions_since(asked_at):
            time.sleep(0.05)
        switched = next((at for at, _, v in loop.answers if at >= asked_at and v == 1), None)
        assert switched is not None, "the server still answers with v2 five seconds after the rollback"
        time.sleep(1.0)  # traffic after the swap
    finally:
        loop.stop.set()
        loop.join(10)

    assert loop.failures == []  # zero failed requests across the swap
    versions = [v for _, _, v in loop.answers]
    assert len(versions) >= 20 and versions[0] == 2 and versions[-1] == 1
    assert versions == sorted(versions, reverse=True)  # 2 ... 2 1 ... 1: never back to v2
    # poll every 0.5 s, v1 preloaded: served a poll after the alias moved (a swap, not a load)
    assert switched - rolled_at < 3.0, f"v1 served {switched - rolled_at:.2f} s after the rollback"
    print(
        f"v1 served {switched - rolled_at:.2f} s after rollback() returned ({len(versions)} requests, 0 failed)"
    )

    after = httpx.post(server.url + "/predict", json=body, timeout=5).json()
    assert after["model_version"] == 1 and after["probability"] != first["probability"]
    swap = httpx.get(server.url + "/model", timeout=5).json()["swaps"][-1]
    assert (swap["from_version"], swap["to_version"], swap["preloaded"]) == (2, 1, True)

    # The audit trail has the move, with who and why; the registry's aliases agree.
    record = registry.alias_history(CHAMPION)[-1]
    assert (record["from_version"], record["to_version"], record["action"]) == (2, 1, "rollback")
    assert record["who"] == "oncall-alice" and record["why"] == "v2 flags too many good customers"
    assert registry.champion().version == 1
    assert PREVIOUS_CHAMPION not in alias_versions(registry)  # v1 had no champion before it

    # The prediction log says which version made each prediction.
    stream = prediction_stream_key(tiny_platform.project)
    logged = [
        json.loads(f[ENTRY_FIELD.encode()])["model_version"] for _, f in tiny_platform.redis.xrange(stream)
    ]
    assert {1, 2} <= set(logged) and len(logged) >= len(versions)
