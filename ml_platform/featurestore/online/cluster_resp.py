"""The hand-written RESP client (resp.py) on Redis Cluster: pre-framed commands routed by slot.

Every command or MULTI/EXEC block given here touches keys of one slot (the caller's job: the
cluster layout puts each bucket's keys in one slot). `ClusterChannel` keeps one `RespChannel`
per master (redis-py's connection pools of the RedisCluster client's nodes, so auth, TLS,
timeouts and hiredis are redis-py's), sends each node its share of a request before reading any
reply (the masters work in parallel) and, on a redirect (MOVED/ASK/TRYAGAIN/CLUSTERDOWN: the
slots moved or are moving), refreshes redis-py's slot map and redoes the whole read. Writes are
never redone here: a failed write raises, and the write path aborts or leaves its version to be
rolled forward (versioned writes' rules).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import AskError, ClusterDownError, TryAgainError

from ml_platform.featurestore.online.resp import LuaScript, RespChannel

# MovedError is an AskError; all of them mean "the slot map changed or is changing: look again".
REDIRECTS = (AskError, TryAgainError, ClusterDownError)
READ_RETRIES = (*REDIRECTS, redis.ConnectionError, redis.TimeoutError)
READ_ATTEMPTS = 3


class ClusterChannel:
    """Pre-framed RESP commands on a redis-py RedisCluster client's primaries, routed by slot."""

    def __init__(self, client: Any):
        self.client = client
        self._by_node: dict[str, RespChannel] = {}
        self._by_slot: dict[int, RespChannel] = {}
        self._loaded: set[tuple[str, bytes]] = set()

    def for_slot(self, slot: int) -> RespChannel:
        channel = self._by_slot.get(slot)
        if channel is None:
            node = self.client.nodes_manager.get_node_from_slot(slot)
            channel = self._by_node.get(node.name)
            if channel is None:
                channel = self._by_node[node.name] = RespChannel(self.client.get_redis_connection(node))
            self._by_slot[slot] = channel
        return channel

    def refresh(self) -> None:
        """Re-read the slot map (after a redirect) and drop every cached connection."""
        self.close()
        self.client.nodes_manager.initialize()

    def close(self) -> None:
        for channel in self._by_node.values():
            channel.close()
        self._by_node.clear()
        self._by_slot.clear()
        self._loaded.clear()

    # ---- reads

    def transactions(self, items: Sequence[tuple[int, bytes, int]]) -> list:
        """Run MULTI/EXEC blocks given as (slot, framed payload, replies in the payload); return
        each block's EXEC reply in order. All nodes get their blocks before any reply is read."""
        for attempt in range(READ_ATTEMPTS):
            try:
                return self._transactions_once(items)
            except READ_RETRIES:
                if attempt == READ_ATTEMPTS - 1:
                    raise
                self.refresh()
                time.sleep(0.02 * attempt)
        raise AssertionError("unreachable")

    def _transactions_once(self, items: Sequence[tuple[int, bytes, int]]) -> list:
        groups: dict[int, tuple[RespChannel, list[int]]] = {}
        for i, (slot, _, _) in enumerate(items):
            channel = self.for_slot(slot)
            groups.setdefault(id(channel), (channel, []))[1].append(i)
        taken = []
        out: list = [None] * len(items)
        try:
            for channel, indices in groups.values():
                conn = channel._take()
                taken.append((channel, conn, indices))
                conn.send_packed_command([b"".join([items[i][1] for i in indices])])
            for _, conn, indices in taken:
                for i in indices:
                    for _ in range(items[i][2] - 1):
                        conn.read_response()
                    out[i] = conn.read_response()
        except BaseException:
            for channel, conn, _ in taken:  # unread replies: drop those sockets
                channel._give_back(conn, broken=True)
            raise
        for channel, conn, _ in taken:
            channel._give_back(conn, broken=False)
        return out

    # ---- writes

    def call(self, slot: int, payload: bytes, retry: bool = True) -> Any:
        return self.for_slot(slot).call(payload, retry)

    def run_script(self, script: LuaScript, slot: int, payload: bytes, retry: bool = True) -> Any:
        """One EVALSHA on the slot's node (loading the script there on NOSCRIPT)."""
        return script.run(self.for_slot(slot), payload, retry)

    def load_scripts(self, *scripts: LuaScript, again: bool = False) -> None:
        """SCRIPT LOAD on every primary not known to have them (before a pipelined stream of
        EVALSHA, which cannot retry a NOSCRIPT in the middle); `again`: on every primary (after
        a NOSCRIPT: a master restarted or was replaced)."""
        if again:
            self._loaded.clear()
        for node in self.client.get_primaries():
            channel = self._by_node.get(node.name)
            if channel is None:
                channel = self._by_node[node.name] = RespChannel(self.client.get_redis_connection(node))
            for script in scripts:
                if (node.name, script.sha) not in self._loaded:
                    script.load(channel)
                    self._loaded.add((node.name, script.sha))

    def stream(self, items: Iterable[tuple[int, bytes]], window: int = 8) -> list:
        """Pipelined commands (slot, framed payload): up to `window` in flight per node, all
        nodes at once; replies in input order. An error reply or a lost connection is raised
        (every connection used is dropped, unread replies with it)."""
        state: dict[int, tuple[RespChannel, Any, list[int]]] = {}
        replies: list = []
        try:
            for slot, payload in items:
                channel = self.for_slot(slot)
                entry = state.get(id(channel))
                if entry is None:
                    entry = state[id(channel)] = (channel, channel._take(), [])
                _, conn, pending = entry
                conn.send_packed_command([payload])
                pending.append(len(replies))
                replies.append(None)
                if len(pending) >= window:
                    replies[pending.pop(0)] = conn.read_response()
            for _, conn, pending in state.values():
                while pending:
                    replies[pending.pop(0)] = conn.read_response()
        except BaseException:
            for channel, conn, _ in state.values():
                channel._give_back(conn, broken=True)
            raise
        for channel, conn, _ in state.values():
            channel._give_back(conn, broken=False)
        return replies


async def async_transactions(client: Any, items: Sequence[tuple[int, bytes, int]]) -> list:
    """`ClusterChannel.transactions` over a redis.asyncio.RedisCluster client (its nodes'
    connections, taken and given back around the request)."""
    await client.initialize()
    for attempt in range(READ_ATTEMPTS):
        try:
            return await _async_transactions_once(client, items)
        except READ_RETRIES:
            if attempt == READ_ATTEMPTS - 1:
                raise
            await client.nodes_manager.initialize()
    raise AssertionError("unreachable")


async def _async_transactions_once(client: Any, items: Sequence[tuple[int, bytes, int]]) -> list:
    groups: dict[str, tuple[Any, list[int]]] = {}
    for i, (slot, _, _) in enumerate(items):
        node = client.nodes_manager.get_node_from_slot(slot)
        groups.setdefault(node.name, (node, []))[1].append(i)
    taken = []
    out: list = [None] * len(items)
    try:
        for node, indices in groups.values():
            conn = node.acquire_connection()
            taken.append((node, conn, indices))
            await conn.send_packed_command(b"".join([items[i][1] for i in indices]))
        for _, conn, indices in taken:
            for i in indices:
                for _ in range(items[i][2] - 1):
                    await conn.read_response()
                out[i] = await conn.read_response()
    except BaseException:
        for node, conn, _ in taken:
            await conn.disconnect()
            node.release(conn)
        raise
    for node, conn, _ in taken:
        node.release(conn)
    return out
