"""The event buffer format: how an entity's rows are stored in Redis and in the worker.

A buffer is one Redis string per entity of a `BufferGroup`, named
`<project>:stream:state:<group>:<layout id>:<base key values joined with ':'>` (`key_part`): an
8-byte header, the buffer's *epoch* (int64, changed whenever the buffer is rewritten), followed by
fixed-width records in arrival order (`record_dtype`): int64 time in µs, the group's value columns
as float64 with NaN for NULL, the extra integer keys (`NULL_KEY` for NULL), an 8-byte hash of the
event id. A record is a pure function of its event, so a replayed event appends the very same
bytes (the evaluation counts records with the same entity, time and event id once).

`BufferCache` is the worker's copy of the buffers it has read; it applies the fold script's
replies (their format is described in `fold.lua`), so only the bytes appended since are read.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ml_platform.featurestore.streaming.events import EventColumns
    from ml_platform.featurestore.streaming.plan import BufferGroup

NULL_KEY = np.iinfo(np.int64).min  # an extra key that is NULL: the record is no row of that view
EXPIRY_REFRESH_S = 3600.0  # a worker refreshes a buffer's expiry at most this often (seconds)
_TRIM = struct.Struct("<qq")  # a trimmed reply's new epoch and bytes dropped from the front
_EPOCH = struct.Struct("<q")  # a buffer's header


def record_dtype(n_values: int, n_extra_keys: int) -> np.dtype:
    """The record layout of a group with `n_values` value columns and `n_extra_keys` extra keys:
    `ts` (int64 µs), `v` (float64 per value column), `x` (int64 per extra key), `id` (8 bytes)."""
    fields: list[tuple] = [("ts", "<i8")]
    if n_values:
        fields.append(("v", "<f8", (n_values,)))
    if n_extra_keys:
        fields.append(("x", "<i8", (n_extra_keys,)))
    fields.append(("id", "V8"))
    return np.dtype(fields)


def key_part(value: Any) -> str:
    """A join key value as it appears in a buffer key (strings escaped so ':' stays a separator;
    7 and "7" give the same part)."""
    if isinstance(value, str):
        return value.replace("%", "%25").replace(":", "%3A")
    return str(int(value))


def event_id_hash(event_id: str) -> bytes:
    """8 bytes identifying an event inside a buffer record."""
    return hashlib.blake2b(str(event_id).encode(), digest_size=8).digest()


def pack_records(group: BufferGroup, batch: EventColumns, rows: np.ndarray) -> np.ndarray:
    """The buffer records of the batch's `rows`: time, value columns (NaN = NULL), extra keys
    (NULL = NULL_KEY), event-id hash."""
    rec = np.zeros(len(rows), group.record_dtype)
    rec["ts"] = batch.ints(group.timestamp_field)[0][rows]
    for j, c in enumerate(group.value_columns):
        rec["v"][:, j] = batch.floats(c)[rows]
    for j, k in enumerate(group.extra_keys):
        values, present = batch.ints(k)
        rec["x"][:, j] = np.where(present, values, NULL_KEY)[rows]
    rec["id"] = batch.id_hashes()[rows]
    return rec


def unpack_records(group: BufferGroup, blobs: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Buffers' records (without header), concatenated: (the records, each buffer's count)."""
    width = group.record_dtype.itemsize
    if any(len(b) % width for b in blobs):
        raise RuntimeError(
            f"stream state of buffer group {group.name!r} has records of an unexpected size; "
            f"delete its buffers ({group.name}:{group.layout_id}) and seed them again"
        )
    counts = np.fromiter((len(b) // width for b in blobs), np.int64, len(blobs))
    return np.frombuffer(b"".join(blobs), group.record_dtype), counts


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
        """Apply a fold reply for `key` (see fold.lua), `sent` being the records this call
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
