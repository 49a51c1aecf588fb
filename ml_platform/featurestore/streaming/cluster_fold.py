"""The fold on Redis Cluster: entity buffers in the online store's hash-tagged buckets, one fold
script per bucket.

On one node a batch's fold is one script over every buffer it touches (`fold.lua`). On a cluster
those buffers live on several masters, so each buffer key carries the hash tag of its entity's
bucket, the bucket the cluster online store keeps the entity's values in
(`entity_keys.entity_bucket` of the entity field of the group's base join keys,
`cluster_layout.bucket_tags`):

    <project>:stream:state:{<tag b>}:<group>:<layout id>:<entity key values>

(a card holder's buffer is in the slot of the card holder's online values; the `state:` prefix
stays first, so `delete_state` and re-seeding find the keys with the same pattern). A batch is
then one call of the same `fold.lua` per bucket that has buffers in it, its three blobs cut per
bucket, pipelined over all masters at once (`ClusterChannel.stream`, the online store's routed
client), and the replies put back in the order of the buffers. Each call is atomic, as the one
call is on one node; the batch as a whole is not, which the fold never relied on (docs/streaming.md,
"Redis Cluster").
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np
from redis.exceptions import NoScriptError

from ml_platform.featurestore.definitions import ValueType
from ml_platform.featurestore.online.cluster_layout import BUCKETS, bucket_slots, bucket_tags
from ml_platform.featurestore.online.cluster_resp import ClusterChannel
from ml_platform.featurestore.online.cluster_writes import SCRIPT_WINDOW
from ml_platform.featurestore.online.entity_keys import bucket_groups, entity_buckets, entity_field
from ml_platform.featurestore.online.resp import LuaScript
from ml_platform.featurestore.streaming.plan import BufferGroup, CompiledView, is_integer_key


class BucketedFold:
    """The fold script of one updater on a RedisCluster client, run per bucket."""

    def __init__(self, client: Any, state_prefix: str, source: str, buckets: int = BUCKETS):
        self.channel = ClusterChannel(client)
        self.script = LuaScript(source)
        self.prefixes = [f"{state_prefix}{{{t.decode()}}}:" for t in bucket_tags(buckets)]
        self.slots = bucket_slots(buckets)
        self.buckets = buckets

    def join_keys(self, group: BufferGroup, compiled: dict[str, CompiledView]) -> list[tuple[str, ValueType]]:
        """The group's base keys with the value types the online store packs them by."""
        view = compiled[group.views[0]].view
        return [
            (k, ValueType.Int64 if is_integer_key(view, k) else ValueType.String) for k in group.base_keys
        ]

    def entity_buckets(
        self, join_keys: Sequence[tuple[str, ValueType]], entities: Sequence[tuple]
    ) -> np.ndarray:
        """The bucket of each entity (its key values in `join_keys` order). Values are taken as the
        buffer key takes them (`key_part`: 7 and "7" are one entity), then packed as the online store
        packs its entity fields."""
        if len(join_keys) == 1 and join_keys[0][1] is ValueType.Int64:
            try:
                fields = np.array([e[0] for e in entities], dtype=">i8").view("V8")
                return entity_buckets(fields, self.buckets)
            except (TypeError, ValueError, OverflowError):
                pass  # not all plain integers: the per-entity path below names a bad value
        fields = []
        for i, values in enumerate(entities):
            row = {
                key: str(value) if kind is ValueType.String else _as_int(key, value)
                for (key, kind), value in zip(join_keys, values)
            }
            fields.append(entity_field(join_keys, row, i))
        return entity_buckets(fields, self.buckets)

    def run(self, expiry: int, want: bool, heads: np.ndarray, keys: list[bytes], records: bytes,
            buckets: np.ndarray) -> list[bytes]:  # fmt: skip
        """One fold call per bucket (`heads`, `keys`, `records`: every buffer of the batch, in order;
        `buckets`: each buffer's bucket); returns each buffer's reply, in the same order."""
        ends = np.cumsum(heads["nbytes"].astype(np.int64))
        starts = (ends - heads["nbytes"]).tolist()
        ends = ends.tolist()
        items: list[tuple[int, bytes]] = []
        groups: list[list[int]] = []
        for bucket, positions in bucket_groups(np.asarray(buckets, np.int64)):
            pos = positions.tolist()
            args = [
                b"%d" % expiry,
                b"1" if want else b"0",
                b"%d" % (secrets.randbelow(2**36 - 1) + 1),
                heads[positions].tobytes(),
                b"".join([keys[i] for i in pos]),
                b"".join([records[starts[i] : ends[i]] for i in pos]),
            ]
            # KEYS[1]: one of the bucket's buffers, so the call is routed to (and checked against)
            # the bucket's slot; the script takes its keys from the blob, as on one node.
            items.append((self.slots[bucket], self.script.frame([keys[pos[0]]], args)))
            groups.append(pos)
        self.channel.load_scripts(self.script)
        try:
            replies = self.channel.stream(items, window=SCRIPT_WINDOW)
        except NoScriptError:
            # A master lost its scripts (restart, SCRIPT FLUSH): load them everywhere and send the
            # batch again. Buckets that ran twice appended the same records twice, which count
            # once (a record is a pure function of its event); their second reply carries the
            # first call's bytes as another worker's, so the cache stays right.
            self.channel.load_scripts(self.script, again=True)
            replies = self.channel.stream(items, window=SCRIPT_WINDOW)
        out: list[bytes] = [b""] * len(keys)
        for pos, reply in zip(groups, replies):
            for i, r in zip(pos, reply):
                out[i] = r
        return out

    def close(self) -> None:
        self.channel.close()


def _as_int(key: str, value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"join key {key!r} must be an integer, got {value!r}") from None
