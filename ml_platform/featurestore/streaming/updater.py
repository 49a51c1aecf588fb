"""The streaming updater: folds batches of events into the entities' buffers in Redis and
computes their windowed features (`StreamingUpdater.fold`, or `submit` + `PendingFold.result`
to overlap the Redis call with other work).

One Lua script call per batch (`fold.lua`, loaded once) appends each entity's new records,
returns only what this worker lacks (`BufferCache`), trims a buffer when due and refreshes its
expiry; the features are then computed with numpy over all entities of the batch at once
(`windows.evaluate_group`).

On a RedisCluster client the buffers are spread over the online store's hash-tagged buckets and
the script runs once per bucket (`cluster_fold.BucketedFold`); everything else is the same.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from importlib import resources
from typing import Any

import numpy as np
import redis

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online import unlink_matching
from ml_platform.featurestore.redis_cluster import is_cluster_client
from ml_platform.featurestore.streaming.buffer import BufferCache, key_part, pack_records
from ml_platform.featurestore.streaming.events import EventColumns
from ml_platform.featurestore.streaming.plan import BufferGroup, compile_views
from ml_platform.featurestore.streaming.windows import FoldResult, evaluate_group
from ml_platform.timestamps import span_us

DEFAULT_TRIM_SLACK = timedelta(days=1)
FOLD_LUA = resources.files(__package__).joinpath("fold.lua").read_text(encoding="utf-8")
# The script's per-buffer head (ARGV[4], see fold.lua): fixed width, built with numpy per batch.
FOLD_HEAD_DTYPE = np.dtype(
    [
        ("klen", "<u2"),
        ("width", "<u2"),
        ("trigger", "<i8"),
        ("bound", "<i8"),
        ("epoch", "<i8"),
        ("known", "<u4"),
        ("refresh", "u1"),
        ("nbytes", "<u4"),
    ]
)
assert FOLD_HEAD_DTYPE.itemsize == 37  # the script's stride


class StreamingUpdater:
    """Incremental windowed features for `views` (their aggregated ones), state in Redis under
    `<project>:stream:state:`. `trim_slack`: history kept beyond the longest window so late or
    replayed events still get exact values; `state_expiry`: an idle entity's buffer expires after
    the longest window + slack + this (wall clock), None to keep buffers until trimmed;
    `cache_bytes`: the worker-side copy of buffers (only appended bytes are then read; 0 = off)."""

    def __init__(
        self,
        client: redis.Redis,
        project: str,
        views: Iterable[FeatureView],
        *,
        trim_slack: timedelta = DEFAULT_TRIM_SLACK,
        state_expiry: timedelta | None = timedelta(0),
        cache_bytes: int = 256 * 2**20,
    ) -> None:
        if not project or any(c in project for c in "*?[]\\ :"):
            raise ValueError(f"project {project!r} must be non-empty without spaces, ':' or glob characters")
        self.client = client
        self.project = project
        self.compiled, self.groups = compile_views(views)
        if not self.compiled:
            raise ValueError("StreamingUpdater needs at least one feature view with aggregations")
        self.trim_slack_us = span_us(trim_slack)
        self.state_expiry = state_expiry
        self.cache = BufferCache(cache_bytes)
        if is_cluster_client(client):
            from ml_platform.featurestore.streaming.cluster_fold import BucketedFold

            if any(c in project for c in "{}"):
                raise ValueError(f"project {project!r} must not contain '{{' or '}}' on Redis Cluster (hash tags)")
            self._bucketed: BucketedFold | None = BucketedFold(client, self.state_prefix, FOLD_LUA)
            self._join_keys = {name: self._bucketed.join_keys(g, self.compiled) for name, g in self.groups.items()}
        else:
            self._bucketed = None
            self._script = client.register_script(FOLD_LUA)
        # Wall seconds per part of `fold` (pack, script: waiting for its reply, cache, evaluate).
        self.phase_seconds: dict[str, float] = {"pack": 0.0, "script": 0.0, "cache": 0.0, "evaluate": 0.0}
        self._sender: ThreadPoolExecutor | None = None  # sends fold scripts (see submit)
        self._generation = 0  # of the last submitted fold

    # ---- keys

    @property
    def state_prefix(self) -> str:
        return f"{self.project}:stream:state:"

    def _key_prefix(self, group: BufferGroup, bucket: int | None = None) -> str:
        if bucket is None:  # one node
            return f"{self.state_prefix}{group.name}:{group.layout_id}:"
        return f"{self._bucketed.prefixes[bucket]}{group.name}:{group.layout_id}:"

    def buffer_key(self, view: str, entity: Mapping[str, Any]) -> str:
        """The Redis key of the buffer holding `entity`'s rows of `view` (base join key values
        joined with ':'; on a cluster after the hash tag of the entity's bucket)."""
        group = self.groups[self.compiled[view].group]
        values = tuple(entity[k] for k in group.base_keys)
        bucket = None
        if self._bucketed is not None:
            bucket = int(self._bucketed.entity_buckets(self._join_keys[group.name], [values])[0])
        return self._key_prefix(group, bucket) + ":".join(key_part(v) for v in values)

    def _expiry_ms(self, group: BufferGroup) -> int:
        if self.state_expiry is None:
            return 0
        return (group.keep_window_us + self.trim_slack_us + span_us(self.state_expiry)) // 1000

    # ---- folding

    def fold(
        self,
        events: Sequence[Mapping[str, Any]],
        views: Iterable[str] | None = None,
        *,
        with_event_values: bool = False,
        compute: bool = True,
    ) -> FoldResult:
        """Fold `events` into the buffers of every applicable view and compute the features.

        An event is a dict with `event_id` (str), the join keys, each view's timestamp field as int
        µs since the epoch (None = not a row of that view) and the value columns (None/NaN = NULL);
        `events_from_frame` builds them from a DataFrame. An event is a row of a view when it has
        the view's timestamp and join keys. `compute=False` only folds (seeding).
        """
        pending = self.submit(events, views, compute=compute)
        if not compute:
            pending.collect()
            return FoldResult({}, {}, {}, {}, {})
        return pending.result(with_event_values=with_event_values)

    def submit(
        self, events: Sequence[Mapping[str, Any]], views: Iterable[str] | None = None, *, compute: bool = True
    ) -> PendingFold:
        """Pack `events` and send their fold script without waiting for Redis: the caller can
        compute something else meanwhile (the stream worker evaluates and scores the previous
        batch), then `PendingFold.result()`. Scripts of one updater run in submission order.
        Collect a fold before submitting the next: submitting makes an uncollected fold stale --
        its reply is never applied to the worker cache (safe: the next replies carry those bytes
        as if another worker had appended them) and its `collect()` / `result()` raise."""
        wanted = list(views) if views is not None else list(self.compiled)
        unknown = [v for v in wanted if v not in self.compiled]
        if unknown:
            raise ValueError(
                f"no aggregated feature view {unknown}; the updater knows {sorted(self.compiled)}"
            )
        group_names = list(dict.fromkeys(self.compiled[v].group for v in wanted))
        began = time.perf_counter()
        batch = EventColumns(events)
        now = time.monotonic()
        heads: list[np.ndarray] = []
        buckets: list[np.ndarray] = []  # on a cluster: each buffer's bucket
        key_blobs: list[bytes] = []
        record_blobs: list[bytes] = []
        names: list[bytes] = []  # per buffer of the call, in script order
        sent: list[bytes] = []  # the records appended to each buffer
        refreshes: list[int] = []
        plans: list[tuple] = []
        expiry = 0
        for group_name in group_names:
            group = self.groups[group_name]
            ts, present = batch.ints(group.timestamp_field)
            for k in group.base_keys:
                present = present & batch.present(k)
            rows = np.flatnonzero(present)
            if not len(rows):
                plans.append((group, rows, None, [], len(names)))
                continue
            # Entities: a slot per row; each buffer gets its rows' records in one piece.
            slot, entity_keys = batch.entities(group.base_keys, rows)
            order = np.argsort(slot, kind="stable")
            counts = np.bincount(slot, minlength=len(entity_keys))
            ends = np.cumsum(counts)
            starts = ends - counts
            width = group.record_dtype.itemsize
            records = pack_records(group, batch, rows)[order].tobytes()
            if self._bucketed is not None:
                where = self._bucketed.entity_buckets(self._join_keys[group_name], entity_keys)
                prefixes = [self._key_prefix(group, b) for b in range(self._bucketed.buckets)]
                keys = [
                    (prefixes[b] + ":".join([key_part(v) for v in k])).encode()
                    for b, k in zip(where.tolist(), entity_keys)
                ]
                buckets.append(where)
            elif len(group.base_keys) == 1:
                prefix = self._key_prefix(group)
                keys = [(prefix + key_part(k[0])).encode() for k in entity_keys]
            else:
                prefix = self._key_prefix(group)
                keys = [(prefix + ":".join([key_part(v) for v in k])).encode() for k in entity_keys]
            head = np.zeros(len(keys), FOLD_HEAD_DTYPE)
            head["klen"] = [len(k) for k in keys]
            head["width"] = width
            bound = np.maximum.reduceat(ts[rows][order], starts) - (group.keep_window_us + self.trim_slack_us)
            head["trigger"] = bound - self.trim_slack_us
            head["bound"] = bound
            head["nbytes"] = counts * width
            if compute:
                known = self.cache.known
                cached = np.array([known(k, now) for k in keys], np.int64).reshape(len(keys), 3)
                head["epoch"], head["known"], head["refresh"] = cached[:, 0], cached[:, 1], cached[:, 2]
                refreshes += cached[:, 2].tolist()
                sent += [records[a:b] for a, b in zip((starts * width).tolist(), (ends * width).tolist())]
            else:
                head["refresh"] = 1
            heads.append(head)
            key_blobs.append(b"".join(keys))
            record_blobs.append(records)
            names += keys
            expiry = max(expiry, self._expiry_ms(group))
            plans.append((group, rows, slot, entity_keys, len(names)))
        self._generation += 1
        pending = PendingFold(
            self, self._generation, batch, wanted, plans, names, sent, refreshes, now, compute
        )
        if names and self._bucketed is not None:
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="fold-script")
            pending.future = self._sender.submit(
                self._bucketed.run, expiry, compute, np.concatenate(heads), names,
                b"".join(record_blobs), np.concatenate(buckets),
            )  # fmt: skip
        elif names:
            nonce = secrets.randbelow(2**36 - 1) + 1
            args = [
                expiry,
                b"1" if compute else b"0",
                nonce,
                b"".join([h.tobytes() for h in heads]),
                b"".join(key_blobs),
                b"".join(record_blobs),
            ]
            if self._sender is None:
                self._sender = ThreadPoolExecutor(1, thread_name_prefix="fold-script")
            pending.future = self._sender.submit(self._script, keys=[], args=args)
        self.phase_seconds["pack"] += time.perf_counter() - began
        return pending

    def close(self) -> None:
        """Stop the thread that sends fold scripts (a new one starts if the updater is used again)."""
        if self._sender is not None:
            self._sender.shutdown(wait=True)
            self._sender = None
        if self._bucketed is not None:
            self._bucketed.close()

    # ---- housekeeping

    def delete_state(self) -> int:
        """Delete every buffer of this project (tests, a full reset). Returns keys deleted."""
        self.cache.clear()
        return unlink_matching(self.client, self.state_prefix + "*")

    def seed(self, events: Iterable[Mapping[str, Any]], *, batch_size: int = 5000) -> int:
        """Fold historical events into the buffers without computing features (a cold start: the
        online store already holds their values from the offline materialization). Returns rows."""
        total = 0
        batch: list[Mapping[str, Any]] = []
        for event in events:
            batch.append(event)
            if len(batch) >= batch_size:
                self.fold(batch, compute=False)
                total += len(batch)
                batch = []
        if batch:
            self.fold(batch, compute=False)
            total += len(batch)
        return total


