"""Snapshot reads: the read path of `RedisOnlineStore` (a mixin, split out to keep each file to one
job; the class itself is in redis_store.py).

One MULTI/EXEC per request holds, per view, HGET of its version pointer and HMGET of all requested
entities from the version the client saw last; if a pointer moved, the read is redone with the new
version. So a read is one round trip (two right after a flip) and one consistent snapshot across
views. (A Lua script would do the same, but converting 100 values into and out of Lua strings cost
Redis ~2.7x more CPU here.) Values older than the view's TTL at `now` come back as None.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from ml_platform.featurestore.definitions import FeatureView, parse_feature_ref
from ml_platform.featurestore.online.codec import EVENT_TIMESTAMP, ValueCodec, ViewSchema
from ml_platform.featurestore.online.entity_keys import entity_field, framed_entity_fields
from ml_platform.featurestore.online.protocol import (
    NOT_FOUND,
    OUTSIDE_MAX_AGE,
    PRESENT,
    FeatureRequest,
    OnlineStoreError,
)
from ml_platform.featurestore.online.resp import RespChannel, bulk, to_text
from ml_platform.timestamps import EPOCH, now_us

READ_ATTEMPTS = 4  # pointer moves tolerated during one read before giving up


@dataclass
class ReadPlan:
    views: list[str]
    wanted: list[list[str]]  # features per view
    schemas: list[ViewSchema]  # join keys + ttl per view (definition, or recorded at materialization)
    keys: list[str]  # output join-key columns in order
    n: int
    meta_keys: list[bytes]
    framed: list  # per view: its entity fields, framed as RESP bulk strings (per bucket on a cluster)


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
_HGET_VERSION = b"*3\r\n$4\r\nHGET\r\n"
_VERSION = bulk(b"version")


def read_payload(plan: ReadPlan, data_keys: Sequence[bytes]) -> bytes:
    """MULTI, then per view: HGET <meta> version; HMGET <data key of the version we expect> <fields>;
    EXEC. One round trip; MULTI/EXEC makes the pointer read and the values one atomic snapshot."""
    parts = [_MULTI]
    for meta, data_key, framed in zip(plan.meta_keys, data_keys, plan.framed):
        parts.append(_HGET_VERSION + bulk(meta) + _VERSION)
        if plan.n:
            parts.append(b"*%d\r\n$5\r\nHMGET\r\n" % (2 + plan.n) + bulk(data_key) + framed)
        else:  # no entities: keep the reply shape (version, values) with a harmless command
            parts.append(b"*2\r\n$6\r\nEXISTS\r\n" + bulk(data_key))
    parts.append(_EXEC)
    return b"".join(parts)


class SnapshotReads:
    """`read` / `read_async` of RedisOnlineStore (which provides the attributes declared here)."""

    async_client: Any
    _channel: RespChannel
    _parsed_refs: dict[tuple[str, ...], list[tuple[str, list[str]]]]
    _versions: dict[str, bytes]

    if TYPE_CHECKING:  # provided by RedisOnlineStore (declared only for type checkers: no MRO stubs)

        def meta_key(self, view: str) -> str: ...
        def data_key(self, view: str, version: int | str) -> str: ...
        def _schema_for_read(self, view: str) -> ViewSchema: ...
        def _codec(self, view: str, version: str) -> ValueCodec: ...
        def _not_materialized(self, view: str) -> OnlineStoreError: ...

    def _plan(self, features: FeatureRequest, entity_rows: Sequence[Mapping[str, Any]]) -> ReadPlan:
        if isinstance(features, Mapping):
            requested = [
                (v.name if isinstance(v, FeatureView) else v, list(feats)) for v, feats in features.items()
            ]
        else:
            if isinstance(features, str):
                raise TypeError("features must be a list of 'view:feature' references, not one string")
            refs = tuple(features)
            requested = self._parsed_refs.get(refs)
            if requested is None:
                by_view: dict[str, list[str]] = {}
                for ref in refs:
                    view, feat = parse_feature_ref(ref)
                    by_view.setdefault(view, []).append(feat)
                requested = list(by_view.items())
                if len(self._parsed_refs) > 256:
                    self._parsed_refs.clear()
                self._parsed_refs[refs] = requested
        if not requested:
            raise ValueError("no features requested")
        if not isinstance(entity_rows, Sequence) or isinstance(entity_rows, (str, bytes, Mapping)):
            raise TypeError("entity_rows must be a list of dicts such as [{'user_id': 1}]")
        views, wanted, schemas, keys = [], [], [], []
        fields_cache: dict[tuple, bytes] = {}
        framed_per_view: list[bytes] = []
        for view, feats in requested:
            schema = self._schema_for_read(view)
            known = {n for n, _ in schema.features}
            unknown = [f for f in feats if f not in known]
            if unknown:
                raise ValueError(f"feature view {view!r} has no feature {unknown}; it has {sorted(known)}")
            jk = schema.join_keys
            framed = fields_cache.get(jk)
            if framed is None:
                framed = fields_cache[jk] = self._read_fields(jk, entity_rows)
            framed_per_view.append(framed)
            views.append(view)
            wanted.append(feats)
            schemas.append(schema)
            keys += [k for k, _ in jk if k not in keys]
        meta_keys = [self.meta_key(v).encode() for v in views]
        return ReadPlan(views, wanted, schemas, keys, len(entity_rows), meta_keys, framed_per_view)

    def _read_fields(self, join_keys, entity_rows: Sequence[Mapping[str, Any]]) -> Any:
        """What a read sends for the entities of one join-key set (here: the framed fields)."""
        return framed_entity_fields(join_keys, entity_rows)

    def read(
        self,
        features: FeatureRequest,
        entity_rows: Sequence[Mapping[str, Any]],
        *,
        full_feature_names: bool = False,
        include_event_timestamps: bool = False,
        include_status: bool = False,
        now: datetime | float | None = None,
    ) -> dict[str, list]:
        """Feast's get_online_features(features, entity_rows).to_dict(): column -> list in
        entity_rows order, join keys first. Unknown entities and values older than the view's TTL
        at `now` (default: wall clock) come back as None. `include_event_timestamps` adds
        `<view>__event_timestamp` columns; `include_status` adds `<view>__status` columns
        (PRESENT, NOT_FOUND or OUTSIDE_MAX_AGE). One round trip, one consistent snapshot."""
        plan = self._plan(features, entity_rows)
        for _ in range(READ_ATTEMPTS):
            expected = [self._versions.get(v, b"0") for v in plan.views]
            data_keys = [self.data_key(v, to_text(e)).encode() for v, e in zip(plan.views, expected)]
            reply = self._channel.transaction(read_payload(plan, data_keys), 2 + 2 * len(plan.views))
            if not plan.n:
                reply = [r if i % 2 == 0 else [] for i, r in enumerate(reply)]
            if self._versions_match(plan, expected, reply):
                break
        else:
            raise self._moving_target(plan)
        return self._assemble(
            plan, reply, entity_rows, full_feature_names, include_event_timestamps, include_status, now
        )

    async def read_async(
        self,
        features: FeatureRequest,
        entity_rows: Sequence[Mapping[str, Any]],
        *,
        full_feature_names: bool = False,
        include_event_timestamps: bool = False,
        include_status: bool = False,
        now: datetime | float | None = None,
    ) -> dict[str, list]:
        """`read` over the `async_client` (a redis.asyncio.Redis) given to the constructor."""
        if self.async_client is None:
            raise OnlineStoreError(
                "read_async needs RedisOnlineStore(..., async_client=redis.asyncio.Redis(...))"
            )
        plan = self._plan(features, entity_rows)  # may read a schema once, synchronously; cached after
        fields = {
            schema.join_keys: [entity_field(schema.join_keys, row, i) for i, row in enumerate(entity_rows)]
            for schema in plan.schemas
        }
        for _ in range(READ_ATTEMPTS):
            expected = [self._versions.get(v, b"0") for v in plan.views]
            async with self.async_client.pipeline(transaction=True) as pipe:
                for view, meta, version, schema in zip(plan.views, plan.meta_keys, expected, plan.schemas):
                    pipe.hget(meta, "version")
                    if fields[schema.join_keys]:
                        pipe.hmget(self.data_key(view, to_text(version)), fields[schema.join_keys])
                    else:
                        pipe.exists(self.data_key(view, to_text(version)))  # placeholder: no entities
                reply = await pipe.execute()
            reply = [r if i % 2 == 0 or plan.n else [] for i, r in enumerate(reply)]
            if self._versions_match(plan, expected, reply):
                break
        else:
            raise self._moving_target(plan)
        return self._assemble(
            plan, reply, entity_rows, full_feature_names, include_event_timestamps, include_status, now
        )

    def _versions_match(self, plan: ReadPlan, expected: list[bytes], reply: list) -> bool:
        """True if every view's current version was the one read; else remember the new ones and
        fetch their schemas now, before the retry: the values are decoded after EXEC, and a writer
        may retire (and delete the schema of) the version read right after that EXEC."""
        for item in reply:
            if isinstance(item, Exception):
                raise OnlineStoreError(f"reading {plan.views} from Redis failed: {item}") from item
        match = True
        for view, want, got in zip(plan.views, expected, reply[0::2]):
            if got is None:
                raise self._not_materialized(view)
            if got != want:
                version = got if isinstance(got, bytes) else str(got).encode()
                self._versions[view] = version
                with contextlib.suppress(OnlineStoreError):  # already retired: the retry sees a newer one
                    self._codec(view, version.decode())
                match = False
        return match

    def _moving_target(self, plan: ReadPlan) -> OnlineStoreError:
        return OnlineStoreError(
            f"the materialized versions of {plan.views} changed {READ_ATTEMPTS} times during one read; retry"
        )

    def _assemble(
        self, plan: ReadPlan, reply, entity_rows, full_names, with_ts, with_status, now
    ) -> dict[str, list]:
        n = plan.n
        at_us = now_us(now)
        out: dict[str, list] = {k: [row[k] for row in entity_rows] for k in plan.keys}
        features_out: dict[str, list] = {}
        extras: dict[str, list] = {}
        for view, wanted, schema, version, values in zip(
            plan.views, plan.wanted, plan.schemas, reply[0::2], reply[1::2]
        ):
            version = to_text(version)
            if not version:
                raise self._not_materialized(view)
            codec = self._codec(view, version)
            missing_feats = [f for f in wanted if f not in codec.position]
            if missing_feats:
                raise OnlineStoreError(
                    f"feature view {view!r}: the materialized version {version} has no feature {missing_feats}; "
                    f"re-materialize the view after changing its schema"
                )
            if codec.schema.join_keys != schema.join_keys:
                raise OnlineStoreError(
                    f"feature view {view!r}: join keys {[k for k, _ in schema.join_keys]} differ from the "
                    f"materialized version {version} ({[k for k, _ in codec.schema.join_keys]}); re-materialize it"
                )
            present = [i for i, v in enumerate(values) if v]
            if len(present) == n:
                ts, cols = codec.decode(values, wanted)
            elif present:
                ts, cols = codec.decode([values[i] for i in present], wanted)
            else:
                ts, cols = np.empty(0, np.int64), {f: [] for f in wanted}
            ttl = schema.ttl_seconds
            fresh = None
            if ttl and len(ts):
                fresh = ts >= at_us - round(ttl * 1_000_000)
                if fresh.all():
                    fresh = None
            if len(present) == n and fresh is None:
                for f in wanted:
                    features_out[f"{view}__{f}" if full_names else f] = cols[f]
            else:
                keep = present if fresh is None else [i for i, ok in zip(present, fresh.tolist()) if ok]
                keep_pos = (
                    range(len(present)) if fresh is None else [j for j, ok in enumerate(fresh.tolist()) if ok]
                )
                for f in wanted:
                    col = [None] * n
                    src = cols[f]
                    for i, j in zip(keep, keep_pos):
                        col[i] = src[j]
                    features_out[f"{view}__{f}" if full_names else f] = col
            if with_ts:
                col = [None] * n
                for i, us in zip(present, ts.tolist()):
                    col[i] = EPOCH + timedelta(microseconds=us)  # timestamps.from_us inlined: per value
                extras[f"{view}__{EVENT_TIMESTAMP}"] = col
            if with_status:
                col = [NOT_FOUND] * n
                fresh_list = fresh.tolist() if fresh is not None else None
                for j, i in enumerate(present):
                    col[i] = PRESENT if fresh_list is None or fresh_list[j] else OUTSIDE_MAX_AGE
                extras[f"{view}__status"] = col
        if not full_names and len(features_out) < sum(len(w) for w in plan.wanted):
            names = [f for w in plan.wanted for f in w]
            dupes = sorted({f for f in names if names.count(f) > 1})
            if dupes:
                raise ValueError(
                    f"features {dupes} are requested from more than one feature view; "
                    f"pass full_feature_names=True to get '<view>__<feature>' columns"
                )
        clash = [k for k in features_out if k in out]
        if clash:
            raise ValueError(
                f"features {clash} have the same name as a join key; pass full_feature_names=True"
            )
        out.update(features_out)
        out.update(extras)
        return out
