"""Windowed aggregates kept up to date event by event, compiled from the same `Aggregation`
declarations the offline SQL comes from (`ml_platform.featurestore.aggregation`).

Semantics are the offline ones, function by function: the value of an aggregation at time t for
an entity is `function(column)` over that entity's source rows with time in [t - window, t], both
ends included (so rows with the same time are peers and see each other); rows with a NULL
timestamp, join key or (for column aggregations) value are skipped exactly as in SQL.

State: per entity one Redis string, the entity's *event buffer*: fixed-width records appended in
arrival order (int64 time in µs, the value columns as float64 with NaN for NULL, extra integer
keys, an 8-byte hash of the event id). Views reading the same source whose join keys extend
another's share its buffers (a `BufferGroup`: user x merchant counts come from the card holder's
buffer). APPEND is atomic, so several workers share a buffer, and because the state lives in
Redis a restarted worker loses nothing. A record is a pure function of its event and records with
the same entity, time and event id count once, so folding an event twice (a replay) never double
counts. Records older than the entity's newest time minus the group's longest window minus
`trim_slack` are garbage: a buffer is rewritten without its leading garbage once its first record
is a further `trim_slack` older (garbage costs memory only, never correctness).

From the buffer the updater answers three questions per folded event, each exactly:
  * `before`: the features as the offline point-in-time join would look them up for this event
    (at `features.feature_lookup_time(t)` = t - 1 µs: the aggregates at the entity's latest row
    strictly before t, null when there is none within the view's TTL). Exact for in-order,
    late (up to `trim_slack`) and replayed events alike, and for several events of one entity in
    one batch.
  * `at_event` (optional): the aggregates at the event's own time, i.e. the offline table's row.
  * `latest`: per entity, the aggregates at its newest row, with that row's time as the event
    timestamp: what the online store holds (written with `RedisOnlineStore.update_entities`).

One Lua script call per batch appends each entity's new records, returns only what this worker
lacks (the bytes other workers appended since it last read the buffer, `BufferCache`; the whole
buffer on a first read), trims it when due (telling the worker how much it dropped) and refreshes
its expiry; the aggregates are then computed with numpy over all entities of the batch at once
(each window query is two searchsorted calls over (entity, time) keys and a reduceat, queries in
(entity, time) order). `submit` sends the script without waiting, so a worker can evaluate the
previous batch while Redis runs it.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import struct
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import redis

from ml_platform.featurestore.definitions import AGGREGATION_FUNCTIONS, FeatureView, ValueType
from ml_platform.featurestore.online import unlink_matching

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EVENT_ID = "event_id"
EVENT_TIMESTAMP = "event_timestamp"  # the online store's time column
LOOKUP_OFFSET_US = 1  # features.FEATURE_LOOKUP_OFFSET: looked-up features are read as of t - 1 µs
DEFAULT_TRIM_SLACK = timedelta(days=1)

# A buffer is a Redis string: an 8-byte header (the buffer's *epoch*, changed whenever the buffer
# is rewritten) followed by the records. Appends keep every earlier byte in place, so a worker
# that cached the first `known` bytes at epoch E only needs the bytes after `known` while the
# epoch is still E; any rewrite (trim) or re-creation gives a new epoch and a full read.
#
# ARGV[1]: expiry in ms (0 = none); ARGV[2]: "1" to return the buffers; ARGV[3]: a nonce for new
# epochs (< 2^36); ARGV[4]: per buffer one fixed-width head (`_HEAD_DTYPE`, 37 bytes): key length
# (u16), record width (u16), trim trigger and trim bound (int64 µs), the caller's cached epoch
# (int64, 0 = none) and cached length (u32), whether to refresh the expiry (u8), the new records'
# length (u32); ARGV[5]: the keys, concatenated; ARGV[6]: the new records, concatenated. (Three
# blobs instead of thousands of arguments: packing arguments cost the client more than the script
# costs Redis; fixed-width heads are built with numpy for the whole batch at once.)
#
# Per buffer: APPEND the records (a new buffer gets its header first). The reply says what the
# caller lacks, never what it sent:
#   "d" + the bytes other workers appended between the caller's cached length and this append
#         (usually none), when the caller's epoch is current;
#   "f" + the whole buffer (header included) otherwise -- as it was *before* any trim, so late
#         events can still look back.
# If the first record is older than the trigger, the buffer is rewritten without its leading
# records older than the bound, under a new epoch; the reply's kind is then upper case ("D",
# "F") and followed by the new epoch and the number of record bytes dropped from the front (two
# int64, before the data; new epoch 0 = every record was garbage and the buffer is deleted), so
# the caller trims its copy the same way instead of reading the buffer again.
# PEXPIRE when asked (a worker refreshes a buffer's expiry at most every EXPIRY_REFRESH_S, not on
# every append: the expiry is a month, and one call less per buffer is ~20% of the script).
# Per buffer that is APPEND + one GETRANGE (the header and first record time) in the common case.
_FOLD_LUA = """
local ttl = tonumber(ARGV[1])
local want = ARGV[2] == '1'
local nonce = tonumber(ARGV[3]) * 65536
local heads, names, recs = ARGV[4], ARGV[5], ARGV[6]
local out = {}
local kpos, rpos = 1, 1
for k = 1, #heads / 37 do
  local klen, width, trigger, bound, epoch, known, refresh, nbytes =
    struct.unpack('<HHi8i8i8I4BI4', heads, (k - 1) * 37 + 1)
  local key = string.sub(names, kpos, kpos + klen - 1)
  kpos = kpos + klen
  local records = string.sub(recs, rpos, rpos + nbytes - 1)
  rpos = rpos + nbytes
  local length = redis.call('APPEND', key, records)
  if length == nbytes then
    length = length + 8
    redis.call('SET', key, struct.pack('<i8', nonce + k) .. records)
    refresh = 1
  end
  local head, first = struct.unpack('<i8i8', redis.call('GETRANGE', key, 0, 15))
  local kind, data = '', ''
  if not want then
    kind = ''
  elseif head == epoch and known >= 8 and known <= length - nbytes then
    kind = 'd'
    if known < length - nbytes then data = redis.call('GETRANGE', key, known, length - nbytes - 1) end
  else
    kind = 'f'
    data = redis.call('GET', key)
  end
  if first < trigger then
    -- drop the leading records older than the bound (records arrive nearly in time order; a late
    -- old record further in stays as harmless garbage until it leads)
    local whole = redis.call('GET', key)
    local off = 9
    while off <= #whole and struct.unpack('<i8', whole, off) < bound do off = off + width end
    local new_epoch = 0
    if off <= #whole then
      new_epoch = -(nonce + k)
      redis.call('SET', key, struct.pack('<i8', new_epoch) .. string.sub(whole, off))
      refresh = 1
    else
      redis.call('DEL', key)
      refresh = 0
    end
    if want then kind = string.upper(kind) .. struct.pack('<i8i8', new_epoch, off - 9) end
  end
  out[k] = kind .. data
  if ttl > 0 and refresh == 1 then redis.call('PEXPIRE', key, ttl) end
