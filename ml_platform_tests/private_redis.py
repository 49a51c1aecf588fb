"""A Redis server of a test's own (the system `redis-server`, a free loopback port, append-only
persistence in a temp dir), so the test can restart it without disturbing anyone else."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import redis

from ml_platform.featurestore.redis_server import free_port


class PrivateRedis:
    def __init__(self, root: Path):
        self.dir = Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        log = open(self.dir / "redis.log", "a")  # noqa: SIM115 - the server's
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
            stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis(port=self.port, socket_timeout=1)
                if client.ping():
                    client.close()
                    return self
            assert self.proc.poll() is None and time.monotonic() < deadline, (self.dir / "redis.log").read_text()[-2000:]
            time.sleep(0.05)

    def stop(self) -> None:
        """SHUTDOWN (the append-only file is flushed: a restart finds every acknowledged write)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=self.port, socket_timeout=5).shutdown()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()
