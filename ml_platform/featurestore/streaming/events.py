"""The updater's input: events, and one batch of them as columns.

An event is a dict with `event_id` (str), the join keys, each view's timestamp field as int µs
since the epoch (None = not a row of that view) and the value columns (None/NaN = NULL).
`events_from_frame` builds them from a DataFrame of raw source rows; `EventColumns` extracts each
field of a batch once, as numpy arrays with presence masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.streaming.buffer import event_id_hash, key_part

EVENT_ID = "event_id"


class EventColumns:
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
            name = ":".join([key_part(v) for v in values])
            s = index.get(name)
            if s is None:
                s = index[name] = len(entities)
                entities.append(values)
            slot[j] = s
        return slot, entities


def _float_or_nan(value: Any) -> float:
    if value is None or value is pd.NA:
        return math.nan
    return float(value)


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
        # Missing values of any kind (NaN, None, NA, NaT) -> None, detected for the whole column.
        s = frame[c]
        absent = s.isna().to_numpy()
        data[c] = [None if na else x for x, na in zip(s.astype(object).tolist(), absent.tolist())]
    for c in times:
        s = pd.to_datetime(frame[c], utc=True)
        nat = s.isna().to_numpy()
        us = s.dt.tz_localize(None).to_numpy(dtype="datetime64[us]").astype(np.int64)
        data[c] = [None if missing_ts else u for u, missing_ts in zip(us.tolist(), nat.tolist())]
    keys = list(data)
    return [dict(zip(keys, values)) for values in zip(*data.values())]