end
return out
"""
_HEAD_DTYPE = np.dtype(
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
assert _HEAD_DTYPE.itemsize == 37  # the script's stride
_TRIM = struct.Struct("<qq")
EXPIRY_REFRESH_S = 3600.0
_EPOCH = struct.Struct("<q")


class BufferCache:
    """A worker's copy of the buffers it has read: key -> (epoch, cached length, records), least
    recently used evicted beyond `max_bytes`. Only the bytes appended since are then read."""

    def __init__(self, max_bytes: int = 256 * 2**20):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        # replies carrying a whole buffer (first read, evicted, or rewritten by another worker) /
        # only what other workers appended (usually nothing)
        self.full_reads = 0
        self.delta_reads = 0
        # key -> (epoch, cached length, records, when this worker last refreshed its expiry)
        self._entries: OrderedDict[bytes, tuple[int, int, bytes, float]] = OrderedDict()

    def known(self, key: bytes, now: float) -> tuple[int, int, int]:
        """(cached epoch, cached length, 1 if the buffer's expiry is due for a refresh)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0, 0, 1
        return entry[0], entry[1], int(now - entry[3] >= EXPIRY_REFRESH_S)

    def update(self, key: bytes, reply: bytes, sent: bytes, refreshed: int, now: float) -> bytes:
        """Apply a fold reply for `key` (see _FOLD_LUA), `sent` being the records this call
        appended; returns the buffer's records as they were before any trim of this call."""
        old = self._entries.pop(key, None)
        kind = reply[:1]
        trimmed = kind in (b"D", b"F")
        start = 17 if trimmed else 1
        if kind in (b"d", b"D") and old is not None:
            self.delta_reads += 1
            epoch, records = old[0], old[2] + reply[start:] + sent
        else:
            self.full_reads += 1
            epoch, records = _EPOCH.unpack_from(reply, start)[0], reply[start + 8 :]
        if old is not None:
            self.bytes -= len(old[2])
        kept = records
        if trimmed:
            epoch, dropped = _TRIM.unpack_from(reply, 1)
            kept = records[dropped:] if epoch else b""
        if self.max_bytes > 0 and kept:
            self._entries[key] = (epoch, 8 + len(kept), kept, now if refreshed or old is None else old[3])
            self.bytes += len(kept)
            while self.bytes > self.max_bytes and self._entries:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= len(evicted[2])
        return records

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def to_us(value: Any) -> int | None:
    """A timestamp (datetime, pandas Timestamp, ISO-8601 string, or int µs) as int µs since the
    epoch, UTC; naive values are taken as UTC. None/NaT -> None."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is None:
            value = value.tz_localize("UTC")
        return value.value // 1000
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        delta = value - EPOCH
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise TypeError(f"not a timestamp: {value!r}")


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(us))


def _us(span: timedelta) -> int:
    return (span.days * 86400 + span.seconds) * 1_000_000 + span.microseconds


# --------------------------------------------------------------------------- compiling


@dataclass(frozen=True)
class CompiledAggregation:
    """One declaration ready for the vectorized evaluation: output name, function, the index of
    its value column in the buffer (None for count(*)) and of its window in the view's windows."""

    name: str
    function: str
    column: int | None
    window: int


@dataclass(frozen=True)
class CompiledView:
    """A feature view's aggregations compiled against the buffer group that holds its rows."""

    view: FeatureView
    group: str  # the BufferGroup whose buffers hold this view's rows
    join_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]  # join keys beyond the group's (stored in each record)
    timestamp_field: str
    windows_us: tuple[int, ...]  # distinct windows, ascending
    aggregations: tuple[CompiledAggregation, ...]
    ttl_us: int | None

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def max_window_us(self) -> int:
        return self.windows_us[-1]

    @property
    def feature_names(self) -> list[str]:
        return [a.name for a in self.aggregations]


