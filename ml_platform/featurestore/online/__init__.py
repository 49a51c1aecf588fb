"""The online store: the latest feature values per entity, read in one round trip.

    protocol.py          `OnlineStore`, the interface `FeatureStore` and the servers use; status names
    redis_store.py       `RedisOnlineStore`: state, keys, schema lookups, housekeeping
    snapshot_reads.py    reads: one MULTI/EXEC snapshot across views, TTL, status columns
    versioned_writes.py  writes: new version + atomic flip, newer-wins upserts, stream updates
    codec.py             the packed value format (features + event time in one bytes value)
    entity_keys.py       join key values -> hash field
    resp.py              the hand-written RESP client (why: see its docstring)
    scripts.py           the Lua scripts in scripts/*.lua, loaded once
    cluster_store.py     `RedisClusterOnlineStore`: the same store on Redis Cluster (what
                         `RedisOnlineStore(<RedisCluster client>)` gives), with cluster_layout.py
                         (hash-tagged buckets), cluster_reads.py, cluster_writes.py, cluster_resp.py

Offline -> online materialization is `ml_platform.featurestore.materialize_online.materialize`
(re-exported here, as `materialize`, for the existing import path).
"""

from ml_platform.featurestore.online.codec import ARROW_TYPE, EVENT_TIMESTAMP, ValueCodec, ViewSchema
from ml_platform.featurestore.online.entity_keys import entity_field
from ml_platform.featurestore.online.protocol import (
    NOT_FOUND,
    OUTSIDE_MAX_AGE,
    PRESENT,
    OnlineStore,
    OnlineStoreError,
)
from ml_platform.featurestore.online.redis_store import RedisOnlineStore, unlink_matching

# Old private name, still imported by serving/stream.py.
_ARROW_TYPE = ARROW_TYPE


def __getattr__(name: str):
    # `materialize` lives next to FeatureStore and imports this package: resolved on first use,
    # so importing either module first works.
    if name == "materialize":
        from ml_platform.featurestore.materialize_online import materialize

        return materialize
    if name == "RedisClusterOnlineStore":
        from ml_platform.featurestore.online.cluster_store import RedisClusterOnlineStore

        return RedisClusterOnlineStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ARROW_TYPE",
    "EVENT_TIMESTAMP",
    "NOT_FOUND",
    "OUTSIDE_MAX_AGE",
    "PRESENT",
    "OnlineStore",
    "OnlineStoreError",
    "RedisClusterOnlineStore",
    "RedisOnlineStore",
    "ValueCodec",
    "ViewSchema",
    "entity_field",
    "materialize",
    "unlink_matching",
]
