"""The embedded Redis's lifetime: a small process beside each embedded server that shuts it down
once its data directory is gone (a deleted temp dir, a `make clean-data`) or once it has had no
client for `idle_s` seconds (0: the idle rule is off) (a demo finished, a test suite ended). The next platform process that
needs the server starts it again (`EmbeddedRedis.start`), with its data from the snapshot that the
idle shutdown saved.

    python -m ml_platform.featurestore.redis_watchdog <redis dir> <pid> <idle_s>   (the URL on stdin)

It exits with the server. It looks at the server every `poll_interval(idle_s)` seconds over a
fresh connection, so it is never itself the client that keeps the server busy.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import redis

from ml_platform.featurestore.redis_server import client_from_url, pid_alive, stop_process


def poll_interval(idle_s: float) -> float:
    """How often the server is looked at: a fifth of the idle time, between 0.2 and 5 s."""
    return max(0.2, min(5.0, idle_s / 5)) if idle_s > 0 else 5.0


def other_clients(url: str) -> int | None:
    """Connected clients other than this probe; None when the server does not answer."""
    try:
        client = client_from_url(url, socket_timeout=2.0, socket_connect_timeout=1.0, health_check_interval=0)
        try:
            return int(client.info("clients")["connected_clients"]) - 1
        finally:
            client.close()
    except redis.RedisError:
        return None


def watch(redis_dir: Path, pid: int, idle_s: float, url: str, *, log=print) -> str:
    """Watch the server `pid` of `redis_dir` (reached at `url`) until it stops; returns why it ended."""
    idle_since: float | None = None
    interval = poll_interval(idle_s)
    while True:
        if not pid_alive(pid):
            return "server exited"
        if not redis_dir.exists():
            stop_process(pid, save=False, url=url)  # nowhere to save to
            log(f"data directory {redis_dir} is gone: stopped redis-server {pid}")
            return "directory gone"
        clients = other_clients(url)
        now = time.monotonic()
        if clients == 0 and idle_s > 0:
            idle_since = idle_since or now
            if now - idle_since >= idle_s:
                stop_process(pid, save=True, url=url)
                log(f"no client for {idle_s:g} s: stopped redis-server {pid} (snapshot saved)")
                return "idle"
        else:
            idle_since = None
        time.sleep(interval)


def main(argv: list[str]) -> int:
    redis_dir, pid, idle_s = Path(argv[0]), int(argv[1]), float(argv[2])
    url = sys.stdin.readline().strip()
    watch(redis_dir, pid, idle_s, url, log=lambda m: print(time.strftime("%Y-%m-%dT%H:%M:%S"), m, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
