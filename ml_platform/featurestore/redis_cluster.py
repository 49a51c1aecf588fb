"""A local Redis Cluster for tests and development, and the cluster client the online store uses.

`LocalRedisCluster(directory, masters=3).start()` runs `masters` primaries (no replicas) from the
system `redis-server` binary (`REDIS_SERVER` env var or the PATH) on free loopback ports, each
with its config, `nodes.conf`, log and pid file under `directory/<port>/`; assigns the 16384
slots in equal contiguous ranges (CLUSTER ADDSLOTSRANGE), joins the nodes (CLUSTER MEET) and
waits until every node reports `cluster_state:ok` and knows every other node. `stop()` shuts the
processes down (SIGTERM, then SIGKILL) and removes `directory`. A context manager too:

    with LocalRedisCluster("/tmp/clusterwork/dev") as cluster:
        client = cluster_client_from_url(cluster.url)

From the shell: `python -m ml_platform.featurestore.redis_cluster /tmp/dir` starts one, prints its
URL and stops it on Ctrl-C.

`cluster_client_from_url(url)` builds a `redis.cluster.RedisCluster` with the platform's client
options (`redis_server.CLIENT_OPTIONS`). It takes `redis+cluster://[[user]:password@]host:port`
(the form that says "cluster" in the URL itself; `rediss+cluster://` for TLS) or a plain
`redis://` URL of any one node. `is_cluster_url(url)` tells the two forms apart, so a single
`client_from_url` can dispatch on it; `is_cluster_client(client)` tells the two client kinds apart
(the platform's Redis users pick their cluster key layout by it), and `slot_tag(key)` gives the
hash tag that puts other keys in `key`'s slot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import redis
from redis.cluster import RedisCluster

from ml_platform.featurestore.redis_server import CLIENT_OPTIONS, _quoted, free_port, pid_alive, redact_url

SLOTS = 16384
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
START_TIMEOUT_S = 30.0


def is_cluster_url(url: str) -> bool:
    """True for `redis+cluster://...` and `rediss+cluster://...` URLs."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def is_cluster_client(client: Any) -> bool:
    """True for a redis.cluster.RedisCluster or a redis.asyncio.cluster.RedisCluster client."""
    if isinstance(client, RedisCluster):
        return True
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return isinstance(client, AsyncRedisCluster)


def slot_tag(key: str) -> str:
    """What Redis Cluster hashes of `key` (its hash tag's content, or the whole key without one):
    any key containing `{<slot_tag(key)>}` as its first hash tag lands in `key`'s slot. Used to put
    companion keys next to a stream whose name the deployment chose (e.g. the stream worker's
    `done` keys next to its output stream)."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    if "{" in key or "}" in key:
        raise ValueError(
            f"key {key!r} has braces but no hash tag Redis Cluster would use; name it without "
            f"'{{' and '}}', or with one non-empty tag such as '{{myproject}}:transactions'"
        )
    return key


def cluster_client_from_url(url: str, **overrides: Any) -> RedisCluster:
    """A RedisCluster client for `url` (redis+cluster://, rediss+cluster:// or a node's redis://
    URL), with the platform's client options; the other nodes are discovered from that one."""
    scheme, sep, rest = url.partition("://")
    if is_cluster_url(url):
        url = scheme.lower().split("+", 1)[0] + sep + rest
    options = {**CLIENT_OPTIONS, **overrides}
    try:
        return RedisCluster.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ValueError(
            f"cannot open a Redis Cluster client for {redact_url(url)!r} ({exc}); use "
            f"redis+cluster://[:password@]host:port (any node of the cluster)"
        ) from exc


def async_cluster_client_from_url(url: str, **overrides: Any):
    """The same, as a redis.asyncio.cluster.RedisCluster (for the HTTP API's `read_async`)."""
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    scheme, sep, rest = url.partition("://")
    if is_cluster_url(url):
        url = scheme.lower().split("+", 1)[0] + sep + rest
    options = {**CLIENT_OPTIONS, **overrides}
    options.pop(
        "health_check_interval", None
    )  # redis-py 8.1: makes the asyncio cluster client raise TypeError
    try:
        return AsyncRedisCluster.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ValueError(f"cannot open a Redis Cluster client for {redact_url(url)!r} ({exc})") from exc


def cluster_executable() -> Path:
    """The system redis-server (REDIS_SERVER, else the PATH); Redis Cluster needs >= 7.0 here
    (CLUSTER ADDSLOTSRANGE)."""
    explicit = os.environ.get("REDIS_SERVER")
    found = explicit or shutil.which("redis-server")
    if not found or not Path(found).exists():
        raise RuntimeError(
            "no redis-server binary found (install redis-server >= 7.0 or set REDIS_SERVER=/path/to/redis-server)"
        )
    return Path(found)