@dataclass(frozen=True)
class BufferGroup:
    """Views whose rows come from one source with one time field and whose join keys extend the
    group's base keys: one buffer per base entity holds the rows of all of them (e.g. the card
    holder's buffer also answers user x merchant counts), so an event touches one key, not one
    per view. Records: time, the group's value columns, the extra (integer) keys, event-id hash."""

    name: str
    base_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]
    timestamp_field: str
    value_columns: tuple[str, ...]
    keep_window_us: int  # the longest window of its views: what a buffer must hold
    views: tuple[str, ...]
    record_dtype: np.dtype = field(compare=False)

    @property
    def layout_id(self) -> str:
        """Identifies the record layout: a changed layout starts new buffers instead of misreading old ones."""
        body = "|".join(
            [
                ",".join(self.base_keys),
                ",".join(self.extra_keys),
                self.timestamp_field,
                ",".join(self.value_columns),
            ]
        )
        return hashlib.sha1(body.encode()).hexdigest()[:8]


def _is_int_key(view: FeatureView, key: str) -> bool:
    kind = next(e.value_type for e in view.entities if key in e.join_keys)
    return kind in (ValueType.Int64, ValueType.Int32)


def compile_views(views: Iterable[FeatureView]) -> tuple[dict[str, CompiledView], dict[str, BufferGroup]]:
    """Compile the aggregated views and assign each to a buffer group: a view joins an existing
    group when it reads the same source with the same time field, its join keys include the
    group's base keys (the others being integers) and its longest window fits the group's."""
    aggregated = [v for v in views if v.aggregations]
    specs: list[dict[str, Any]] = []
    assignment: dict[str, dict[str, Any]] = {}
    for view in sorted(aggregated, key=lambda v: len(v.join_keys)):
        longest = max(_us(a.window) for a in view.aggregations)
        source = (view.source.path, view.source.timestamp_field)
        chosen = None
        for spec in specs:
            extra = [k for k in view.join_keys if k not in spec["base"]]
            if (
                spec["source"] == source
                and set(spec["base"]) <= set(view.join_keys)
                and longest <= spec["keep"]
                and all(_is_int_key(view, k) for k in extra)
            ):
                chosen = spec
                break
        if chosen is None:
            chosen = {
                "name": view.name,
                "base": tuple(view.join_keys),
                "source": source,
                "keep": longest,
                "views": [],
                "extra": [],
            }
            specs.append(chosen)
        chosen["views"].append(view)
        chosen["extra"] += [k for k in view.join_keys if k not in chosen["base"] and k not in chosen["extra"]]
        assignment[view.name] = chosen
    groups: dict[str, BufferGroup] = {}
    for spec in specs:
        columns = tuple(dict.fromkeys(a.column for v in spec["views"] for a in v.aggregations if a.column))
        fields: list[tuple] = [("ts", "<i8")]
        if columns:
            fields.append(("v", "<f8", (len(columns),)))
        if spec["extra"]:
            fields.append(("x", "<i8", (len(spec["extra"]),)))
        fields.append(("id", "V8"))
        groups[spec["name"]] = BufferGroup(
            name=spec["name"],
            base_keys=spec["base"],
            extra_keys=tuple(spec["extra"]),
            timestamp_field=spec["source"][1],
            value_columns=columns,
            keep_window_us=spec["keep"],
            views=tuple(v.name for v in spec["views"]),
            record_dtype=np.dtype(fields),
        )
    compiled: dict[str, CompiledView] = {}
    for view in aggregated:
        group = groups[assignment[view.name]["name"]]
        windows = tuple(sorted({_us(a.window) for a in view.aggregations}))
        aggs = tuple(
            CompiledAggregation(
                name=a.feature_name,
                function=a.function,
                column=None if a.column is None else group.value_columns.index(a.column),
                window=windows.index(_us(a.window)),
            )
            for a in view.aggregations
            if a.function in AGGREGATION_FUNCTIONS
        )
        compiled[view.name] = CompiledView(
            view=view,
            group=group.name,
            join_keys=tuple(view.join_keys),
            extra_keys=tuple(k for k in view.join_keys if k not in group.base_keys),
            timestamp_field=view.source.timestamp_field,
            windows_us=windows,
            aggregations=aggs,
            ttl_us=_us(view.ttl) if view.ttl else None,
        )
    return compiled, groups


