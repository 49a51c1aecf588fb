"""The online store's key layout on Redis Cluster: entities in hash-tagged buckets.

An entity's bucket is `entity_keys.entity_bucket(field, BUCKETS)`. Bucket b's keys all carry the
hash tag `{<tag b>}`, so they share one slot (one master); the tags are chosen once so that
bucket b's slot lies in the b-th of BUCKETS equal slices of the 16384 slots, which spreads the
buckets evenly over any cluster whose masters own contiguous, equal slot ranges (what
`redis-cli --cluster create` and `LocalRedisCluster` make). Per bucket b and view:

    <project>:online:{<tag b>}:ptr:<view>              hash: the bucket's copy of the routing state
                                                       (version, current, current_fp, next,
                                                       building, building_key, building_fp,
                                                       building_phase, building_overlay)
    <project>:online:{<tag b>}:data:<view>:<version>   hash: entity field -> packed value
    <project>:online:{<tag b>}:overlay:<view>:<version> hash: stream updates during a bulk load

and one global hash per view, `<project>:online:meta:<view>` (schemas, next_version, the global
version pointer, the last run, retired versions), as on a single node. Every entity of every
view with the same join keys lands in the same bucket, so an entity's values in all those views
and the bucket's pointers are read in one MULTI/EXEC on one node. Why and what is atomic:
docs/online_store.md, "Redis Cluster".

BUCKETS is part of the layout: every client of a project must use the same value, and changing
it means materializing every view again (the writer records it in the meta hash; writers and
readers refuse a different one).
"""

from __future__ import annotations

from functools import lru_cache

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

BUCKETS = 16


@lru_cache(maxsize=8)
def bucket_tags(buckets: int = BUCKETS) -> tuple[bytes, ...]:
    """The hash tag of every bucket: the first `b<i>.<n>` (n = 0, 1, ...) whose slot falls in
    bucket i's slice of the slot space (about `buckets` tries per bucket, computed once)."""
    if not 1 <= buckets <= REDIS_CLUSTER_HASH_SLOTS:
        raise ValueError(f"buckets must be in 1..{REDIS_CLUSTER_HASH_SLOTS}, got {buckets}")
    tags = []
    for i in range(buckets):
        low = i * REDIS_CLUSTER_HASH_SLOTS // buckets
        high = (i + 1) * REDIS_CLUSTER_HASH_SLOTS // buckets
        n = 0
        while not low <= key_slot(b"b%d.%d" % (i, n)) < high:
            n += 1
        tags.append(b"b%d.%d" % (i, n))
    return tuple(tags)


@lru_cache(maxsize=8)
def bucket_slots(buckets: int = BUCKETS) -> tuple[int, ...]:
    """The slot of every bucket."""
    return tuple(key_slot(t) for t in bucket_tags(buckets))


class ClusterKeys:
    """Key names of one project's online store on a cluster (namespace = `<project>:online:`)."""

    def __init__(self, namespace: str, buckets: int = BUCKETS):
        self.namespace = namespace
        self.buckets = buckets
        self.prefixes = [f"{namespace}{{{t.decode()}}}:" for t in bucket_tags(buckets)]
        self.slots = bucket_slots(buckets)

    def ptr(self, bucket: int, view: str) -> str:
        return f"{self.prefixes[bucket]}ptr:{view}"

    def data(self, bucket: int, view: str, version: int | str) -> str:
        return f"{self.prefixes[bucket]}data:{view}:{version}"

    def overlay(self, bucket: int, view: str, version: int | str) -> str:
        return f"{self.prefixes[bucket]}overlay:{view}:{version}"