class LocalRedisCluster:
    """A throwaway Redis Cluster of `masters` primaries on loopback, its files under `directory`."""

    def __init__(self, directory: str | os.PathLike, masters: int = 3, *, executable: str | None = None):
        if masters < 1:
            raise ValueError(f"masters must be >= 1, got {masters}")
        self.dir = Path(directory)
        self.masters = masters
        self.executable = Path(executable) if executable else cluster_executable()
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen] = []

    # ---- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def keys_by_master(self, pattern: str) -> dict[int, list[bytes]]:
        """Keys matching `pattern` on each master (port -> sorted keys), read node by node (to
        see where the cluster put them)."""
        out = {}
        for port in self.ports:
            node = redis.Redis(host="127.0.0.1", port=port)
            try:
                out[port] = sorted(node.scan_iter(match=pattern, count=1000))
            finally:
                node.close()
        return out

    @property
    def url(self) -> str:
        """redis+cluster://127.0.0.1:<first port> (any node would do)."""
        if not self.ports:
            raise RuntimeError("the cluster is not started")
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node_client(self, port: int) -> redis.Redis:
        """A plain client of one node (for CLUSTER commands and per-node inspection)."""
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5.0, decode_responses=True)

    def start(self) -> str:
        """Start the nodes, assign slots, join them and wait for `cluster_state:ok`; returns the URL.
        On any failure everything started so far is stopped and removed."""
        if self.processes:
            return self.url
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            for _ in range(self.masters):
                self._launch_node()
            self._form_cluster()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self.url

    def _launch_node(self) -> None:
        for _attempt in range(5):  # a free port can be taken by someone else before we bind it
            port = free_port()
            if port in self.ports or port + 10000 > 65535:  # the cluster bus listens on port + 10000
                continue
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "redis.conf"
            conf.write_text(
                "\n".join(
                    [
                        "bind 127.0.0.1",
                        f"port {port}",
                        "protected-mode yes",
                        "daemonize no",
                        f"dir {_quoted(node_dir)}",
                        f"pidfile {_quoted(node_dir / 'redis.pid')}",
                        f"logfile {_quoted(node_dir / 'redis.log')}",
                        "cluster-enabled yes",
                        "cluster-config-file nodes.conf",
                        "cluster-node-timeout 5000",
                        'save ""',
                        "appendonly no",
                        "lazyfree-lazy-user-del yes",
                        "lazyfree-lazy-expire yes",
                        "",
                    ]
                )
            )
            proc = subprocess.Popen(
                [str(self.executable), str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the developer's shell does not kill it mid-test
            )
            if self._wait_ping(port, proc):
                self.ports.append(port)
                self.processes.append(proc)
                return
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
            shutil.rmtree(node_dir, ignore_errors=True)
        raise RuntimeError(f"could not start a redis-server cluster node under {self.dir}")

    def _wait_ping(self, port: int, proc: subprocess.Popen, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        client = self.node_client(port)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    time.sleep(0.02)
            return False
        finally:
            client.close()

    def _form_cluster(self) -> None:
        per = SLOTS // self.masters
        clients = [self.node_client(p) for p in self.ports]
        try:
            for i, client in enumerate(clients):
                first = i * per
                last = SLOTS - 1 if i == self.masters - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            for port in self.ports[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", port)
        finally:
            for client in clients:
                client.close()

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        clients = [self.node_client(p) for p in self.ports]
        try:
            while time.monotonic() < deadline:
                states = []
                for client in clients:
                    info = client.execute_command("CLUSTER", "INFO")
                    info = info if isinstance(info, dict) else _parse_info(info)
                    states.append(
                        info.get("cluster_state") == "ok"
                        and int(info.get("cluster_known_nodes", 0)) == self.masters
                        and int(info.get("cluster_slots_ok", 0)) == SLOTS
                    )
                if all(states):
                    return
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        raise RuntimeError(f"the local Redis Cluster under {self.dir} did not reach cluster_state:ok")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop every node (SIGTERM, then SIGKILL) and delete the directory."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        leftover = [p.pid for p in self.processes if pid_alive(p.pid)]
        self.processes, self.ports = [], []
        shutil.rmtree(self.dir, ignore_errors=True)
        if leftover:
            raise RuntimeError(f"redis-server cluster nodes {leftover} did not stop")

    # ---- inspection

    def masters_by_slot(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, port) of every master."""
        client = self.node_client(self.ports[0])
        try:
            ranges = []
            for first, last, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                ranges.append((int(first), int(last), int(primary[1])))
            return sorted(ranges)
        finally:
            client.close()


def _parse_info(text: str) -> dict[str, str]:
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k.strip(): v.strip() for k, v in pairs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m ml_platform.featurestore.redis_cluster DIRECTORY [MASTERS]", file=sys.stderr)
        return 2
    cluster = LocalRedisCluster(argv[0], masters=int(argv[1]) if len(argv) > 1 else 3)

    def _exit(signum, frame):  # a handler, not a blocked mask: the nodes would inherit the mask
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _exit)
    try:
        print(cluster.start(), flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