# --------------------------------------------------------------------------- the updater


@dataclass
class FoldResult:
    """What folding a batch of events produced, per view.

    before[view][feature]: float64 array aligned with the events (NaN = null, including events
        the view does not apply to): the point-in-time features for scoring each event.
    found[view]: bool array, True where the event had a row of the view within its TTL before it.
    applies[view]: bool array, True where the event was folded into the view.
    at_event[view][feature]: like `before`, the aggregates at the event's own time (only when
        asked for).
    latest[view]: a table for `RedisOnlineStore.update_entities`: join keys, `event_timestamp`
        (the entity's newest row time) and every feature (NULL = null), one row per touched entity.
    """

    before: dict[str, dict[str, np.ndarray]]
    found: dict[str, np.ndarray]
    applies: dict[str, np.ndarray]
    at_event: dict[str, dict[str, np.ndarray]]
    latest: dict[str, pa.Table]


_NULL_KEY = np.iinfo(np.int64).min  # an extra key that is NULL: the record is no row of that view


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
        self.trim_slack_us = _us(trim_slack)
        self.state_expiry = state_expiry
        self.cache = BufferCache(cache_bytes)
        self._script = client.register_script(_FOLD_LUA)
        # Wall seconds per part of `fold` (pack, script: waiting for its reply, cache, evaluate).
        self.phase_seconds: dict[str, float] = {"pack": 0.0, "script": 0.0, "cache": 0.0, "evaluate": 0.0}
        self._sender: ThreadPoolExecutor | None = None  # sends fold scripts (see submit)
        self._generation = 0  # of the last submitted fold

    # ---- keys

    @property
    def state_prefix(self) -> str:
        return f"{self.project}:stream:state:"

    def _key_prefix(self, group: BufferGroup) -> str:
        return f"{self.state_prefix}{group.name}:{group.layout_id}:"

    def buffer_key(self, view: str, entity: Mapping[str, Any]) -> str:
        """The Redis key of the buffer holding `entity`'s rows of `view` (base join key values
        joined with ':')."""
        group = self.groups[self.compiled[view].group]
        return self._key_prefix(group) + ":".join(_key_part(entity[k]) for k in group.base_keys)

    def _expiry_ms(self, group: BufferGroup) -> int:
        if self.state_expiry is None:
            return 0
        return (group.keep_window_us + self.trim_slack_us + _us(self.state_expiry)) // 1000

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
        batch = _Batch(events)
        now = time.monotonic()
        heads: list[bytes] = []
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
            records = _records(group, batch, rows)[order].tobytes()
            prefix = self._key_prefix(group)
            if len(group.base_keys) == 1:
                keys = [(prefix + _key_part(k[0])).encode() for k in entity_keys]
            else:
                keys = [(prefix + ":".join([_key_part(v) for v in k])).encode() for k in entity_keys]
            head = np.zeros(len(keys), _HEAD_DTYPE)
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
            heads.append(head.tobytes())
            key_blobs.append(b"".join(keys))
            record_blobs.append(records)
            names += keys
            expiry = max(expiry, self._expiry_ms(group))
            plans.append((group, rows, slot, entity_keys, len(names)))
        self._generation += 1
        pending = PendingFold(
            self, self._generation, batch, wanted, plans, names, sent, refreshes, now, compute
        )
        if names:
            nonce = secrets.randbelow(2**36 - 1) + 1
            args = [
                expiry,
                b"1" if compute else b"0",
                nonce,
                b"".join(heads),
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
            _evaluate_group(
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


# --------------------------------------------------------------------------- records


def _key_part(value: Any) -> str:
    if isinstance(value, str):
        return value.replace("%", "%25").replace(":", "%3A")
    return str(int(value))


def event_id_hash(event_id: str) -> bytes:
    """8 bytes identifying an event inside a buffer record."""
    return hashlib.blake2b(str(event_id).encode(), digest_size=8).digest()


class _Batch:
    """The events of one fold as columns, each extracted once: numpy arrays and presence masks."""

    def __init__(self, events: Sequence[Mapping[str, Any]]):
        self.events = events
        self.n = len(events)
        self._raw: dict[str, list] = {}
        self._present: dict[str, np.ndarray] = {}
        self._ints: dict[str, np.ndarray] = {}
        self._floats: dict[str, np.ndarray] = {}
        self._ids: np.ndarray | None = None

    def raw(self, name: str) -> list:
        values = self._raw.get(name)
        if values is None:
            values = self._raw[name] = [e.get(name) for e in self.events]
        return values

    def present(self, name: str) -> np.ndarray:
        """True where the event has a value (not None / NA)."""
        mask = self._present.get(name)
        if mask is None:
            mask = self._present[name] = np.fromiter(
                (v is not None and v is not pd.NA for v in self.raw(name)), bool, self.n
            )
        return mask

    def ints(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(int64 values with 0 where absent, presence mask): timestamps and integer keys."""
        values = self._ints.get(name)
        present = self.present(name)
        if values is None:
            raw = self.raw(name)
            values = self._ints[name] = np.fromiter(
                (v if ok else 0 for v, ok in zip(raw, present.tolist())), np.int64, self.n
            )
        return values, present

    def floats(self, name: str) -> np.ndarray:
        """float64 values, NaN for NULL (None / NA / NaN)."""
        values = self._floats.get(name)
        if values is None:
            raw = self.raw(name)
            try:
                values = np.array(raw, np.float64)
            except (TypeError, ValueError):
                values = np.fromiter((_float_or_nan(v) for v in raw), np.float64, self.n)
            self._floats[name] = values
        return values

    def id_hashes(self) -> np.ndarray:
        if self._ids is None:
            self._ids = np.frombuffer(b"".join([event_id_hash(e[EVENT_ID]) for e in self.events]), "V8")
        return self._ids

    def entities(self, keys: Sequence[str], rows: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
        """(slot of each row's entity, the entities' key values): one slot per distinct key."""
        if len(keys) == 1:
            raw = self.raw(keys[0])
            picked = [raw[i] for i in rows.tolist()]
            if all(type(v) is int for v in picked):
                unique, slot = np.unique(np.array(picked, np.int64), return_inverse=True)
                return slot.reshape(-1).astype(np.int64), [(u,) for u in unique.tolist()]
        # Other key types: grouped by the buffer key they map to (so 7, True/1 or "a" and the
        # same value in another type never become two entries for one buffer).
        columns = [self.raw(k) for k in keys]
        index: dict[str, int] = {}
        entities: list[tuple] = []
        slot = np.empty(len(rows), np.int64)
        for j, i in enumerate(rows.tolist()):
            values = tuple([c[i] for c in columns])
            name = ":".join([_key_part(v) for v in values])
            s = index.get(name)
            if s is None:
                s = index[name] = len(entities)
                entities.append(values)
            slot[j] = s
        return slot, entities


def _records(group: BufferGroup, batch: _Batch, rows: np.ndarray) -> np.ndarray:
    """The buffer records of the batch's `rows`: time, value columns (NaN = NULL), extra keys
    (NULL = _NULL_KEY), event-id hash."""
    rec = np.zeros(len(rows), group.record_dtype)
    rec["ts"] = batch.ints(group.timestamp_field)[0][rows]
    for j, c in enumerate(group.value_columns):
        rec["v"][:, j] = batch.floats(c)[rows]
    for j, k in enumerate(group.extra_keys):
        values, present = batch.ints(k)
        rec["x"][:, j] = np.where(present, values, _NULL_KEY)[rows]
    rec["id"] = batch.id_hashes()[rows]
    return rec


def _float_or_nan(value: Any) -> float:
    if value is None or value is pd.NA:
        return math.nan
    return float(value)


# --------------------------------------------------------------------------- evaluation


def _evaluate_group(
    group: BufferGroup,
    views: list[CompiledView],
    batch: _Batch,
    rows: np.ndarray,
    ev_slot: np.ndarray | None,
    entity_keys: list[tuple],
    blobs: list[bytes],
    with_event_values: bool,
    out: FoldResult,
) -> None:
    """Decode a group's buffers (all its entities of the batch at once: concatenated, sorted by
    (entity, time), deduplicated by (entity, time, event id)), then compute each view's values.
    `rows`: the events that are rows of the group; `ev_slot`: each one's entity (an index into
    `entity_keys` and `blobs`)."""
    n = batch.n
    for cv in views:
        out.applies[cv.name] = np.zeros(n, bool)
        out.found[cv.name] = np.zeros(n, bool)
        out.before[cv.name] = {name: np.full(n, np.nan) for name in cv.feature_names}
        if with_event_values:
            out.at_event[cv.name] = {name: np.full(n, np.nan) for name in cv.feature_names}
    if not len(rows):
        for cv in views:
            out.latest[cv.name] = _latest_table(cv, {}, np.empty(0, np.int64), {})
        return
    width = group.record_dtype.itemsize
    if any(len(b) % width for b in blobs):
        raise RuntimeError(
            f"stream state of buffer group {group.name!r} has records of an unexpected size; "
            f"delete its buffers ({group.name}:{group.layout_id}) and seed them again"
        )
    counts = np.fromiter((len(b) // width for b in blobs), np.int64, len(blobs))
    raw = np.frombuffer(b"".join(blobs), group.record_dtype)
    n_slots = len(blobs)
    slot = np.repeat(np.arange(n_slots, dtype=np.int64), counts)
    ev_index = rows
    ev_ts = batch.ints(group.timestamp_field)[0][rows]
    raw_ts = raw["ts"].astype(np.int64)
    keys = _SearchKeys(
        n_slots,
        min(int(raw_ts.min()), int(ev_ts.min())) - group.keep_window_us - 1,
        max(int(raw_ts.max()), int(ev_ts.max())),
        group.name,
    )

    # Sort by (entity, time) -- usually already so: appends follow event time -- and count a
    # record seen twice (same entity, time and event id: a replay) once.
    raw_key = keys.of(slot, raw_ts)
    order = None
    steps = np.diff(raw_key)
    if len(steps) and steps.min() <= 0:
        if steps.min() < 0:
            order = np.argsort(raw_key, kind="stable")
        sorted_key = raw_key if order is None else raw_key[order]
        tie = sorted_key[1:] == sorted_key[:-1]
        if tie.any():
            # Only the runs of equal (entity, time) need the event ids: order each run by id
            # (the runs stay in place) and drop a record equal to its predecessor.
            if order is None:
                order = np.arange(len(raw_key))
            in_run = np.zeros(len(order), bool)
            in_run[1:] |= tie
            in_run[:-1] |= tie
            run = np.flatnonzero(in_run)
            ids = raw["id"].view("<u8")[order[run]]
            run_key = sorted_key[run]
            by_id = np.lexsort((ids, run_key))
            order[run] = order[run][by_id]
            ids = ids[by_id]
            dup = (run_key[1:] == run_key[:-1]) & (ids[1:] == ids[:-1])
            if dup.any():
                keep_record = np.ones(len(order), bool)
                keep_record[run[1:][dup]] = False
                order = order[keep_record]
    take = (lambda a: a[order]) if order is not None else (lambda a: a)
    buf_key, ts, slot = take(raw_key), take(raw_ts), take(slot)
    values = take(raw["v"].reshape(len(raw), len(group.value_columns))) if group.value_columns else None
    extras = take(raw["x"].reshape(len(raw), len(group.extra_keys))) if group.extra_keys else None

    for cv in views:
        applies = np.ones(len(rows), bool)
        for k in cv.extra_keys:
            applies &= batch.present(k)[rows]
        out.applies[cv.name][ev_index[applies]] = True
        if not cv.extra_keys:
            latest_slots = np.arange(n_slots, dtype=np.int64)
            latest_keys = {k: [e[j] for e in entity_keys] for j, k in enumerate(group.base_keys)}
            _view_values(
                cv,
                keys,
                buf_key,
                ts,
                _ValueColumns(values),
                ev_index,
                ev_slot,
                ev_ts,
                latest_slots,
                latest_keys,
                with_event_values,
                out,
            )
            continue
        if not applies.any():
            out.latest[cv.name] = _latest_table(cv, {}, np.empty(0, np.int64), {})
            continue
        # A finer view (e.g. user x merchant in the user's buffer): its entities are the distinct
        # (buffer, extra keys) pairs; records of other entities are filtered by the extra keys.
        positions = [group.extra_keys.index(k) for k in cv.extra_keys]
        rec_x = extras[:, positions]
        keep = (rec_x != _NULL_KEY).all(axis=1)
        sel_rows = rows[applies]
        ev_x = np.stack([batch.ints(k)[0][sel_rows] for k in cv.extra_keys], axis=1)
        # Entity ids by one lexsort over (buffer, extra keys, time) of the records and the events.
        n_rec = int(keep.sum())
        c_slot = np.concatenate([slot[keep], ev_slot[applies]])
        c_x = np.concatenate([rec_x[keep], ev_x])
        c_ts = np.concatenate([ts[keep], ev_ts[applies]])
        order = np.lexsort((c_ts, *[c_x[:, j] for j in range(c_x.shape[1] - 1, -1, -1)], c_slot))
        s_slot, s_x = c_slot[order], c_x[order]
        change = np.ones(len(order), bool)
        change[1:] = (s_slot[1:] != s_slot[:-1]) | (s_x[1:] != s_x[:-1]).any(axis=1)
        fine = np.empty(len(order), np.int64)
        fine[order] = np.cumsum(change) - 1
        fine_rec, fine_ev = fine[:n_rec], fine[n_rec:]
        rec_order = order[order < n_rec]  # the records in (entity, time) order
        fine_keys = _SearchKeys(int(change.sum()), keys.lowest, keys.highest, cv.name)
        rec_ts = ts[keep][rec_order]
        f_key = fine_keys.of(fine_rec[rec_order], rec_ts)
        f_values = values[keep][rec_order] if values is not None else None
        touched, first = np.unique(fine_ev, return_index=True)
        sel_index = ev_index[applies]
        first_slots = ev_slot[applies][first].tolist()
        latest_keys = {k: [entity_keys[s][j] for s in first_slots] for j, k in enumerate(group.base_keys)}
        for j, k in enumerate(cv.extra_keys):
            latest_keys[k] = ev_x[first, j].tolist()
        _view_values(
            cv,
            fine_keys,
            f_key,
            rec_ts,
            _ValueColumns(f_values),
            sel_index,
            fine_ev,
            ev_ts[applies],
            touched,
            latest_keys,
            with_event_values,
            out,
        )


class _SearchKeys:
    """(entity, time) packed into one sortable int64: entity in the high bits, time offset low."""

    def __init__(self, n_entities: int, lowest: int, highest: int, what: str):
        self.lowest, self.highest = lowest, highest
        self.shift = max(1, (highest - lowest + 1).bit_length())
        if self.shift + max(1, int(n_entities).bit_length()) > 62:
            raise ValueError(
                f"{what}: event times span too wide a range to evaluate in one batch "
                f"({from_us(lowest)} .. {from_us(highest)})"
            )

    def of(self, entity: np.ndarray, ts: np.ndarray) -> np.ndarray:
        return (entity << self.shift) | (ts - self.lowest)


def _view_values(
    cv: CompiledView,
    keys: _SearchKeys,
    buf_key: np.ndarray,
    ts: np.ndarray,
    columns: _ValueColumns,
    ev_index: np.ndarray,
    ev_ent: np.ndarray,
    ev_ts: np.ndarray,
    latest_ents: np.ndarray,
    latest_keys: dict[str, list],
    with_event_values: bool,
    out: FoldResult,
) -> None:
    """One view's before / at-event / latest values from its entities' sorted rows."""
    names = cv.feature_names
    seg_start = np.searchsorted(buf_key, ev_ent << keys.shift, side="left")
    # before: the entity's latest row strictly before t (i.e. at or before t - 1 µs), within TTL.
    prev = np.searchsorted(buf_key, keys.of(ev_ent, ev_ts), side="left") - 1
    has_prev = prev >= seg_start
    prev_ts = np.where(has_prev, ts[np.maximum(prev, 0)], 0)
    found = has_prev
    if cv.ttl_us:
        found = found & (prev_ts >= ev_ts - LOOKUP_OFFSET_US - cv.ttl_us)
    out.found[cv.name][ev_index] = found
    if found.any():
        sel = np.flatnonzero(found)
        vals = _aggregates_at(cv, buf_key, columns, keys, ev_ent[sel], prev_ts[sel])
        before = out.before[cv.name]
        for name in names:
            before[name][ev_index[sel]] = vals[name]
    if with_event_values:
        vals = _aggregates_at(cv, buf_key, columns, keys, ev_ent, ev_ts)
        at_event = out.at_event[cv.name]
        for name in names:
            at_event[name][ev_index] = vals[name]
    # latest: per touched entity, the aggregates at its newest row (the online store's value).
    seg_end = np.searchsorted(buf_key, (latest_ents + 1) << keys.shift, side="left")
    last_ts = ts[seg_end - 1]
    vals = _aggregates_at(cv, buf_key, columns, keys, latest_ents, last_ts)
    out.latest[cv.name] = _latest_table(cv, vals, last_ts, latest_keys)


def _latest_table(
    cv: CompiledView, vals: dict[str, np.ndarray], last_ts: np.ndarray, key_values: dict[str, list]
) -> pa.Table:
    """The online store's rows: join keys, event_timestamp, features (NULL where NaN)."""
    columns: dict[str, pa.Array] = {}
    for k in cv.join_keys:
        typ = pa.int64() if _is_int_key(cv.view, k) else pa.string()
        columns[k] = pa.array(key_values.get(k, []), typ)
    columns[EVENT_TIMESTAMP] = pa.array(last_ts.astype("datetime64[us]"), pa.timestamp("us", tz="UTC"))
    for a in cv.aggregations:
        v = vals.get(a.name, np.empty(0))
        mask = np.isnan(v)
        if a.function == "count":
            columns[a.name] = pa.array(
                np.where(mask, 0, v).astype(np.int64), pa.int64(), mask=mask if mask.any() else None
            )
        else:
            columns[a.name] = pa.array(v, pa.float64(), mask=mask if mask.any() else None)
    return pa.table(columns)


class _ValueColumns:
    """The buffer's value columns with what the window functions need, built once per batch and
    shared by every query: per column, whether it has NULLs, the prefix count of non-NULL values
    and the column padded with the neutral element of sum / max / min (so reduceat may index the
    end of the array)."""

    def __init__(self, values: np.ndarray | None):
        self.values = values
        self._cache: dict[tuple, Any] = {}

    def nulls(self, c: int) -> bool:
        k = ("nulls", c)
        if k not in self._cache:
            self._cache[k] = bool(np.isnan(self.values[:, c]).any())
        return self._cache[k]

    def present_prefix(self, c: int) -> np.ndarray:
        k = ("prefix", c)
        if k not in self._cache:
            notnull = ~np.isnan(self.values[:, c])
            self._cache[k] = np.concatenate([[0], np.cumsum(notnull, dtype=np.int64)])
        return self._cache[k]

    def padded(self, c: int, neutral: float) -> np.ndarray:
        k = ("padded", c, neutral)
        if k not in self._cache:
            col = self.values[:, c]
            out = np.empty(len(col) + 1)
            out[:-1] = np.where(np.isnan(col), neutral, col) if self.nulls(c) else col
            out[-1] = neutral
            self._cache[k] = out
        return self._cache[k]


_REDUCE = {
    "sum": (np.add, 0.0),
    "mean": (np.add, 0.0),
    "max": (np.maximum, -np.inf),
    "min": (np.minimum, np.inf),
}


def _aggregates_at(
    cv: CompiledView,
    buf_key: np.ndarray,
    columns: _ValueColumns,
    keys: _SearchKeys,
    q_ent: np.ndarray,
    q_ts: np.ndarray,
) -> dict[str, np.ndarray]:
    """Every aggregation of the view at instants `q_ts` of entities `q_ent`: over the rows with
    time in [q - window, q]. Returns float64 arrays (NaN = NULL), the SQL functions' semantics:
    count(*) counts rows, count(col) non-NULL values, sum/mean/min/max are NULL without values.
    Sums are sequential over each window (reduceat), not prefix differences, so they round like
    SQL's sum rather than accumulate cancellation error.

    The queries are evaluated in (entity, time) order: reduceat also reduces the gap between one
    window's end and the next one's start, so in arrival order (windows of entities all over the
    buffer) it would sum most of the batch's records once per query."""
    m = len(q_ts)
    q_key = keys.of(q_ent, q_ts)
    unsort = None
    if m > 1 and (np.diff(q_key) < 0).any():
        by_key = np.argsort(q_key, kind="stable")
        unsort = np.empty(m, np.int64)
        unsort[by_key] = np.arange(m)
        q_ent, q_ts, q_key = q_ent[by_key], q_ts[by_key], q_key[by_key]
    hi = np.searchsorted(buf_key, q_key, side="right")
    results: dict[str, np.ndarray] = {}
    for w_index, window in enumerate(cv.windows_us):
        aggs = [a for a in cv.aggregations if a.window == w_index]
        if not aggs:
            continue
        lo = np.searchsorted(buf_key, keys.of(q_ent, q_ts - window), side="left")
        rows_in = (hi - lo).astype(np.float64)
        pairs = np.empty(2 * m, np.int64)
        pairs[0::2], pairs[1::2] = lo, hi
        reduced: dict[tuple, np.ndarray] = {}
        for a in aggs:
            if a.column is None:
                results[a.name] = rows_in
                continue
            if columns.nulls(a.column):
                prefix = columns.present_prefix(a.column)
                present = (prefix[hi] - prefix[lo]).astype(np.float64)
            else:
                present = rows_in
            if a.function == "count":
                results[a.name] = present
                continue
            ufunc, neutral = _REDUCE[a.function]
            rk = (ufunc, a.column)
            if rk not in reduced:
                reduced[rk] = (
                    ufunc.reduceat(columns.padded(a.column, neutral), pairs)[0::2] if m else np.empty(0)
                )
            value = reduced[rk]
            empty = present == 0
            if a.function == "mean":
                value = value / np.where(empty, 1.0, present)
            results[a.name] = np.where(empty, np.nan, value)
    if unsort is not None:
        results = {name: values[unsort] for name, values in results.items()}
    return results


# --------------------------------------------------------------------------- frames


def events_from_frame(
    frame: pd.DataFrame,
    views: Iterable[FeatureView],
    *,
    id_column: str = "transaction_id",
) -> list[dict[str, Any]]:
    """Events for `StreamingUpdater.fold` from a DataFrame of raw source rows (e.g. the raw
    transactions): event id, join keys, each view's timestamp field as int µs (NaT -> None) and
    the value columns (NA -> None). Rows keep the frame's order."""
    views = list(views)
    columns: list[str] = []
    times: list[str] = []
    for v in views:
        columns += list(v.join_keys)
        if v.source.timestamp_field not in times:
            times.append(v.source.timestamp_field)
        columns += [a.column for a in v.aggregations if a.column]
    columns = [c for c in dict.fromkeys(columns) if c not in times]
    missing = [c for c in [id_column, *columns, *times] if c not in frame.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}; it has {list(frame.columns)}")
    data: dict[str, list] = {EVENT_ID: frame[id_column].astype(str).tolist()}
    for c in columns:
        s = frame[c]
        data[c] = [None if pd.isna(x) else x for x in s.astype(object).tolist()]
    for c in times:
        s = pd.to_datetime(frame[c], utc=True)
        nat = s.isna().to_numpy()
        us = s.dt.tz_localize(None).to_numpy(dtype="datetime64[us]").astype(np.int64)
        data[c] = [None if missing_ts else u for u, missing_ts in zip(us.tolist(), nat.tolist())]
    keys = list(data)
    return [dict(zip(keys, values)) for values in zip(*data.values())]
