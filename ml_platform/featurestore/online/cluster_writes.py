"""Versioned writes on Redis Cluster: the write path of `RedisClusterOnlineStore` (a mixin).

A full build of version v of a view, each step over every bucket (scripts run per bucket, on
the bucket's master, pipelined over all masters at once):

 1. roll forward: a version flipped globally by a writer that died before its buckets followed
    is committed everywhere first (idempotent);
 2. BEGIN in the global meta hash (schema:v, building=v) and BUCKET_BEGIN in every bucket's ptr;
 3. bulk load: each chunk's entities are grouped by bucket, HSET per bucket of `batch_size`;
 4. MERGE_PHASE per bucket, then the bucket's overlay merged (newer event time wins);
 5. roll forward again (a racing writer's flip), then BUCKET_PREPARE: `next=v` per bucket;
 6. CLUSTER_FLIP in the global meta hash (fails if another build took over: SUPERSEDED);
 7. BUCKET_COMMIT per bucket: version=v, `next` cleared, the old data key UNLINKed (grace 0).

Steps 2-6 failing abort the build (every bucket's partial version deleted, the previous one
keeps serving). After step 6 the version is the view's: a failure in step 7 is finished by the
next full build's roll forward, and readers accept v everywhere meanwhile (it is every bucket's
`version` or `next`). What is atomic: docs/online_store.md, "Redis Cluster".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from ml_platform.featurestore.online import scripts
from ml_platform.featurestore.online.cluster_layout import ClusterKeys
from ml_platform.featurestore.online.cluster_resp import ClusterChannel
from ml_platform.featurestore.online.codec import ValueCodec, ViewSchema
from ml_platform.featurestore.online.entity_keys import bucket_groups, entity_buckets, entity_fields
from ml_platform.featurestore.online.protocol import OnlineStoreError
from ml_platform.featurestore.online.resp import LuaScript, bulk, framed_command, to_text

SCRIPT_WINDOW = 16  # per-bucket scripts in flight per master


def by_bucket(fields, values, n_buckets: int, batch_size: int) -> Iterator[tuple[int, Any, Any]]:
    """(bucket, fields, values) groups of at most `batch_size` entities, one bucket each."""
    for bucket, positions in bucket_groups(entity_buckets(fields, n_buckets)):
        for s in range(0, len(positions), batch_size):
            idx = positions[s : s + batch_size]
            yield bucket, _take(fields, idx), _take(values, idx)


def _take(items, idx: np.ndarray):
    return items[idx] if isinstance(items, np.ndarray) else [items[i] for i in idx]


class ClusterWrites:
    """`_full_build`, upserts and row counts of RedisClusterOnlineStore."""

    keys: ClusterKeys
    client: Any
    batch_size: int
    pipeline_window: int
    retire_grace_seconds: float
    _channel: ClusterChannel
    _codecs: dict[tuple[str, str], ValueCodec]

    if TYPE_CHECKING:  # provided by RedisOnlineStore / VersionedWrites

        def meta_key(self, view: str) -> str: ...
        def _run_record(self, mode: str, rows: int, seconds: float, as_of) -> dict[str, str]: ...
        def _merge_overlay(self, overlay: str, data_key: str) -> None: ...
        def _retire(self, view: str, version: str, key: str) -> None: ...
        def _superseded(self, view: str, version: int, exc: Exception) -> OnlineStoreError: ...

    # ---- per-bucket helpers

    def _each_bucket(self, script: LuaScript, frame) -> list:
        """Run `script` in every bucket: `frame(bucket)` gives its (keys, args)."""
        self._channel.load_scripts(script)
        items = []
        for b in range(self.keys.buckets):
            keys, args = frame(b)
            items.append((self.keys.slots[b], script.frame([k.encode() for k in keys], args)))
        try:
            return self._channel.stream(items, window=SCRIPT_WINDOW)
        except NoScriptError:  # a master lost its script cache (restart, SCRIPT FLUSH): every
            self._channel.load_scripts(script, again=True)  # per-bucket script is idempotent
            return self._channel.stream(items, window=SCRIPT_WINDOW)

    def _each_bucket_command(self, name: bytes, key) -> list:
        """One single-key command (`name key`) in every bucket, e.g. HLEN of each data key."""
        items = [
            (self.keys.slots[b], b"*2\r\n" + bulk(name) + bulk(key(b).encode()))
            for b in range(self.keys.buckets)
        ]
        return self._channel.stream(items, window=SCRIPT_WINDOW)

    def _run_script(self, script: LuaScript, key: str, payload: bytes) -> Any:
        return self._channel.run_script(script, key_slot(key.encode()), payload)

    def _count_rows(self, view: str, version: int | str) -> int:
        return sum(
            int(n) for n in self._each_bucket_command(b"HLEN", lambda b: self.keys.data(b, view, version))
        )

    def _version_keys(self, view: str, version: int | str) -> list[str]:
        return [self.keys.data(b, view, version) for b in range(self.keys.buckets)]

    def _roll_forward(self, view: str) -> None:
        """Commit the globally current version in every bucket still holding it as `next`."""
        version, fp = self.client.hmget(self.meta_key(view), ["version", "current_fp"])
        if version is None:
            return
        v = to_text(version)
        unlink = b"1" if self.retire_grace_seconds <= 0 else b"0"
        replies = self._each_bucket(
            scripts.BUCKET_COMMIT,
            lambda b: (
                [self.keys.ptr(b, view)],
                [v.encode(), self.keys.data(b, view, v).encode(), fp or b"", unlink],
            ),
        )
        # The dead writer never retired the version it replaced: do it now (schema, or grace).
        for old in sorted({to_text(r[0]) for r in replies if r[0]} - {v}):
            self._retire(view, old, "")

    def _check_layout(self, meta: str) -> None:
        recorded = self.client.hget(meta, "buckets")
        if recorded is not None and int(recorded) != self.keys.buckets:
            raise OnlineStoreError(
                f"{meta} was written with {int(recorded)} buckets per view, this store uses "
                f"{self.keys.buckets}; every client of a project must use the same number"
            )

    # ---- full builds

    def _full_build(
        self, view, schema: ViewSchema, codec: ValueCodec, batches, timestamp_column, as_of, started
    ):
        keys = self.keys
        meta = self.meta_key(view)
        self._check_layout(meta)
        self._roll_forward(view)
        version = int(self.client.hincrby(meta, "next_version", 1))
        v = str(version).encode()
        fp = codec.fingerprint.encode()
        self._run_script(
            scripts.BEGIN,
            meta,
            scripts.BEGIN.frame([meta.encode()], [v, b"", b"", fp, schema.to_json().encode()]),
        )
        self.client.hset(meta, "buckets", keys.buckets)
        try:
            self._each_bucket(
                scripts.BUCKET_BEGIN,
                lambda b: (
                    [keys.ptr(b, view)],
                    [v, keys.data(b, view, version).encode(), keys.overlay(b, view, version).encode(), fp],
                ),
            )
            rows = 0

            def commands() -> Iterator[tuple[int, bytes]]:
                nonlocal rows
                for batch in batches:
                    fields = entity_fields(schema.join_keys, batch)
                    values = codec.encode(batch, timestamp_column)
                    rows += batch.num_rows
                    for b, f, val in by_bucket(fields, values, keys.buckets, self.batch_size):
                        yield (
                            keys.slots[b],
                            framed_command([b"HSET", keys.data(b, view, version).encode()], f, val),
                        )

            self._channel.stream(commands(), window=self.pipeline_window)
            self._each_bucket(scripts.MERGE_PHASE, lambda b: ([keys.ptr(b, view)], [v]))
            pending = self._each_bucket_command(b"HLEN", lambda b: keys.overlay(b, view, version))
            for b, n in enumerate(pending):
                if int(n):
                    self._merge_overlay(keys.overlay(b, view, version), keys.data(b, view, version))
            self._roll_forward(view)  # a racing writer flipped meanwhile: its buckets follow first
            self._each_bucket(scripts.BUCKET_PREPARE, lambda b: ([keys.ptr(b, view)], [v]))
            total = self._count_rows(view, version)
            record = self._run_record("full", rows, time.perf_counter() - started, as_of)
            record_args = [x.encode() for kv in record.items() for x in kv]
            old_version = self._run_script(
                scripts.CLUSTER_FLIP,
                meta,
                scripts.CLUSTER_FLIP.frame([meta.encode()], [v, fp, str(total).encode(), *record_args]),
            )
        except BaseException as exc:
            with contextlib.suppress(redis.RedisError, OSError):
                self._each_bucket(
                    scripts.ABORT,
                    lambda b: (
                        [keys.ptr(b, view)],
                        [v, keys.data(b, view, version).encode(), keys.overlay(b, view, version).encode()],
                    ),
                )
                self._run_script(scripts.ABORT, meta, scripts.ABORT.frame([meta.encode()], [v]))
            if isinstance(exc, redis.ResponseError) and "SUPERSEDED" in str(exc):
                raise self._superseded(view, version, exc) from exc
            raise
        # Flipped: the version is the view's now; the buckets follow (a failure here is finished by
        # the next build's roll forward; readers accept v in every bucket meanwhile).
        self._codecs[(view, str(version))] = codec
        unlink = b"1" if self.retire_grace_seconds <= 0 else b"0"
        self._each_bucket(
            scripts.BUCKET_COMMIT,
            lambda b: ([keys.ptr(b, view)], [v, keys.data(b, view, version).encode(), fp, unlink]),
        )
        if old_version:
            self._retire(view, to_text(old_version), "")
        return rows, version

    def _retire(self, view: str, version: str, key: str) -> None:
        if self.retire_grace_seconds <= 0:  # BUCKET_COMMIT unlinked the old data keys already
            self.client.hdel(self.meta_key(view), f"schema:{version}")
            return
        super()._retire(view, version, key)  # type: ignore[misc]

    # ---- upserts (incremental writes and stream updates)

    def _upsert_items(self, view: str, codec: ValueCodec, fields, values) -> Iterator[tuple[int, bytes]]:
        fp = codec.fingerprint.encode()
        for b, f, val in by_bucket(fields, values, self.keys.buckets, self.batch_size):
            yield (
                self.keys.slots[b],
                scripts.UPSERT.frame([self.keys.ptr(b, view).encode()], [fp], pairs=(f, val)),
            )

    def _upsert(self, view: str, codec: ValueCodec, fields, values) -> int:
        """Newer-wins upsert, atomic per bucket (per `batch_size` entities of one bucket)."""
        items = list(self._upsert_items(view, codec, fields, values))
        try:
            replies = self._channel.stream(items)
        except NoScriptError:  # a master without the script: load it everywhere, send all again
            self._channel.load_scripts(scripts.UPSERT, again=True)  # (newer-wins: a replay is harmless)
            replies = self._channel.stream(items)
        return sum(int(n) for n in replies)

    def _upsert_batches(self, view, schema: ViewSchema, codec: ValueCodec, batches, timestamp_column) -> int:
        rows = 0

        def commands() -> Iterator[tuple[int, bytes]]:
            nonlocal rows
            for batch in batches:
                rows += batch.num_rows
                fields = entity_fields(schema.join_keys, batch)
                yield from self._upsert_items(view, codec, fields, codec.encode(batch, timestamp_column))

        self._channel.load_scripts(scripts.UPSERT, again=True)  # `batches` is read once: no retry mid-stream
        try:
            self._channel.stream(commands(), window=self.pipeline_window)
        except redis.ResponseError as exc:
            raise self._upsert_error(view, exc) from exc  # type: ignore[attr-defined]
        return rows
