"""The embedded Redis's lifetime with real processes: it stops by itself after its idle time with
no client (snapshot saved, the next use restarts it with the data) and once its data directory is
gone; `ml-platform services status|stop` find and stop servers wherever their data directory is."""

from __future__ import annotations

import shutil
import time

import psutil
import pytest
from click.testing import CliRunner

from ml_platform.cli import main
from ml_platform.featurestore.redis_server import EmbeddedRedis, client_from_url, embedded_servers, pid_alive


def wait_dead(pid: int, timeout: float) -> float | None:
    """Seconds until `pid` exited, None if it is still alive after `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not pid_alive(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


@pytest.fixture()
def server(tmp_path):
    made = []

    def start(idle_s: float, where=None):
        redis = EmbeddedRedis(where or tmp_path / "data", idle_s=idle_s)
        url = redis.start()
        made.append(redis)
        return redis, url, redis._pid()

    yield start
    for redis in made:
        redis.stop()


def test_an_idle_server_stops_after_its_idle_time_and_keeps_its_data(server):
    redis, url, pid = server(idle_s=1.0)
    client = client_from_url(url)
    client.set("kept", "yes")
    time.sleep(2.5)  # 2.5 idle periods with a client connected: it must keep running
    assert pid_alive(pid)
    client.close()
    took = wait_dead(pid, timeout=6.0)
    assert took is not None, "the server did not stop after the idle time"
    assert (redis.dir / "dump.rdb").exists()  # the idle shutdown saved a snapshot
    again = client_from_url(redis.start())  # the next use restarts it, with the data
    assert again.get("kept") == b"yes"
    assert redis._pid() != pid
    again.close()


def test_a_server_whose_data_directory_is_deleted_stops(server, tmp_path):
    _, url, pid = server(idle_s=0, where=tmp_path / "doomed")  # 0: the idle rule is off
    client = client_from_url(url)
    client.set("x", "1")  # a connected client does not keep it alive once its directory is gone
    shutil.rmtree(tmp_path / "doomed")
    assert wait_dead(pid, timeout=10.0) is not None
    client.close()


def test_services_status_lists_and_stop_orphans_stops_servers_without_a_directory(server, tmp_path, monkeypatch):
    _, _, kept_pid = server(idle_s=0, where=tmp_path / "kept")
    orphan, _, orphan_pid = server(idle_s=0, where=tmp_path / "orphan")
    # The orphan's watchdog is killed first, so that only the CLI can stop the orphan.
    for proc in psutil.process_iter(["cmdline"]):
        args = " ".join(proc.info["cmdline"] or [])
        if "redis_watchdog" in args and str(orphan.dir) in args:
            proc.kill()
    shutil.rmtree(tmp_path / "orphan")
    listed = {s.pid: s for s in embedded_servers()}
    assert listed[kept_pid].dir == tmp_path / "kept" / "redis" and listed[kept_pid].dir_exists
    assert not listed[orphan_pid].dir_exists
    monkeypatch.setenv("ML_PLATFORM_DATA_DIR", str(tmp_path / "kept"))
    out = CliRunner().invoke(main, ["services", "status"])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines()[1:]}
    assert "<- this data dir" in lines[str(kept_pid)] and "(gone)" in lines[str(orphan_pid)]
    out = CliRunner().invoke(main, ["services", "stop", "--orphans"])
    assert out.exit_code == 0, out.output
    assert f"stopped pid {orphan_pid}" in out.output and str(kept_pid) not in out.output
    assert wait_dead(orphan_pid, timeout=15.0) is not None and pid_alive(kept_pid)
    out = CliRunner().invoke(main, ["services", "stop"])  # this data dir's server
    assert out.exit_code == 0 and "stopped the embedded Redis of" in out.output
    assert wait_dead(kept_pid, timeout=5.0) is not None
