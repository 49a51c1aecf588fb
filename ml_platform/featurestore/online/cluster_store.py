"""`RedisClusterOnlineStore`: the online store of one project on a Redis Cluster.

The same store as `RedisOnlineStore` (schemas, metadata, run records, TTL, the value codec and
the `_assemble`d read result are shared), with the entities spread over hash-tagged buckets
(cluster_layout.py), reads that check every bucket's pointer (cluster_reads.py) and full builds
flipped globally, then per bucket (cluster_writes.py). `RedisOnlineStore(client)` with a
`redis.cluster.RedisCluster` client, or a `redis+cluster://` URL, makes one of these.
"""

from __future__ import annotations

from typing import Any

from ml_platform.featurestore.online.cluster_layout import BUCKETS, ClusterKeys
from ml_platform.featurestore.online.cluster_reads import ClusterReads
from ml_platform.featurestore.online.cluster_resp import ClusterChannel
from ml_platform.featurestore.online.cluster_writes import ClusterWrites
from ml_platform.featurestore.online.redis_store import RedisOnlineStore


class RedisClusterOnlineStore(ClusterReads, ClusterWrites, RedisOnlineStore):
    """`RedisOnlineStore` on a `redis.cluster.RedisCluster` client (`async_client`: a
    `redis.asyncio.cluster.RedisCluster`). `buckets`: entity buckets per view (the layout; every
    client of a project must use the same number, the default unless you know why not)."""

    def __init__(
        self, redis_client_or_url: Any, project: str = "ml_platform", *, buckets: int = BUCKETS, **kwargs: Any
    ):
        if any(c in project for c in "{}"):
            raise ValueError(
                f"project {project!r} must not contain '{{' or '}}' on Redis Cluster (hash tags)"
            )
        super().__init__(redis_client_or_url, project, **kwargs)
        self.keys = ClusterKeys(self.namespace, buckets)
        self._bucket_keys_cache = {}

    def _make_channel(self) -> ClusterChannel:
        return ClusterChannel(self.client)