class PendingFold:
    """A submitted fold (`StreamingUpdater.submit`): `collect()` waits for the script's reply and
    updates the worker cache; `result()` also computes the features."""

    def __init__(self, updater, generation, batch, wanted, plans, names, sent, refreshes, now, compute):
        self.updater = updater
        self.generation = generation
        self.batch = batch
        self.wanted = wanted
        self.plans = plans
        self.names = names
        self.sent = sent
        self.refreshes = refreshes
        self.now = now
        self.compute = compute
        self.future: Future | None = None
        self._blobs: list[bytes] | None = None

    def collect(self) -> list[bytes]:
        """Wait for the script (raising its error); apply the reply to the cache. Returns the
        buffers' records (before any trim), in script order."""
        if self._blobs is not None:
            return self._blobs
        updater = self.updater
        phases = updater.phase_seconds
        began = time.perf_counter()
        replies = self.future.result() if self.future is not None else []
        replied = time.perf_counter()
        phases["script"] += replied - began
        if not self.compute:
            self._blobs = []
            return self._blobs
        if self.generation != updater._generation:
            raise RuntimeError(
                "this fold's reply is stale (a later fold was submitted before it was collected); "
                "collect a fold before submitting the next"
            )
        update, now = updater.cache.update, self.now
        self._blobs = [update(*item, now) for item in zip(self.names, replies, self.sent, self.refreshes)]
        phases["cache"] += time.perf_counter() - replied
        return self._blobs

    def result(self, *, with_event_values: bool = False) -> FoldResult:
        """The features of the folded events (see `FoldResult`)."""
        blobs = self.collect()
        began = time.perf_counter()
        result = FoldResult({}, {}, {}, {}, {})
        start = 0
        for group, rows, slot, entity_keys, stop in self.plans:
            members = [self.updater.compiled[v] for v in group.views if v in self.wanted]
            evaluate_group(
                group,
                members,
                self.batch,
                rows,
                slot,
                entity_keys,
                blobs[start:stop],
                with_event_values,
                result,
            )
            start = stop
        self.updater.phase_seconds["evaluate"] += time.perf_counter() - began
        return result
