"""`RedisOnlineStore`: the online store of one project in one Redis database.

Key layout (one prefix per project, `<project>:online:`; see docs/online_store.md):

    <project>:online:meta:<view>              hash: current version pointer, schema per version,
                                              last materialization (as_of, rows, seconds, mode)
    <project>:online:data:<view>:<version>    hash: entity field -> packed value (all the view's
                                              features + the event timestamp, one field per entity)
    <project>:online:overlay:<view>:<version> hash: stream updates that arrive while a full
                                              materialization of <version> is still bulk-loading

This module holds the store's state, keys, schema lookups and housekeeping (retiring old
versions, metadata, teardown); the read path is `snapshot_reads.SnapshotReads`, the write path
`versioned_writes.VersionedWrites`, the value format `codec`, the wire client `resp`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import redis

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online.codec import ValueCodec, ViewSchema
from ml_platform.featurestore.online.protocol import OnlineStoreError
from ml_platform.featurestore.online.resp import RespChannel, to_text
from ml_platform.featurestore.online.snapshot_reads import SnapshotReads
from ml_platform.featurestore.online.versioned_writes import VersionedWrites


class RedisOnlineStore(SnapshotReads, VersionedWrites):
    """The online store of one project in one Redis database.

    `views`: the feature view definitions (optional; a list, or a name -> view mapping kept by
    reference). When given, reads take join keys and TTL from them (the single source of truth)
    and `write_view` accepts a view name; without them the store uses what was recorded in Redis
    when each view was materialized. `batch_size` entities per write command and
    `pipeline_window` commands in flight trade materialization speed against the latency of
    reads served meanwhile (see docs/online_store.md).
    """

    def __new__(cls, redis_client_or_url: Any = None, *args: Any, **kwargs: Any):
        # A RedisCluster client (or a redis+cluster:// URL) gets the cluster store, so callers
        # that build a client from configuration need not know which one they have.
        if cls is RedisOnlineStore and _is_cluster(redis_client_or_url):
            from ml_platform.featurestore.online.cluster_store import RedisClusterOnlineStore

            return super().__new__(RedisClusterOnlineStore)
        return super().__new__(cls)

    def __init__(
        self,
        redis_client_or_url: redis.Redis | str,
        project: str = "ml_platform",
        *,
        views: Iterable[FeatureView] | Mapping[str, FeatureView] | None = None,
        retire_grace_seconds: float = 0.0,
        batch_size: int = 250,
        pipeline_window: int = 4,
        async_client: Any = None,
    ):
        if isinstance(redis_client_or_url, str):
            if _is_cluster(redis_client_or_url):
                from ml_platform.featurestore.redis_cluster import cluster_client_from_url as client_from_url
            else:
                from ml_platform.featurestore.redis_server import client_from_url

            redis_client_or_url = client_from_url(redis_client_or_url)
        if not project or any(c in project for c in "*?[]\\ :"):
            raise ValueError(f"project {project!r} must be non-empty without spaces, ':' or glob characters")
        self.client: redis.Redis = redis_client_or_url
        self.async_client = async_client
        self.project = project
        self.namespace = f"{project}:online:"
        self.retire_grace_seconds = float(retire_grace_seconds)
        self.batch_size = int(batch_size)
        self.pipeline_window = int(pipeline_window)
        # A Mapping is kept by reference (e.g. the FeatureStore's registry), so views applied later
        # are seen; an iterable is copied.
        self.views: Mapping[str, FeatureView] = (
            views if isinstance(views, Mapping) else {v.name: v for v in (views or ())}
        )
        self._channel = self._make_channel()
        self._codecs: dict[
            tuple[str, str], ValueCodec
        ] = {}  # (view, version) -> codec; versions are immutable
        self._recorded: dict[str, ViewSchema] = {}  # view -> schema of the latest version seen
        self._definition_schemas: dict[str, tuple[FeatureView, ViewSchema]] = {}
        self._schema_codecs: dict[ViewSchema, ValueCodec] = {}
        self._parsed_refs: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
        self._versions: dict[str, bytes] = {}  # view -> version last read (checked inside every read)

    def _make_channel(self) -> Any:
        return RespChannel(self.client)

    # ---- keys

    def meta_key(self, view: str) -> str:
        return f"{self.namespace}meta:{view}"

    def data_key(self, view: str, version: int | str) -> str:
        return f"{self.namespace}data:{view}:{version}"

    def overlay_key(self, view: str, version: int | str) -> str:
        return f"{self.namespace}overlay:{view}:{version}"

    def _version_keys(self, view: str, version: int | str) -> list[str]:
        """Every data key of one version (one here; one per bucket on a cluster)."""
        return [self.data_key(view, version)]

    def _count_rows(self, view: str, version: int | str) -> int:
        """Entities stored in one version."""
        return int(self.client.hlen(self.data_key(view, version)))

    # ---- schema lookups

    def _definition(self, view: FeatureView | str) -> FeatureView | None:
        if isinstance(view, FeatureView):
            return view
        return self.views.get(view)

    def _codec(self, view: str, version: str) -> ValueCodec:
        codec = self._codecs.get((view, version))
        if codec is None:
            text = self.client.hget(self.meta_key(view), f"schema:{version}")
            if text is None:
                raise OnlineStoreError(
                    f"feature view {view!r} version {version} has no recorded schema in Redis"
                )
            codec = ValueCodec(ViewSchema.from_json(text))
            self._codecs[(view, version)] = codec
        return codec

    def _current_schema(self, view: str, refresh: bool = False) -> ViewSchema:
        """Schema of the view's current version, as recorded at materialization."""
        if not refresh and view in self._recorded:
            return self._recorded[view]
        version = self.client.hget(self.meta_key(view), "version")
        if version is None:
            raise self._not_materialized(view)
        schema = self._codec(view, to_text(version)).schema
        self._recorded[view] = schema
        return schema

    def _not_materialized(self, view: str) -> OnlineStoreError:
        return OnlineStoreError(
            f"feature view {view!r} has not been materialized into Redis (project {self.project!r}); "
            f"run a full materialization of it first"
        )

    def _schema_for_read(self, view: str) -> ViewSchema:
        definition = self.views.get(view)
        return self._current_schema(view) if definition is None else self._definition_schema(definition)

    def _definition_schema(self, definition: FeatureView) -> ViewSchema:
        cached = self._definition_schemas.get(definition.name)
        if cached is None or cached[0] is not definition:
            cached = self._definition_schemas[definition.name] = (definition, ViewSchema.of(definition))
        return cached[1]

    def _codec_for(self, schema: ViewSchema) -> ValueCodec:
        codec = self._schema_codecs.get(schema)
        if codec is None:
            codec = self._schema_codecs[schema] = ValueCodec(schema)
        return codec

    # ---- housekeeping

    def _retire(self, view: str, version: str, key: str) -> None:
        if self.retire_grace_seconds <= 0:
            self.client.unlink(key)  # UNLINK frees a big hash in a background thread; DEL would block Redis
            self.client.hdel(self.meta_key(view), f"schema:{version}")
            return
        deadline = time.time() + self.retire_grace_seconds
        self.client.hset(self.meta_key(view), f"retired:{version}", f"{deadline:.3f}")

    def reap_retired(self, view: str | None = None, *, now: float | None = None) -> list[str]:
        """Delete retired versions whose grace period is over (all views when `view` is None).
        Returns the deleted data keys."""
        now = time.time() if now is None else now
        names = [view] if view else self.materialized_views()
        deleted = []
        for name in names:
            meta = self.meta_key(name)
            for field, deadline in self.client.hgetall(meta).items():
                field = to_text(field)
                if field.startswith("retired:") and float(deadline) <= now:
                    version = field.split(":", 1)[1]
                    keys = self._version_keys(name, version)
                    self.client.unlink(*keys)
                    self.client.hdel(meta, field, f"schema:{version}")
                    deleted += keys
        return deleted

    def materialized_views(self) -> list[str]:
        prefix = f"{self.namespace}meta:"
        return sorted(
            to_text(k)[len(prefix) :] for k in self.client.scan_iter(match=prefix + "*", count=1000)
        )

    def metadata(self, view: str) -> dict[str, Any]:
        """The view's last materialization: version, as_of, rows (entities in the current version),
        last_mode / last_rows / last_seconds, materialized_at, ttl_seconds; {} if never materialized."""
        raw = {to_text(k): to_text(v) for k, v in self.client.hgetall(self.meta_key(view)).items()}
        if "version" not in raw:
            return {}
        schema = ViewSchema.from_json(raw[f"schema:{raw['version']}"])
        return {
            "view": view,
            "version": int(raw["version"]),
            "as_of": datetime.fromisoformat(raw["as_of"]) if raw.get("as_of") else None,
            "rows": int(raw.get("rows", 0)),
            "last_mode": raw.get("last_mode"),
            "last_rows": int(raw.get("last_rows", 0)),
            "last_seconds": float(raw.get("last_seconds", 0.0)),
            "materialized_at": datetime.fromisoformat(raw["materialized_at"])
            if raw.get("materialized_at")
            else None,
            "features": [n for n, _ in schema.features],
            "ttl_seconds": schema.ttl_seconds,
            "building": int(raw["building"]) if raw.get("building") else None,
            "retired_versions": sorted(int(k.split(":", 1)[1]) for k in raw if k.startswith("retired:")),
        }

    def delete_project(self) -> int:
        """Delete every key of this project's online store. Returns the number of keys deleted."""
        deleted = unlink_matching(self.client, self.namespace.replace("\\", "\\\\") + "*")
        self._codecs.clear()
        self._recorded.clear()
        self._versions.clear()
        return deleted

    def close(self) -> None:
        self._channel.close()


def _is_cluster(client_or_url: Any) -> bool:
    from ml_platform.featurestore.redis_cluster import is_cluster_client, is_cluster_url

    if isinstance(client_or_url, str):
        return is_cluster_url(client_or_url)
    return is_cluster_client(client_or_url)


def unlink_matching(client: redis.Redis, pattern: str, batch_size: int = 500) -> int:
    """UNLINK (never DEL: a big hash would block Redis) every key matching `pattern`; returns the count."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= batch_size:
            deleted += client.unlink(*batch)
            batch = []
    if batch:
        deleted += client.unlink(*batch)
    return deleted
