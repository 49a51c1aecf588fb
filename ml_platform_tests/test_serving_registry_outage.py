"""The MLflow registry down when a server starts (real server processes): the server that served
the champion before keeps a local copy, so a restart during the outage serves that champion and
says it is degraded and why; a host that never served one is not ready and says why."""

from __future__ import annotations

import httpx
import pytest
from fixtures_platform import ServerProcess, tiny_platform  # noqa: F401  (module fixture)

from ml_platform.featurestore.redis_server import free_port

pytestmark = pytest.mark.integration


def test_a_restart_during_a_registry_outage_serves_the_last_champion_and_says_degraded(tiny_platform, tmp_path):  # noqa: F811
    body = tiny_platform.transaction()
    champion = tiny_platform.registry.champion().version
    with_registry = ServerProcess(tiny_platform.settings, log_path=tmp_path / "first.log").start()
    try:
        assert httpx.post(with_registry.url + "/predict", json=body).json()["model_version"] == champion
        assert httpx.get(with_registry.url + "/health/ready").json()["status"] == "ready"
    finally:
        with_registry.stop()

    dead_registry = f"http://127.0.0.1:{free_port()}"  # nothing listens: the tracking server is down
    outage = tiny_platform.settings.model_copy(update={"mlflow_tracking_uri": dead_registry})
    server = ServerProcess(outage, log_path=tmp_path / "outage.log").start(timeout=90)
    try:
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 200, ready.text
        report = ready.json()
        assert report["status"] == "degraded"
        assert "registry poll failed" in report["reason"] and f"v{champion} from this host's local copy" in report["reason"]
        assert report["checks"]["registry"]["ok"] is False and report["checks"]["model"]["ok"] is True
        scored = httpx.post(server.url + "/predict", json=body)
        assert scored.status_code == 200 and scored.json()["model_version"] == champion
        assert "local copy" in httpx.get(server.url + "/model").json()["degraded"]
    finally:
        server.stop()

    # A host with no local copy (a new data directory): up, not ready, and it says why.
    elsewhere = outage.model_copy(update={"data_dir": tmp_path / "new-host"})
    fresh = ServerProcess(elsewhere, log_path=tmp_path / "fresh.log").start(timeout=90, ready_path="/health")
    try:
        ready = httpx.get(fresh.url + "/health/ready")
        assert ready.status_code == 503
        assert ready.json()["status"] == "not_ready" and "model" in ready.json()["reason"]
        assert "registry poll failed" in ready.json()["checks"]["registry"]["error"]
        assert httpx.post(fresh.url + "/predict", json=body).status_code == 503
    finally:
        fresh.stop()
