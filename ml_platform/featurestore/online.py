"""Online store on Redis: the latest feature values per entity, read in one round trip.

Key layout (one prefix per project, `<project>:online:`; see docs/online_store.md):

    <project>:online:meta:<view>              hash: current version pointer, schema per version,
                                              last materialization (as_of, rows, seconds, mode)
    <project>:online:data:<view>:<version>    hash: entity field -> packed value (all the view's
                                              features + the event timestamp, one field per entity)
    <project>:online:overlay:<view>:<version> hash: stream updates that arrive while a full
                                              materialization of <version> is still bulk-loading

Entity field: the join key values packed in the view's join-key order: Int64/Int32 keys as 8-byte
big-endian signed integers, String keys as a 2-byte length + UTF-8 bytes.
Packed value: int64 event time (µs since epoch, UTC), a null bitmap (one bit per feature), one
fixed-width slot per non-string feature (float64/float32/int64/int32/uint8 little-endian), then
each string feature as a 4-byte length + UTF-8 bytes. A version's schema is recorded in the meta
hash, so a value is always decoded with the schema it was written with.

Reads: one MULTI/EXEC per request holds, per view, HGET of its version pointer and HMGET of all
requested entities from the version the client saw last; if a pointer moved, the read is redone
with the new version. So a read is one round trip (two right after a flip) and one consistent
snapshot. (A Lua script would do the same, but converting 100 values into and out of Lua strings
cost Redis ~2.7x more CPU here.) A full materialization writes a new version, then flips the
pointer atomically; every other write (incremental, stream updates) keeps, per entity, the value
with the newest event time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis

from ml_platform.featurestore.definitions import FeatureView, ValueType, parse_feature_ref

EVENT_TIMESTAMP = "event_timestamp"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Feast's FieldStatus names, reported per view and entity with include_status=True.
PRESENT = "PRESENT"
NOT_FOUND = "NOT_FOUND"
OUTSIDE_MAX_AGE = "OUTSIDE_MAX_AGE"

# Fixed-width slot per feature dtype (little-endian); String is variable-width, after the slots.
_SLOT = {
    ValueType.Float64: "<f8",
    ValueType.Float32: "<f4",
    ValueType.Int64: "<i8",
    ValueType.Int32: "<i4",
    ValueType.Bool: "u1",
    ValueType.UnixTimestamp: "<i8",
}
_ARROW_TYPE = {
    ValueType.Float64: pa.float64(),
    ValueType.Float32: pa.float32(),
    ValueType.Int64: pa.int64(),
    ValueType.Int32: pa.int32(),
    ValueType.Bool: pa.bool_(),
    ValueType.UnixTimestamp: pa.timestamp("us", tz="UTC"),
    ValueType.String: pa.string(),
}
_INT_KEYS = (ValueType.Int64, ValueType.Int32)
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")
_U32 = struct.Struct("<I")

# --------------------------------------------------------------------------- Lua scripts

# Shared Lua: newer-wins write of the field/value pairs ARGV[first..] into hash `key`; one HMGET and
# one HSET per call. A value wins if its event time (first 8 bytes, int64 µs) is >= the stored one;
# within the batch the newest value per entity wins (the later one on a tie).
_NEWER_WINS_LUA = """
local function newer_wins(key, first)
  local best, order = {}, {}
  for i = first, #ARGV, 2 do
    local f = ARGV[i]
    local ts = struct.unpack('<i8', ARGV[i + 1])
    local b = best[f]
    if not b then
      order[#order + 1] = f
      best[f] = {i + 1, ts}
    elseif ts >= b[2] then
      best[f] = {i + 1, ts}
    end
  end
  local written = 0
  local s = 1
  while s <= #order do
    local e = math.min(s + 3999, #order)
    local olds = redis.call('HMGET', key, unpack(order, s, e))
    local args = {}
    for j = s, e do
      local f = order[j]
      local old = olds[j - s + 1]
      if (not old) or struct.unpack('<i8', old) <= best[f][2] then
        args[#args + 1] = f
        args[#args + 1] = ARGV[best[f][1]]
      end
    end
    if #args > 0 then redis.call('HSET', key, unpack(args)) end
    written = written + #args / 2
    s = e + 1
  end
  return written
end
"""

# Newer-wins upsert into the current version (and the version being built, if any).
# KEYS[1]: meta hash. ARGV[1]: schema fingerprint of the encoded values; then field, value pairs.
_UPSERT_LUA = (
    _NEWER_WINS_LUA
    + """
local m = redis.call('HMGET', KEYS[1], 'current', 'current_fp', 'building_key', 'building_fp',
                     'building_phase', 'building_overlay')
if not m[1] then return redis.error_reply('NOT_MATERIALIZED') end
if m[2] ~= ARGV[1] then return redis.error_reply('SCHEMA_MISMATCH ' .. tostring(m[2])) end
local written = newer_wins(m[1], 2)
if m[3] and m[4] == ARGV[1] then
  if m[5] == 'bulk' then newer_wins(m[6], 2) else newer_wins(m[3], 2) end
end
return written
"""
)

# Newer-wins merge of field, value pairs (ARGV) into one hash (KEYS[1]).
_MERGE_LUA = (
    _NEWER_WINS_LUA
    + """
return newer_wins(KEYS[1], 1)
"""
)

# Start a full build. KEYS[1]: meta. ARGV: version, data key, overlay key, fingerprint, schema json.
# Returns the keys of an unfinished earlier build, which the caller deletes (it is superseded).
_BEGIN_LUA = """
local prev = redis.call('HMGET', KEYS[1], 'building_key', 'building_overlay', 'building')
redis.call('HSET', KEYS[1], 'building', ARGV[1], 'building_key', ARGV[2], 'building_overlay', ARGV[3],
           'building_fp', ARGV[4], 'building_phase', 'bulk', 'schema:' .. ARGV[1], ARGV[5])
if prev[3] then redis.call('HDEL', KEYS[1], 'schema:' .. prev[3]) end
return {prev[1] or '', prev[2] or ''}
"""

# Bulk load done: stream updates now go straight into the new version. KEYS[1]: meta; ARGV[1]: version.
_MERGE_PHASE_LUA = """
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'building_phase', 'merge')
return 1
"""

# The atomic flip. KEYS[1]: meta. ARGV: version, data key, fingerprint, then field, value pairs to
# record. Returns {old version, old data key} ('' when there was none).
_FLIP_LUA = """
local m = redis.call('HMGET', KEYS[1], 'building', 'version', 'current')
if m[1] ~= ARGV[1] then return redis.error_reply('SUPERSEDED') end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'current', ARGV[2], 'current_fp', ARGV[3],
           'rows', redis.call('HLEN', ARGV[2]))
if #ARGV > 3 then redis.call('HSET', KEYS[1], unpack(ARGV, 4)) end
redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
return {m[2] or '', m[3] or ''}
"""

# A failed build cleans up after itself. KEYS[1]: meta; ARGV: version, data key, overlay key.
_ABORT_LUA = """
if redis.call('HGET', KEYS[1], 'building') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'building', 'building_key', 'building_fp', 'building_phase', 'building_overlay')
end
if redis.call('HGET', KEYS[1], 'version') ~= ARGV[1] then
  redis.call('HDEL', KEYS[1], 'schema:' .. ARGV[1])
  redis.call('UNLINK', ARGV[2], ARGV[3])
end
return 1
"""


_READ_ATTEMPTS = 4


class OnlineStoreError(RuntimeError):
    """A problem with the online store's state in Redis (not materialized, schema changed, ...)."""


# --------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class ViewSchema:
    """What a materialized version holds: its features (with dtypes), join keys and TTL."""

    view: str
    features: tuple[tuple[str, ValueType], ...]
    join_keys: tuple[tuple[str, ValueType], ...]
    ttl_seconds: float | None

    @classmethod
    def of(cls, view: FeatureView) -> ViewSchema:
        keys = tuple((k, e.value_type) for e in view.entities for k in e.join_keys)
        ttl = view.ttl.total_seconds() if view.ttl else None
        return cls(view.name, tuple((f.name, f.dtype) for f in view.schema), keys, ttl or None)

    def to_json(self) -> str:
        return json.dumps(
            {
                "view": self.view,
                "features": [[n, t.name] for n, t in self.features],
                "join_keys": [[n, t.name] for n, t in self.join_keys],
                "ttl_seconds": self.ttl_seconds,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ViewSchema:
        d = json.loads(text)
        return cls(
            d["view"],
            tuple((n, ValueType[t]) for n, t in d["features"]),
            tuple((n, ValueType[t]) for n, t in d["join_keys"]),
            d["ttl_seconds"],
        )

    @property
    def fingerprint(self) -> str:
        """Identifies the value encoding (features and dtypes), not the TTL."""
        body = json.dumps([[n, t.name] for n, t in self.features])
        return hashlib.sha1(body.encode()).hexdigest()[:16]


class ValueCodec:
    """Packs a view's feature values + event time into one compact bytes value per entity."""

    def __init__(self, schema: ViewSchema):
        self.schema = schema
        self.names = [n for n, _ in schema.features]
        self.dtypes = dict(schema.features)
        self.position = {n: i for i, n in enumerate(self.names)}
        self.strings = [n for n, t in schema.features if t is ValueType.String]
        self.null_bytes = (len(self.names) + 7) // 8
        fields: list[tuple] = [("ts", "<i8")]
        if self.null_bytes:
            fields.append(("nulls", "u1", (self.null_bytes,)))
        # Slots grouped by width/kind (schema order within a group), so decoding reads each group
        # as one strided 2-D array: one tolist() per group instead of one per feature.
        self.groups: list[tuple[str, list[str]]] = []
        for slot in ("<f8", "<i8", "<f4", "<i4", "u1"):
            names = [n for n, t in schema.features if t is not ValueType.String and _SLOT[t] == slot]
            if names:
                self.groups.append((slot, names))
                fields += [(f"f{self.position[n]}", slot) for n in names]
        self.dtype = np.dtype(fields)  # packed: no alignment padding
        self.fixed_size = self.dtype.itemsize
        self.group_offsets = [self.dtype.fields[f"f{self.position[names[0]]}"][1] for _, names in self.groups]
        self.fingerprint = schema.fingerprint

    # ---- encode

    def encode(
        self, batch: pa.RecordBatch | pa.Table, timestamp_column: str = EVENT_TIMESTAMP
    ) -> np.ndarray | list[bytes]:
        """Values for every row of `batch`: a fixed-width void array when the view has no string
        feature (the fast path), else a list of bytes."""
        missing = [c for c in [timestamp_column, *self.names] if c not in batch.schema.names]
        if missing:
            raise ValueError(
                f"feature view {self.schema.view!r}: the data has no column {missing} "
                f"(it has {batch.schema.names}); it needs the join keys, {timestamp_column!r} and every feature"
            )
        n = batch.num_rows
        rec = np.zeros(n, self.dtype)
        rec["ts"] = _timestamps_us(batch.column(timestamp_column), timestamp_column)
        nulls = np.zeros((n, len(self.names)), dtype=bool) if self.names else None
        string_values: list[list[str | None]] = []
        for name in self.names:
            dtype = self.dtypes[name]
            col = _column_as(batch.column(name), _ARROW_TYPE[dtype], name)
            i = self.position[name]
            if col.null_count:
                nulls[:, i] = col.is_null().to_numpy(zero_copy_only=False)
            if dtype is ValueType.String:
                string_values.append(col.to_pylist())
                continue
            if dtype is ValueType.UnixTimestamp:
                col = col.cast(pa.int64())
            elif dtype is ValueType.Bool:
                col = col.cast(pa.uint8())
            if col.null_count:
                col = pc.fill_null(col, pa.scalar(0, col.type))
            rec[f"f{i}"] = col.to_numpy(zero_copy_only=False)
        return self._finish(rec, nulls, string_values)

    def encode_rows(
        self, rows: Sequence[Mapping[str, Any]], timestamp_column: str = EVENT_TIMESTAMP
    ) -> np.ndarray | list[bytes]:
        """`encode` for a few Python dict rows (the stream worker's path), without building Arrow
        arrays: datetimes for timestamps, None for nulls."""
        n = len(rows)
        rec = np.zeros(n, self.dtype)
        rec["ts"] = [
            _row_timestamp_us(row[timestamp_column], timestamp_column, j) for j, row in enumerate(rows)
        ]
        nulls = np.zeros((n, len(self.names)), dtype=bool) if self.names else None
        string_values: list[list[str | None]] = []
        for name in self.names:
            dtype = self.dtypes[name]
            i = self.position[name]
            values = [row[name] for row in rows]
            null_rows = [j for j, v in enumerate(values) if v is None]
            if null_rows:
                nulls[null_rows, i] = True
            if dtype is ValueType.String:
                bad = [(j, v) for j, v in enumerate(values) if v is not None and not isinstance(v, str)]
                if bad:
                    raise ValueError(f"row {bad[0][0]}: feature {name!r} must be a string, got {bad[0][1]!r}")
                string_values.append(values)
                continue
            if dtype is ValueType.UnixTimestamp:
                values = [0 if v is None else _row_timestamp_us(v, name, j) for j, v in enumerate(values)]
            elif dtype in _INT_KEYS:
                values = [0 if v is None else _row_int(v, name, j) for j, v in enumerate(values)]
            elif null_rows:
                values = [0 if v is None else v for v in values]
            try:
                rec[f"f{i}"] = np.array(values, dtype=_SLOT[dtype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise ValueError(
                    f"feature {name!r} must hold {dtype.name} values, got {values!r}: {exc}"
                ) from exc
        return self._finish(rec, nulls, string_values)

    def _finish(
        self, rec: np.ndarray, nulls, string_values: list[list[str | None]]
    ) -> np.ndarray | list[bytes]:
        n = len(rec)
        if self.null_bytes:
            rec["nulls"] = np.packbits(nulls, axis=1, bitorder="little")
        fixed = rec.view(f"V{self.fixed_size}")
        if not self.strings:
            return fixed
        out = []
        raw = rec.tobytes()
        size = self.fixed_size
        for row in range(n):
            parts = [raw[row * size : (row + 1) * size]]
            for values in string_values:
                s = values[row]
                b = b"" if s is None else s.encode()
                parts.append(_U32.pack(len(b)))
                parts.append(b)
            out.append(b"".join(parts))
        return out

    # ---- decode

    def decode(self, values: Sequence[bytes], wanted: Sequence[str]) -> tuple[np.ndarray, dict[str, list]]:
        """Event times (µs, int64 array) and Python lists for the `wanted` features of `values`
        (a null feature comes back as None)."""
        size, n = self.fixed_size, len(values)
        if n == 0:
            return np.empty(0, np.int64), {name: [] for name in wanted}
        buf = b"".join([v[:size] for v in values] if self.strings else values)
        ts = np.ndarray((n,), "<i8", buf, 0, (size,))
        cols: dict[str, list] = {}
        wanted_set = set(wanted)
        for (slot, names), offset in zip(self.groups, self.group_offsets):
            if wanted_set.isdisjoint(names):
                continue
            width = np.dtype(slot).itemsize
            block = np.ndarray((n, len(names)), slot, buf, offset, (size, width))
            for name, col in zip(names, block.T.tolist()):
                dtype = self.dtypes[name]
                if dtype is ValueType.UnixTimestamp:
                    col = [EPOCH + timedelta(microseconds=us) for us in col]
                elif dtype is ValueType.Bool:
                    col = [bool(b) for b in col]
                cols[name] = col
        if self.strings and not wanted_set.isdisjoint(self.strings):
            cols.update(self._decode_strings(values))
        if self.null_bytes:
            packed = np.ndarray((n, self.null_bytes), "u1", buf, 8, (size, 1))
            if packed.any():
                nulls = np.unpackbits(packed, axis=1, bitorder="little", count=len(self.names)).astype(bool)
                for name in wanted:
                    flags = nulls[:, self.position[name]]
                    if flags.any():
                        cols[name] = [None if null else v for v, null in zip(cols[name], flags.tolist())]
        return ts, {name: cols[name] for name in wanted}

    def _decode_strings(self, values: Sequence[bytes]) -> dict[str, list]:
        cols: dict[str, list] = {n: [] for n in self.strings}
        lists = [cols[n] for n in self.strings]
        size = self.fixed_size
        for v in values:
            off = size
            for target in lists:
                (length,) = _U32.unpack_from(v, off)
                off += 4
                target.append(v[off : off + length].decode())
                off += length
        return cols


def _timestamps_us(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """Event times as int64 µs since the epoch, UTC (a naive timestamp is taken as UTC)."""
    if not pa.types.is_timestamp(column.type):
        raise TypeError(f"column {name!r} must be a timestamp, got {column.type}")
    if column.null_count:
        raise ValueError(
            f"column {name!r} has {column.null_count} null event timestamps; every row needs one"
        )
    if column.type.unit != "us":
        column = pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False)
    return column.cast(pa.int64()).to_numpy(zero_copy_only=False)


def _row_timestamp_us(value: Any, name: str, row: int) -> int:
    """A datetime (naive = UTC), pandas Timestamp or ISO-8601 string as µs since the epoch."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"row {row}: {name!r} is not an ISO-8601 timestamp: {value!r}") from None
    if not isinstance(value, datetime):
        raise TypeError(f"row {row}: {name!r} must be a datetime, got {value!r}")
    return _now_us(value)


def _row_int(value: Any, name: str, row: int) -> int:
    try:
        return _as_int(value)
    except TypeError:
        raise ValueError(f"row {row}: feature {name!r} must be an integer, got {value!r}") from None


def _column_as(column: pa.Array | pa.ChunkedArray, target: pa.DataType, name: str) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.type == target:
        return column
    if pa.types.is_timestamp(target) and pa.types.is_timestamp(column.type):
        return pc.cast(column, pa.timestamp("us", tz=column.type.tz), safe=False).cast(target)
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise TypeError(
            f"feature column {name!r} of type {column.type} cannot be stored as {target}: {exc}"
        ) from exc


# --------------------------------------------------------------------------- entity keys


def _key_error(key: str, value: Any, row: int, expected: str) -> ValueError:
    return ValueError(f"entity row {row}: join key {key!r} must be {expected}, got {value!r}")


def entity_field(join_keys: Sequence[tuple[str, ValueType]], row: Mapping[str, Any], index: int = 0) -> bytes:
    """The hash field of one entity: its join key values packed in the view's join-key order."""
    parts = []
    for key, vtype in join_keys:
        try:
            value = row[key]
        except KeyError:
            raise ValueError(
                f"entity row {index} has no join key {key!r} (it has {sorted(row)}); "
                f"add {key!r} to every entity row"
            ) from None
        if vtype in _INT_KEYS:
            if isinstance(value, bool) or value is None:
                raise _key_error(key, value, index, "an integer")
            try:
                parts.append(_I64.pack(value if type(value) is int else _as_int(value)))
            except (TypeError, ValueError, struct.error):
                raise _key_error(key, value, index, "a 64-bit integer") from None
        else:
            if not isinstance(value, str):
                raise _key_error(key, value, index, "a string")
            b = value.encode()
            parts.append(_U16.pack(len(b)) + b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _as_int(value: Any) -> int:
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise TypeError(value)


def _entity_fields(
    join_keys: Sequence[tuple[str, ValueType]], batch: pa.RecordBatch | pa.Table
) -> np.ndarray | list[bytes]:
    """Entity fields for every row of `batch`: a fixed-width array when all keys are integers."""
    missing = [k for k, _ in join_keys if k not in batch.column_names]
    if missing:
        raise ValueError(f"table has no join key column {missing} (columns: {batch.column_names})")
    cols = []
    for key, vtype in join_keys:
        col = batch.column(key)
        if col.null_count:
            raise ValueError(
                f"join key column {key!r} has {col.null_count} null values; every row needs an entity key"
            )
        cols.append(_column_as(col, pa.int64() if vtype in _INT_KEYS else pa.string(), key))
    if all(t in _INT_KEYS for _, t in join_keys):
        packed = np.empty(batch.num_rows, np.dtype([(f"k{i}", ">i8") for i in range(len(cols))]))
        for i, col in enumerate(cols):
            packed[f"k{i}"] = col.to_numpy(zero_copy_only=False)
        return packed.view(f"V{8 * len(cols)}")
    rows = [dict(zip([k for k, _ in join_keys], values)) for values in zip(*[c.to_pylist() for c in cols])]
    return [entity_field(join_keys, r, i) for i, r in enumerate(rows)]


def _packed_int_keys(
    join_keys: Sequence[tuple[str, ValueType]], rows: Sequence[Mapping[str, Any]]
) -> bytes | None:
    """All rows' integer join keys packed big-endian in one struct call; None if a key is missing
    or not an integer (the per-row path then names the offending row)."""
    if not rows or not all(t in _INT_KEYS for _, t in join_keys):
        return None
    names = [k for k, _ in join_keys]
    try:
        flat = [row[k] for row in rows for k in names] if len(names) > 1 else [row[names[0]] for row in rows]
        return struct.pack(f">{len(flat)}q", *flat)
    except (KeyError, TypeError, struct.error):
        return None


def _entity_fields_from_rows(
    join_keys: Sequence[tuple[str, ValueType]], rows: Sequence[Mapping[str, Any]]
) -> np.ndarray | list[bytes]:
    packed = _packed_int_keys(join_keys, rows)
    if packed is not None:
        return np.frombuffer(packed, f"V{8 * len(join_keys)}")
    return [entity_field(join_keys, row, i) for i, row in enumerate(rows)]


def _framed_entity_fields(
    join_keys: Sequence[tuple[str, ValueType]], rows: Sequence[Mapping[str, Any]]
) -> bytes:
    """The entity fields of `rows`, already framed as RESP bulk strings (the hot path of a read)."""
    packed = _packed_int_keys(join_keys, rows)
    if packed is not None:
        width = 8 * len(join_keys)
        framed = np.empty(
            len(rows), np.dtype([("h", "S4" if width < 10 else "S5"), ("k", f"V{width}"), ("c", "S2")])
        )
        framed["h"] = b"$%d\r\n" % width
        framed["k"] = np.frombuffer(packed, f"V{width}")
        framed["c"] = b"\r\n"
        return framed.tobytes()
    return b"".join([_bulk(entity_field(join_keys, row, i)) for i, row in enumerate(rows)])


# --------------------------------------------------------------------------- RESP framing


def _bulk(arg: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def _command(
    head: Sequence[bytes], fields: np.ndarray | list[bytes], values: np.ndarray | list[bytes]
) -> bytes:
    """One RESP command: `head` args then field, value pairs. Fixed-width fields and values are
    framed with numpy in one pass (no per-row Python), which is what makes bulk loads fast."""
    n = len(fields)
    prefix = b"*%d\r\n" % (len(head) + 2 * n) + b"".join(_bulk(a) for a in head)
    if isinstance(fields, np.ndarray) and isinstance(values, np.ndarray):
        fw, vw = fields.dtype.itemsize, values.dtype.itemsize
        fh, vh = b"$%d\r\n" % fw, b"$%d\r\n" % vw
        entry = np.dtype(
            [
                ("fh", f"S{len(fh)}"),
                ("f", f"V{fw}"),
                ("c1", "S2"),
                ("vh", f"S{len(vh)}"),
                ("v", f"V{vw}"),
                ("c2", "S2"),
            ]
        )
        framed = np.empty(n, entry)
        framed["fh"], framed["f"], framed["c1"] = fh, fields, b"\r\n"
        framed["vh"], framed["v"], framed["c2"] = vh, values, b"\r\n"
        return prefix + framed.tobytes()
    fs = [bytes(f) for f in fields] if isinstance(fields, np.ndarray) else fields
    vs = [bytes(v) for v in values] if isinstance(values, np.ndarray) else values
    return prefix + b"".join([b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(f), f, len(v), v) for f, v in zip(fs, vs)])


class _Channel:
    """Sends pre-framed RESP commands on connections taken from the client's pool.

    Bypasses redis-py's per-command machinery (argument packing, pool round trip), which costs
    more than Redis itself for a 100-entity read; connections are kept in a small free list.
    """

    def __init__(self, client: redis.Redis):
        self._pool = client.connection_pool
        self._idle: list = []
        self._pid = os.getpid()

    def _take(self):
        if self._pid != os.getpid():  # forked: never share a socket with the parent
            self._idle, self._pid = [], os.getpid()
        try:
            return self._idle.pop()
        except IndexError:
            return self._pool.get_connection()

    def _give_back(self, conn, broken: bool) -> None:
        if broken:
            conn.disconnect()
        self._idle.append(conn)

    def call(self, payload: bytes, retry: bool = True) -> Any:
        """One command, one reply; retried once on a dropped connection (e.g. Redis restarted)
        unless `retry` is False (a command that must not run twice)."""
        for attempt in (0, 1) if retry else (1,):
            conn = self._take()
            try:
                conn.send_packed_command([payload])
                reply = conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                self._give_back(conn, broken=True)
                if attempt:
                    raise
                continue
            except BaseException:
                self._give_back(conn, broken=True)
                raise
            self._give_back(conn, broken=False)
            return reply
        raise AssertionError("unreachable")

    def transaction(self, payload: bytes, replies: int) -> Any:
        """Send MULTI ... EXEC framed in `payload`; skip the `replies - 1` acknowledgements
        (+OK, QUEUED) and return EXEC's reply. Retried once on a dropped connection."""
        for attempt in (0, 1):
            conn = self._take()
            try:
                conn.send_packed_command([payload])
                for _ in range(replies - 1):
                    conn.read_response()
                reply = conn.read_response()
            except (redis.ConnectionError, redis.TimeoutError):
                self._give_back(conn, broken=True)
                if attempt:
                    raise
                continue
            except BaseException:
                self._give_back(conn, broken=True)
                raise
            self._give_back(conn, broken=False)
            return reply
        raise AssertionError("unreachable")

    def stream(self, payloads: Iterable[bytes], window: int = 8) -> list:
        """Pipelined: up to `window` commands in flight, replies in order. Any error drops the
        connection (unread replies with it) and is raised."""
        conn = self._take()
        replies: list = []
        inflight = 0
        try:
            for payload in payloads:
                conn.send_packed_command([payload])
                inflight += 1
                if inflight >= window:
                    replies.append(conn.read_response())
                    inflight -= 1
            while inflight:
                replies.append(conn.read_response())
                inflight -= 1
        except BaseException:
            self._give_back(conn, broken=True)
            raise
        self._give_back(conn, broken=False)
        return replies

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            self._pool.release(conn)


class _Script:
    """A Lua script run with EVALSHA over a _Channel, loaded on first NOSCRIPT."""

    def __init__(self, source: str):
        self.source = source.encode()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()

    def frame(self, keys: Sequence[bytes], args: Sequence[bytes] = (), pairs: tuple | None = None) -> bytes:
        head = [b"EVALSHA", self.sha, b"%d" % len(keys), *keys, *args]
        if pairs is None:
            return b"*%d\r\n" % len(head) + b"".join(_bulk(a) for a in head)
        return _command(head, *pairs)

    def run(self, channel: _Channel, payload: bytes, retry: bool = True) -> Any:
        try:
            return channel.call(payload, retry)
        except redis.exceptions.NoScriptError:
            self.load(channel)
            return channel.call(payload, retry)

    def load(self, channel: _Channel) -> None:
        channel.call(b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n" + _bulk(self.source))


_UPSERT = _Script(_UPSERT_LUA)
_MERGE = _Script(_MERGE_LUA)
_BEGIN = _Script(_BEGIN_LUA)
_MERGE_PHASE = _Script(_MERGE_PHASE_LUA)
_FLIP = _Script(_FLIP_LUA)
_ABORT = _Script(_ABORT_LUA)


# --------------------------------------------------------------------------- reads


@dataclass
class _ReadPlan:
    views: list[str]
    wanted: list[list[str]]  # features per view
    schemas: list[ViewSchema]  # join keys + ttl per view (definition, or recorded at materialization)
    keys: list[str]  # output join-key columns in order
    n: int
    meta_keys: list[bytes]
    framed: list[bytes]  # per view: its entity fields, framed as RESP bulk strings


_MULTI = b"*1\r\n$5\r\nMULTI\r\n"
_EXEC = b"*1\r\n$4\r\nEXEC\r\n"
_HGET_VERSION = b"*3\r\n$4\r\nHGET\r\n"
_VERSION = _bulk(b"version")


def _read_payload(plan: _ReadPlan, data_keys: Sequence[bytes]) -> bytes:
    """MULTI, then per view: HGET <meta> version; HMGET <data key of the version we expect> <fields>;
    EXEC. One round trip; MULTI/EXEC makes the pointer read and the values one atomic snapshot."""
    parts = [_MULTI]
    for meta, data_key, framed in zip(plan.meta_keys, data_keys, plan.framed):
        parts.append(_HGET_VERSION + _bulk(meta) + _VERSION)
        if plan.n:
            parts.append(b"*%d\r\n$5\r\nHMGET\r\n" % (2 + plan.n) + _bulk(data_key) + framed)
        else:  # no entities: keep the reply shape (version, values) with a harmless command
            parts.append(b"*2\r\n$6\r\nEXISTS\r\n" + _bulk(data_key))
    parts.append(_EXEC)
    return b"".join(parts)


def _now_us(now: datetime | float | None) -> int:
    if now is None:
        return time.time_ns() // 1000
    if isinstance(now, datetime):
        if now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        delta = now - EPOCH
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    return round(float(now) * 1_000_000)


def _to_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisOnlineStore:
    """The online store of one project in one Redis database.

    `views`: the feature view definitions (optional; a list, or a name -> view mapping kept by
    reference). When given, reads take join keys and TTL from them (the single source of truth)
    and `write_view` accepts a view name; without them the store uses what was recorded in Redis
    when each view was materialized. `batch_size` entities per write command and
    `pipeline_window` commands in flight trade materialization speed against the latency of
    reads served meanwhile (see docs/online_store.md).
    """

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
        self._channel = _Channel(self.client)
        self._codecs: dict[
            tuple[str, str], ValueCodec
        ] = {}  # (view, version) -> codec; versions are immutable
        self._recorded: dict[str, ViewSchema] = {}  # view -> schema of the latest version seen
        self._definition_schemas: dict[str, tuple[FeatureView, ViewSchema]] = {}
        self._schema_codecs: dict[ViewSchema, ValueCodec] = {}
        self._parsed_refs: dict[tuple[str, ...], list[tuple[str, list[str]]]] = {}
        self._versions: dict[str, bytes] = {}  # view -> version last read (checked inside every read)

    # ---- keys

    def meta_key(self, view: str) -> str:
        return f"{self.namespace}meta:{view}"

    def data_key(self, view: str, version: int | str) -> str:
        return f"{self.namespace}data:{view}:{version}"

    def overlay_key(self, view: str, version: int | str) -> str:
        return f"{self.namespace}overlay:{view}:{version}"

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
        schema = self._codec(view, _to_text(version)).schema
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

    # ---- reads

    def _plan(
        self, features: Sequence[str] | Mapping[Any, Sequence[str]], entity_rows: Sequence[Mapping[str, Any]]
    ) -> _ReadPlan:
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
                framed = fields_cache[jk] = _framed_entity_fields(jk, entity_rows)
            framed_per_view.append(framed)
            views.append(view)
            wanted.append(feats)
            schemas.append(schema)
            keys += [k for k, _ in jk if k not in keys]
        meta_keys = [self.meta_key(v).encode() for v in views]
        return _ReadPlan(views, wanted, schemas, keys, len(entity_rows), meta_keys, framed_per_view)

    def read(
        self,
        features: Sequence[str] | Mapping[Any, Sequence[str]],
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
        for _ in range(_READ_ATTEMPTS):
            expected = [self._versions.get(v, b"0") for v in plan.views]
            data_keys = [self.data_key(v, _to_text(e)).encode() for v, e in zip(plan.views, expected)]
            reply = self._channel.transaction(_read_payload(plan, data_keys), 2 + 2 * len(plan.views))
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
        features: Sequence[str] | Mapping[Any, Sequence[str]],
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
        for _ in range(_READ_ATTEMPTS):
            expected = [self._versions.get(v, b"0") for v in plan.views]
            async with self.async_client.pipeline(transaction=True) as pipe:
                for view, meta, version, schema in zip(plan.views, plan.meta_keys, expected, plan.schemas):
                    pipe.hget(meta, "version")
                    if fields[schema.join_keys]:
                        pipe.hmget(self.data_key(view, _to_text(version)), fields[schema.join_keys])
                    else:
                        pipe.exists(self.data_key(view, _to_text(version)))  # placeholder: no entities
                reply = await pipe.execute()
            reply = [r if i % 2 == 0 or plan.n else [] for i, r in enumerate(reply)]
            if self._versions_match(plan, expected, reply):
                break
        else:
            raise self._moving_target(plan)
        return self._assemble(
            plan, reply, entity_rows, full_feature_names, include_event_timestamps, include_status, now
        )

    def _versions_match(self, plan: _ReadPlan, expected: list[bytes], reply: list) -> bool:
        """True if every view's current version was the one read; else remember the new ones."""
        for item in reply:
            if isinstance(item, Exception):
                raise OnlineStoreError(f"reading {plan.views} from Redis failed: {item}") from item
        match = True
        for view, want, got in zip(plan.views, expected, reply[0::2]):
            if got is None:
                raise self._not_materialized(view)
            if got != want:
                self._versions[view] = got if isinstance(got, bytes) else str(got).encode()
                match = False
        return match

    def _moving_target(self, plan: _ReadPlan) -> OnlineStoreError:
        return OnlineStoreError(
            f"the materialized versions of {plan.views} changed {_READ_ATTEMPTS} times during one read; retry"
        )

    def _assemble(
        self, plan: _ReadPlan, reply, entity_rows, full_names, with_ts, with_status, now
    ) -> dict[str, list]:
        n = plan.n
        now_us = _now_us(now)
        out: dict[str, list] = {k: [row[k] for row in entity_rows] for k in plan.keys}
        features_out: dict[str, list] = {}
        extras: dict[str, list] = {}
        for view, wanted, schema, version, values in zip(
            plan.views, plan.wanted, plan.schemas, reply[0::2], reply[1::2]
        ):
            version = _to_text(version)
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
                fresh = ts >= now_us - round(ttl * 1_000_000)
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
                    col[i] = EPOCH + timedelta(microseconds=us)
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

    # ---- writes

    def _view_for_write(self, view: FeatureView | str) -> FeatureView:
        definition = self._definition(view)
        if definition is None:
            raise ValueError(
                f"feature view {view!r} is not known to this online store: pass the FeatureView object, "
                f"or construct RedisOnlineStore(..., views=[...]) with it"
            )
        return definition

    def write_view(
        self,
        view: FeatureView | str,
        data: pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch] | Any,
        *,
        mode: str = "full",
        as_of: datetime | None = None,
        timestamp_column: str = EVENT_TIMESTAMP,
        chunk_rows: int = 65_536,
    ) -> dict[str, Any]:
        """Materialize one row per entity (join keys, event timestamp, the view's features).

        mode="full": write a new version, then flip the view's pointer in one atomic step (readers
        see the old snapshot or the new one, never a mix); the old version is then deleted (after
        `retire_grace_seconds`). mode="incremental": upsert the given entities into the current
        version, newer event time wins, each batch in one atomic script. Streams record batches,
        so memory stays bounded by `chunk_rows`. Returns rows, seconds, rows_per_s, version, mode.
        """
        if mode not in ("full", "incremental"):
            raise ValueError(f"mode must be 'full' or 'incremental', got {mode!r}")
        fv = self._view_for_write(view)
        schema = ViewSchema.of(fv)
        codec = ValueCodec(schema)
        started = time.perf_counter()
        self.reap_retired(fv.name)
        batches = _record_batches(data, chunk_rows)
        meta = self.meta_key(fv.name)
        if mode == "incremental":
            current = self.client.hmget(meta, ["version", "current_fp"])
            if current[0] is None:
                raise self._not_materialized(fv.name)
            if _to_text(current[1]) != codec.fingerprint:
                raise OnlineStoreError(
                    f"feature view {fv.name!r}: its features changed since version {_to_text(current[0])} was "
                    f"materialized; run a full materialization instead of an incremental one"
                )
            rows = self._upsert_batches(fv.name, schema, codec, batches, timestamp_column)
            seconds = time.perf_counter() - started
            version = _to_text(self.client.hget(meta, "version"))
            record = self._run_record("incremental", rows, seconds, as_of)
            previous = self.client.hget(meta, "as_of")
            if (
                previous is not None
                and "as_of" in record
                and datetime.fromisoformat(record["as_of"]) < datetime.fromisoformat(_to_text(previous))
            ):
                record.pop("as_of")  # never move the recorded as_of backwards
            record["rows"] = self.client.hlen(self.data_key(fv.name, version))
            self.client.hset(meta, mapping=record)
        else:
            rows, version = self._full_build(
                fv.name, schema, codec, batches, timestamp_column, as_of, started
            )
            seconds = time.perf_counter() - started
        self._recorded[fv.name] = schema
        return {
            "view": fv.name,
            "mode": mode,
            "rows": rows,
            "seconds": seconds,
            "rows_per_s": rows / seconds if seconds > 0 else float("inf"),
            "version": int(version),
        }

    def _run_record(self, mode: str, rows: int, seconds: float, as_of: datetime | None) -> dict[str, str]:
        record = {
            "last_mode": mode,
            "last_rows": str(rows),
            "last_seconds": f"{seconds:.6f}",
            "materialized_at": datetime.now(UTC).isoformat(),
        }
        if as_of is not None:
            if as_of.tzinfo is None:
                as_of = as_of.replace(tzinfo=UTC)
            record["as_of"] = as_of.astimezone(UTC).isoformat()
        elif mode == "full":
            record["as_of"] = ""  # a new snapshot of unknown as_of: do not keep the previous one's
        return record

    def _full_build(self, view, schema, codec, batches, timestamp_column, as_of, started) -> tuple[int, int]:
        meta = self.meta_key(view).encode()
        version = int(self.client.hincrby(meta, "next_version", 1))
        data_key = self.data_key(view, version)
        overlay = self.overlay_key(view, version)
        v = str(version).encode()
        stale = _BEGIN.run(
            self._channel,
            _BEGIN.frame(
                [meta],
                [
                    v,
                    data_key.encode(),
                    overlay.encode(),
                    codec.fingerprint.encode(),
                    schema.to_json().encode(),
                ],
            ),
        )
        stale_keys = [k for k in stale if k]
        if stale_keys:  # an unfinished earlier build (crashed or superseded): it can never be flipped now
            self.client.unlink(*stale_keys)
        try:
            rows = 0

            def commands() -> Iterator[bytes]:
                nonlocal rows
                head = [b"HSET", data_key.encode()]
                for batch in batches:
                    fields = _entity_fields(schema.join_keys, batch)
                    values = codec.encode(batch, timestamp_column)
                    for start in range(0, batch.num_rows, self.batch_size):
                        stop = min(start + self.batch_size, batch.num_rows)
                        rows += stop - start
                        yield _command(head, fields[start:stop], values[start:stop])

            self._channel.stream(commands(), window=self.pipeline_window)
            # Bulk load done: from now on stream updates go straight into the new version, so the
            # overlay is frozen and can be merged (newer event time wins) before the flip.
            _MERGE_PHASE.run(self._channel, _MERGE_PHASE.frame([meta], [v]))
            self._merge_overlay(overlay, data_key)
            seconds = time.perf_counter() - started
            record = self._run_record("full", rows, seconds, as_of)
            record_args = [x.encode() for kv in record.items() for x in kv]
            old_version, old_key = _FLIP.run(
                self._channel,
                _FLIP.frame([meta], [v, data_key.encode(), codec.fingerprint.encode(), *record_args]),
                retry=False,  # if the connection drops mid-flip, the abort below keeps a flipped version
            )
        except BaseException as exc:
            # Keep the original error if the clean-up fails too; the next full build removes leftovers.
            with contextlib.suppress(redis.RedisError, OSError):
                _ABORT.run(self._channel, _ABORT.frame([meta], [v, data_key.encode(), overlay.encode()]))
            if isinstance(exc, redis.ResponseError) and "SUPERSEDED" in str(exc):
                raise OnlineStoreError(
                    f"feature view {view!r}: another full materialization started while this one (version "
                    f"{version}) was running; this run was discarded and the other one's version is kept"
                ) from exc
            raise
        self._codecs[(view, str(version))] = codec
        if old_key:
            self._retire(view, _to_text(old_version), _to_text(old_key))
        return rows, version

    def _merge_overlay(self, overlay: str, data_key: str) -> None:
        cursor = 0
        while True:
            cursor, pairs = self.client.hscan(overlay, cursor, count=self.batch_size)
            if pairs:
                fields, values = list(pairs.keys()), list(pairs.values())
                _MERGE.run(self._channel, _MERGE.frame([data_key.encode()], pairs=(fields, values)))
            if cursor == 0:
                break
        self.client.unlink(overlay)

    def _upsert_batches(self, view, schema: ViewSchema, codec: ValueCodec, batches, timestamp_column) -> int:
        meta = self.meta_key(view).encode()
        fp = codec.fingerprint.encode()
        rows = 0

        def commands() -> Iterator[bytes]:
            nonlocal rows
            for batch in batches:
                fields = _entity_fields(schema.join_keys, batch)
                values = codec.encode(batch, timestamp_column)
                for start in range(0, batch.num_rows, self.batch_size):
                    stop = min(start + self.batch_size, batch.num_rows)
                    rows += stop - start
                    yield _UPSERT.frame([meta], [fp], pairs=(fields[start:stop], values[start:stop]))

        _UPSERT.load(self._channel)  # `batches` can be read once: no NOSCRIPT retry mid-stream
        try:
            self._channel.stream(commands(), window=self.pipeline_window)
        except redis.ResponseError as exc:
            raise self._upsert_error(view, exc) from exc
        return rows

    def _upsert_error(self, view: str, exc: Exception) -> Exception:
        text = str(exc)
        if text.startswith("NOT_MATERIALIZED"):
            return self._not_materialized(view)
        if text.startswith("SCHEMA_MISMATCH"):
            self._recorded.pop(view, None)
            return OnlineStoreError(
                f"feature view {view!r}: the values' features differ from the materialized version's; "
                f"run a full materialization of the view (or update the feature view definition)"
            )
        return exc

    def update_entities(
        self, view: FeatureView | str, rows: Sequence[Mapping[str, Any]] | pa.Table
    ) -> dict[str, int]:
        """Write the latest values of a few entities into the current version (the stream worker's
        path): each row needs the join keys, `event_timestamp` and every feature of the view.
        Atomic per call; per entity the newest event time wins, so a replayed or late event never
        overwrites a newer value. While a full materialization is running, the update also goes
        into the new version, so the flip does not lose it. Returns rows sent and written."""
        definition = self._definition(view)
        name = definition.name if definition is not None else str(view)
        schema = self._definition_schema(definition) if definition is not None else self._current_schema(name)
        codec = self._codec_for(schema)
        if isinstance(rows, pa.Table):
            n = rows.num_rows
            fields, values = (_entity_fields(schema.join_keys, rows), codec.encode(rows)) if n else ([], [])
        else:
            rows = list(rows)
            n = len(rows)
            required = [k for k, _ in schema.join_keys] + [EVENT_TIMESTAMP] + codec.names
            for i, row in enumerate(rows):
                missing = [c for c in required if c not in row]
                if missing:
                    raise ValueError(
                        f"update of feature view {name!r}: row {i} has no {missing}; every row needs {required}"
                    )
            try:
                fields, values = _entity_fields_from_rows(schema.join_keys, rows), codec.encode_rows(rows)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"update of feature view {name!r}: {exc}") from exc
        if n == 0:
            return {"rows": 0, "written": 0}
        meta = self.meta_key(name).encode()
        written = 0
        for start in range(0, n, self.batch_size):
            stop = min(start + self.batch_size, n)
            payload = _UPSERT.frame(
                [meta], [codec.fingerprint.encode()], pairs=(fields[start:stop], values[start:stop])
            )
            try:
                written += int(_UPSERT.run(self._channel, payload))
            except redis.ResponseError as exc:
                raise self._upsert_error(name, exc) from exc
        return {"rows": n, "written": written}

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
                field = _to_text(field)
                if field.startswith("retired:") and float(deadline) <= now:
                    version = field.split(":", 1)[1]
                    key = self.data_key(name, version)
                    self.client.unlink(key)
                    self.client.hdel(meta, field, f"schema:{version}")
                    deleted.append(key)
        return deleted

    def materialized_views(self) -> list[str]:
        prefix = f"{self.namespace}meta:"
        return sorted(
            _to_text(k)[len(prefix) :] for k in self.client.scan_iter(match=prefix + "*", count=1000)
        )

    def metadata(self, view: str) -> dict[str, Any]:
        """The view's last materialization: version, as_of, rows (entities in the current version),
        last_mode / last_rows / last_seconds, materialized_at, ttl_seconds; {} if never materialized."""
        raw = {_to_text(k): _to_text(v) for k, v in self.client.hgetall(self.meta_key(view)).items()}
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
        return deleted

    def close(self) -> None:
        self._channel.close()


def _record_batches(data: Any, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `chunk_rows` rows from a Table, RecordBatch, RecordBatchReader,
    an iterable of batches or tables, a pandas DataFrame or a list of dicts."""
    if isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=chunk_rows)
        return
    if isinstance(data, pa.RecordBatch):
        data = [data]
    elif isinstance(data, list) and (not data or isinstance(data[0], Mapping)):
        yield from pa.Table.from_pylist(data).to_batches(max_chunksize=chunk_rows)
        return
    elif type(data).__name__ == "DataFrame":
        yield from pa.Table.from_pandas(data, preserve_index=False).to_batches(max_chunksize=chunk_rows)
        return
    for batch in data:
        if isinstance(batch, pa.Table):
            yield from batch.to_batches(max_chunksize=chunk_rows)
            continue
        for start in range(0, batch.num_rows, chunk_rows):
            yield batch.slice(start, chunk_rows)


# --------------------------------------------------------------------------- feature store glue


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


def materialize(
    online: RedisOnlineStore,
    feature_store: Any,
    views: Sequence[FeatureView | str] | None = None,
    as_of: datetime | None = None,
    *,
    mode: str = "full",
) -> list[dict[str, Any]]:
    """Load each view's latest values as of `as_of` (default now, UTC) from the offline store into
    Redis. mode="incremental" writes only entities whose event time is after the view's last
    recorded as_of (a view never materialized gets a full load). One result dict per view."""
    if mode not in ("full", "incremental"):
        raise ValueError(f"mode must be 'full' or 'incremental', got {mode!r}")
    as_of = as_of or datetime.now(UTC)
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    chosen = views if views is not None else feature_store.list_feature_views()
    results = []
    for view in chosen:
        fv = view if isinstance(view, FeatureView) else feature_store.get_feature_view(view)
        view_mode = mode
        table = feature_store.latest_features(fv.name, as_of)
        if mode == "incremental":
            since = online.metadata(fv.name).get("as_of")
            if since is None:
                view_mode = "full"
            else:
                table = table.filter(
                    pc.greater(table.column(EVENT_TIMESTAMP), pa.scalar(since, pa.timestamp("us", tz="UTC")))
                )
        result = online.write_view(fv, table, mode=view_mode, as_of=as_of)
        result["as_of"] = as_of
        results.append(result)
    return results
