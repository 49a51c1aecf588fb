"""The window evaluation: pure numpy over decoded buffer records, no Redis.

Given the records of a buffer group's entities (the bytes the fold script returned, own appends
included) and the batch's events, `evaluate_group` answers per event and view, exactly as the
offline SQL and point-in-time join would:
  * `before`: the aggregates at the entity's latest row strictly before the event's time t (the
    point-in-time lookup at t - LOOKUP_OFFSET_US), null when there is none within the view's TTL;
  * `at_event` (optional): the aggregates at t itself (the offline table's row);
  * `latest`: per touched entity, the aggregates at its newest row (the online store's value).
An aggregation at instant q covers the entity's rows with time in [q - window, q], both ends
included (rows with equal times are peers and see each other); a record seen twice (same entity,
time and event id: a replay) counts once.

How: records are sorted by (entity, time) packed into one int64 (`SearchKeys`); each window
query is two searchsorted calls and a reduceat (`aggregates_at`), queries in (entity, time) order.

Why ~410 lines in one module: it is one job, the numpy half of the aggregation semantics; the
record decoding, the key packing, the value columns and the per-function reductions serve only
`evaluate_group`, and splitting them would spread one rule (what a window holds) over files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ml_platform import fixed_point
from ml_platform.featurestore.definitions import FEATURE_LOOKUP_OFFSET
from ml_platform.featurestore.online import EVENT_TIMESTAMP
from ml_platform.featurestore.streaming.buffer import NULL_KEY, unpack_records
from ml_platform.featurestore.streaming.events import EventColumns
from ml_platform.featurestore.streaming.plan import BufferGroup, CompiledView, is_integer_key
from ml_platform.timestamps import from_us, span_us

# Looked-up features are read as of t - FEATURE_LOOKUP_OFFSET (1 µs): the rule of the training set.
LOOKUP_OFFSET_US = span_us(FEATURE_LOOKUP_OFFSET)


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


def evaluate_group(
    group: BufferGroup,
    views: list[CompiledView],
    batch: EventColumns,
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
    `entity_keys` and `blobs`); `blobs`: per entity, its buffer's records without the header, the
    batch's own records included (what `BufferCache.update` returns)."""
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
    raw, counts = unpack_records(group, blobs)
    n_slots = len(blobs)
    slot = np.repeat(np.arange(n_slots, dtype=np.int64), counts)
    ev_index = rows
    ev_ts = batch.ints(group.timestamp_field)[0][rows]
    raw_ts = raw["ts"].astype(np.int64)
    keys = SearchKeys(
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
                ValueColumns(values),
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
        keep = (rec_x != NULL_KEY).all(axis=1)
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
        fine_keys = SearchKeys(int(change.sum()), keys.lowest, keys.highest, cv.name)
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
            ValueColumns(f_values),
            sel_index,
            fine_ev,
            ev_ts[applies],
            touched,
            latest_keys,
            with_event_values,
            out,
        )


class SearchKeys:
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
    keys: SearchKeys,
    buf_key: np.ndarray,
    ts: np.ndarray,
    columns: ValueColumns,
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
        vals = aggregates_at(cv, buf_key, columns, keys, ev_ent[sel], prev_ts[sel])
        before = out.before[cv.name]
        for name in names:
            before[name][ev_index[sel]] = vals[name]
    if with_event_values:
        vals = aggregates_at(cv, buf_key, columns, keys, ev_ent, ev_ts)
        at_event = out.at_event[cv.name]
        for name in names:
            at_event[name][ev_index] = vals[name]
    # latest: per touched entity, the aggregates at its newest row (the online store's value).
    seg_end = np.searchsorted(buf_key, (latest_ents + 1) << keys.shift, side="left")
    last_ts = ts[seg_end - 1]
    vals = aggregates_at(cv, buf_key, columns, keys, latest_ents, last_ts)
    out.latest[cv.name] = _latest_table(cv, vals, last_ts, latest_keys)


def _latest_table(
    cv: CompiledView, vals: dict[str, np.ndarray], last_ts: np.ndarray, key_values: dict[str, list]
) -> pa.Table:
    """The online store's rows: join keys, event_timestamp, features (NULL where NaN)."""
    columns: dict[str, pa.Array] = {}
    for k in cv.join_keys:
        typ = pa.int64() if is_integer_key(cv.view, k) else pa.string()
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


class ValueColumns:
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

    def padded_units(self, c: int, decimals: int) -> np.ndarray:
        """The column's int64 fixed-point units (NULL as 0), padded with a 0."""
        k = ("units", c, decimals)
        if k not in self._cache:
            out = np.zeros(len(self.values) + 1, np.int64)
            out[:-1] = fixed_point.units(self.values[:, c], decimals)
            self._cache[k] = out
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


def aggregates_at(
    cv: CompiledView,
    buf_key: np.ndarray,
    columns: ValueColumns,
    keys: SearchKeys,
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
            empty = present == 0
            if a.decimals is not None:  # sum or mean of fixed-point units: exact, as in SQL
                rk = ("units", a.column, a.decimals)
                if rk not in reduced:
                    padded = columns.padded_units(a.column, a.decimals)
                    reduced[rk] = np.add.reduceat(padded, pairs)[0::2] if m else np.empty(0, np.int64)
                if a.function == "mean":
                    value = fixed_point.mean_from_units(
                        reduced[rk], np.where(empty, 1.0, present), a.decimals
                    )
                else:
                    value = fixed_point.sum_from_units(reduced[rk], a.decimals)
                results[a.name] = np.where(empty, np.nan, value)
                continue
            ufunc, neutral = _REDUCE[a.function]
            rk = (ufunc, a.column)
            if rk not in reduced:
                reduced[rk] = (
                    ufunc.reduceat(columns.padded(a.column, neutral), pairs)[0::2] if m else np.empty(0)
                )
            value = reduced[rk]
            if a.function == "mean":
                value = value / np.where(empty, 1.0, present)
            results[a.name] = np.where(empty, np.nan, value)
    if unsort is not None:
        results = {name: values[unsort] for name, values in results.items()}
    return results
