"""Entity keys: the hash field of an entity is its join key values packed in the view's join-key
order (Int64/Int32 keys as 8-byte big-endian signed integers, String keys as a 2-byte length +
UTF-8), so one HMGET reads many entities. Integer keys are packed with one struct/numpy call for a
whole batch; the per-row path exists to name the offending row and key.

On Redis Cluster an entity's bucket (`entity_buckets`) is a hash of its field: the one rule that
decides which slot holds an entity, for reads and writes alike (cluster_layout.py names the keys)."""

from __future__ import annotations

import itertools
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from ml_platform.featurestore.definitions import ValueType
from ml_platform.featurestore.online.codec import INT_TYPES, as_int, column_as
from ml_platform.featurestore.online.resp import bulk

JoinKeys = Sequence[tuple[str, ValueType]]
_I64 = struct.Struct(">q")
_U16 = struct.Struct(">H")


def _key_error(key: str, value: Any, row: int, expected: str) -> ValueError:
    return ValueError(f"entity row {row}: join key {key!r} must be {expected}, got {value!r}")


def entity_field(join_keys: JoinKeys, row: Mapping[str, Any], index: int = 0) -> bytes:
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
        if vtype in INT_TYPES:
            if isinstance(value, bool) or value is None:
                raise _key_error(key, value, index, "an integer")
            try:
                parts.append(_I64.pack(value if type(value) is int else as_int(value)))
            except (TypeError, ValueError, struct.error):
                raise _key_error(key, value, index, "a 64-bit integer") from None
        else:
            if not isinstance(value, str):
                raise _key_error(key, value, index, "a string")
            b = value.encode()
            parts.append(_U16.pack(len(b)) + b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def entity_fields(join_keys: JoinKeys, batch: pa.RecordBatch | pa.Table) -> np.ndarray | list[bytes]:
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
        cols.append(column_as(col, pa.int64() if vtype in INT_TYPES else pa.string(), key))
    if all(t in INT_TYPES for _, t in join_keys):
        packed = np.empty(batch.num_rows, np.dtype([(f"k{i}", ">i8") for i in range(len(cols))]))
        for i, col in enumerate(cols):
            packed[f"k{i}"] = col.to_numpy(zero_copy_only=False)
        return packed.view(f"V{8 * len(cols)}")
    rows = [dict(zip([k for k, _ in join_keys], values)) for values in zip(*[c.to_pylist() for c in cols])]
    return [entity_field(join_keys, r, i) for i, r in enumerate(rows)]


def _packed_int_keys(join_keys: JoinKeys, rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """All rows' integer join keys packed big-endian in one struct call; None if a key is missing
    or not an integer (the per-row path then names the offending row)."""
    if not rows or not all(t in INT_TYPES for _, t in join_keys):
        return None
    names = [k for k, _ in join_keys]
    try:
        flat = [row[k] for row in rows for k in names] if len(names) > 1 else [row[names[0]] for row in rows]
        return struct.pack(f">{len(flat)}q", *flat)
    except (KeyError, TypeError, struct.error):
        return None


def entity_fields_from_rows(
    join_keys: JoinKeys, rows: Sequence[Mapping[str, Any]]
) -> np.ndarray | list[bytes]:
    """`entity_fields` for Python dict rows (the stream worker's and a read's input)."""
    packed = _packed_int_keys(join_keys, rows)
    if packed is not None:
        return np.frombuffer(packed, f"V{8 * len(join_keys)}")
    return [entity_field(join_keys, row, i) for i, row in enumerate(rows)]


def framed_entity_fields(join_keys: JoinKeys, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The entity fields of `rows`, already framed as RESP bulk strings (the hot path of a read)."""
    packed = _packed_int_keys(join_keys, rows)
    if packed is not None:
        return frame_fields(np.frombuffer(packed, f"V{8 * len(join_keys)}"))
    return b"".join([bulk(entity_field(join_keys, row, i)) for i, row in enumerate(rows)])


def frame_fields(fields: np.ndarray | list[bytes]) -> bytes:
    """Entity fields framed as RESP bulk strings: a fixed-width array in one numpy pass."""
    if not isinstance(fields, np.ndarray):
        return b"".join([bulk(f) for f in fields])
    return framed_field_array(fields).tobytes()


def framed_field_array(fields: np.ndarray) -> np.ndarray:
    """Fixed-width entity fields framed as RESP bulk strings, one record per field (so a subset
    is framed by indexing)."""
    width = fields.dtype.itemsize
    framed = np.empty(
        len(fields), np.dtype([("h", "S4" if width < 10 else "S5"), ("k", f"V{width}"), ("c", "S2")])
    )
    framed["h"] = b"$%d\r\n" % width
    framed["k"] = fields
    framed["c"] = b"\r\n"
    return framed


# The bucket hash: the field's bytes as big-endian 64-bit words (the last one zero-padded), each
# mixed in with a multiply and xor-shift (splitmix64's constants). Not Python's hash(): every
# process and every language must agree on it.
_SEED, _MUL, _MASK = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, (1 << 64) - 1


def entity_bucket(field: bytes, buckets: int) -> int:
    """The bucket of one entity field (same result as `entity_buckets`)."""
    h = _SEED
    padded = field + b"\0" * (-len(field) % 8)
    for i in range(0, len(padded), 8):
        h = ((h ^ int.from_bytes(padded[i : i + 8], "big")) * _MUL) & _MASK
        h ^= h >> 31
    return (h >> 33) % buckets


def entity_buckets(fields: np.ndarray | list[bytes], buckets: int) -> np.ndarray:
    """The bucket (0 <= b < `buckets`) of every entity field, vectorised for fixed-width fields."""
    if not isinstance(fields, np.ndarray):
        return np.array([entity_bucket(f, buckets) for f in fields], dtype=np.int64)
    n, width = len(fields), fields.dtype.itemsize
    if width % 8:
        return np.array([entity_bucket(bytes(f), buckets) for f in fields], dtype=np.int64)
    words = np.ascontiguousarray(fields).view(">u8").reshape(n, width // 8).astype(np.uint64)
    h = np.full(n, _SEED, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(width // 8):
            h = (h ^ words[:, j]) * np.uint64(_MUL)
            h ^= h >> np.uint64(31)
    return ((h >> np.uint64(33)) % np.uint64(buckets)).astype(np.int64)


def bucket_groups(buckets: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(bucket, positions) for every bucket present in `buckets` (positions in input order)."""
    if len(buckets) == 1:
        return [(int(buckets[0]), np.zeros(1, np.int64))]
    order = np.argsort(buckets, kind="stable")
    ordered = buckets[order]
    cuts = [0, *(np.flatnonzero(np.diff(ordered)) + 1).tolist(), len(order)]
    return [(int(ordered[a]), order[a:b]) for a, b in itertools.pairwise(cuts) if a < b]
