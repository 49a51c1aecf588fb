"""The value codec: a view's feature values + event time packed into one bytes value per entity.

Packed value (little-endian): int64 event time (µs since the epoch, UTC), a null bitmap (one bit
per feature, so NaN and null stay distinct), one fixed-width slot per non-string feature grouped
by kind (float64, int64/UnixTimestamp, float32, int32, uint8/Bool), then each string feature as a
uint32 length + UTF-8 bytes. A version's `ViewSchema` is recorded in Redis with it, so a value is
always decoded with the schema it was written with. Layout details: docs/online_store.md.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ml_platform.featurestore.definitions import FeatureView, ValueType
from ml_platform.featurestore.offline import ENTITY_TS
from ml_platform.timestamps import EPOCH, to_us

# The time column of the rows the online store is given (the offline store's latest_features and
# the stream updates name it the same way).
EVENT_TIMESTAMP = ENTITY_TS

# Fixed-width slot per feature dtype (little-endian); String is variable-width, after the slots.
SLOT_DTYPE = {
    ValueType.Float64: "<f8",
    ValueType.Float32: "<f4",
    ValueType.Int64: "<i8",
    ValueType.Int32: "<i4",
    ValueType.Bool: "u1",
    ValueType.UnixTimestamp: "<i8",
}
# The Arrow type each feature dtype is stored from (also the stream worker's table schema).
ARROW_TYPE = {
    ValueType.Float64: pa.float64(),
    ValueType.Float32: pa.float32(),
    ValueType.Int64: pa.int64(),
    ValueType.Int32: pa.int32(),
    ValueType.Bool: pa.bool_(),
    ValueType.UnixTimestamp: pa.timestamp("us", tz="UTC"),
    ValueType.String: pa.string(),
}
INT_TYPES = (ValueType.Int64, ValueType.Int32)
_U32 = struct.Struct("<I")


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
            names = [n for n, t in schema.features if t is not ValueType.String and SLOT_DTYPE[t] == slot]
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
        rec["ts"] = arrow_timestamps_us(batch.column(timestamp_column), timestamp_column)
        nulls = np.zeros((n, len(self.names)), dtype=bool) if self.names else None
        string_values: list[list[str | None]] = []
        for name in self.names:
            dtype = self.dtypes[name]
            col = column_as(batch.column(name), ARROW_TYPE[dtype], name)
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
            elif dtype in INT_TYPES:
                values = [0 if v is None else _row_int(v, name, j) for j, v in enumerate(values)]
            elif null_rows:
                values = [0 if v is None else v for v in values]
            try:
                rec[f"f{i}"] = np.array(values, dtype=SLOT_DTYPE[dtype])
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


def arrow_timestamps_us(column: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    """A whole Arrow timestamp column as int64 µs since the epoch, UTC (a naive timestamp is taken
    as UTC), converted in one vectorised cast: the bulk-load path, so not `timestamps.to_us` per row."""
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
    return to_us(value)


def _row_int(value: Any, name: str, row: int) -> int:
    try:
        return as_int(value)
    except TypeError:
        raise ValueError(f"row {row}: feature {name!r} must be an integer, got {value!r}") from None


def as_int(value: Any) -> int:
    """An integer given as int, numpy integer, digit string or integral float; TypeError otherwise."""
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    raise TypeError(value)


def column_as(column: pa.Array | pa.ChunkedArray, target: pa.DataType, name: str) -> pa.Array:
    """`column` as one Array of `target` type; TypeError naming the column if it cannot be."""
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
