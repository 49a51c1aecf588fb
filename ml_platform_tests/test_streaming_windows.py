"""The window evaluation (`featurestore.streaming.windows`) without Redis: hand-made buffer
records in, hand-computed window values out. Every expected number is worked out in the comment
next to it from the records of the test, never by the code under test."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from ml_platform.featurestore import Aggregation, Entity, FeatureView, FileSource
from ml_platform.featurestore.streaming.events import EventColumns
from ml_platform.featurestore.streaming.plan import compile_views
from ml_platform.featurestore.streaming.windows import (
    FoldResult,
    SearchKeys,
    ValueColumns,
    aggregates_at,
    evaluate_group,
)

US_MIN = 60_000_000
US_H = 60 * US_MIN
T0 = 1_704_067_200_000_000  # 2024-01-01 00:00 UTC in µs
NAN = math.nan

user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
source = FileSource("events", timestamp_field="ts")
H, D = timedelta(hours=1), timedelta(days=1)

SPEND = FeatureView(
    "spend",
    entities=[user],
    source=source,
    aggregations=[
        Aggregation("count", H, name="rows_1h"),
        Aggregation("count", H, "amount", name="amounts_1h"),
        Aggregation("sum", H, "amount", name="sum_1h"),
        Aggregation("mean", H, "amount", name="mean_1h"),
        Aggregation("max", H, "amount", name="max_1h"),
        Aggregation("sum", D, "amount", name="sum_24h"),
        Aggregation("min", D, "amount", name="min_24h"),
    ],
    ttl=2 * H,
)
FEATURES = ["rows_1h", "amounts_1h", "sum_1h", "mean_1h", "max_1h", "sum_24h", "min_24h"]
PAIR = FeatureView(
    "pair",
    entities=[user, merchant],
    source=source,
    aggregations=[Aggregation("count", D, name="pair_24h")],
    ttl=2 * D,
)
COMPILED, GROUPS = compile_views([SPEND, PAIR])
GROUP = GROUPS["spend"]  # the pair view lives in the card holder's buffer (merchant_id as extra key)


def test_the_plan_this_file_relies_on():
    assert COMPILED["pair"].group == "spend" and GROUP.extra_keys == ("merchant_id",)
    assert GROUP.value_columns == ("amount",)


def records(*rows: tuple[str, int, float, int | None]) -> bytes:
    """A buffer's records by hand: (event id, time µs, amount or NaN, merchant id or None)."""
    rec = np.zeros(len(rows), GROUP.record_dtype)
    for i, (event_id, ts, amount, merchant_id) in enumerate(rows):
        rec["ts"][i] = ts
        rec["v"][i, 0] = amount
        rec["x"][i, 0] = np.iinfo(np.int64).min if merchant_id is None else merchant_id
        rec["id"][i] = np.void(event_id.encode().ljust(8, b"\0"))
    return rec.tobytes()


def event(event_id: str, user_id: int, ts: int | None, merchant_id: int | None = 7) -> dict:
    return {"event_id": event_id, "user_id": user_id, "merchant_id": merchant_id, "ts": ts}


def evaluate(events: list[dict], buffers: dict[int, bytes], views=("spend", "pair")) -> FoldResult:
    """What the updater evaluates after a fold: `buffers` per user id (the batch's own records
    included, as the fold script returns them), the events as they came in the batch."""
    users = list(buffers)
    rows = np.array([i for i, e in enumerate(events) if e["ts"] is not None], np.int64)
    slot = np.array([users.index(events[i]["user_id"]) for i in rows], np.int64)
    out = FoldResult({}, {}, {}, {}, {})
    evaluate_group(
        GROUP,
        [COMPILED[v] for v in views],
        EventColumns(events),
        rows,
        slot,
        [(u,) for u in users],
        [buffers[u] for u in users],
        True,
        out,
    )
    return out


def values(part: dict, i: int, view: str = "spend") -> list[float]:
    return [float(part[view][f][i]) for f in FEATURES]


def same(got: list[float], expected: list[float]) -> bool:
    return np.allclose(got, expected, rtol=0, atol=1e-12, equal_nan=True)


def test_count_sum_mean_max_min_over_each_window_with_both_bounds_included():
    # user 1: 00:00 10, 00:30 20, 01:00 30, 01:30 NULL, 02:00 5 (the batch's event)
    buf = records(
        ("a", T0, 10.0, 7),
        ("b", T0 + 30 * US_MIN, 20.0, 8),
        ("c", T0 + 60 * US_MIN, 30.0, 7),
        ("d", T0 + 90 * US_MIN, NAN, 7),
        ("e", T0 + 120 * US_MIN, 5.0, 7),
    )
    out = evaluate([event("e", 1, T0 + 120 * US_MIN)], {1: buf})
    # at 02:00, 1h = [01:00, 02:00]: c, d, e -> 3 rows, 2 amounts, 30 + 5 = 35, mean 17.5, max 30;
    # 24h: all -> 10 + 20 + 30 + 5 = 65, min 5
    assert same(values(out.at_event, 0), [3, 2, 35.0, 17.5, 30.0, 65.0, 5.0])
    # before: the latest row strictly before 02:00 is d (01:30), within the 2h TTL;
    # at 01:30, 1h = [00:30, 01:30]: b, c, d -> 3 rows, 2 amounts, 50, mean 25, max 30; 24h: 60, min 10
    assert out.found["spend"][0]
    assert same(values(out.before, 0), [3, 2, 50.0, 25.0, 30.0, 60.0, 10.0])
    # pair (1, 7): a, c, d, e at 02:00 -> 4; before, at d (01:30): a, c, d -> 3 (b is merchant 8)
    assert out.at_event["pair"]["pair_24h"][0] == 4 and out.before["pair"]["pair_24h"][0] == 3
    # latest: the online store's row at the entity's newest time, counts as integers
    (row,) = out.latest["spend"].to_pylist()
    assert row["user_id"] == 1 and row["event_timestamp"] == datetime(2024, 1, 1, 2, 0, tzinfo=UTC)
    assert row["rows_1h"] == 3 and row["amounts_1h"] == 2 and row["sum_1h"] == 35.0 and row["min_24h"] == 5.0
    assert out.latest["pair"].to_pylist() == [
        {
            "user_id": 1,
            "merchant_id": 7,
            "event_timestamp": datetime(2024, 1, 1, 2, 0, tzinfo=UTC),
            "pair_24h": 4,
        }
    ]


def test_lookup_reads_one_microsecond_before_the_event_and_equal_times_are_peers():
    # a at T0 (1.0); b (2.0) and c (4.0) both at T0 + 1 µs: the batch's two events
    buf = records(("a", T0, 1.0, 7), ("b", T0 + 1, 2.0, 7), ("c", T0 + 1, 4.0, 7))
    out = evaluate([event("b", 1, T0 + 1), event("c", 1, T0 + 1)], {1: buf})
    for i in (0, 1):
        # looked up at T0: only a (b and c are at the event's own time, not before it)
        assert same(values(out.before, i), [1, 1, 1.0, 1.0, 1.0, 1.0, 1.0])
        # at T0 + 1 µs: a, b and c (peers see each other): 3 rows, 1 + 2 + 4 = 7, mean 7/3, max 4
        assert same(values(out.at_event, i), [3, 3, 7.0, 7 / 3, 4.0, 7.0, 1.0])


def test_ttl_keeps_a_row_exactly_ttl_before_the_lookup_time_and_nulls_an_older_one():
    # TTL 2h, looked up at t - 1 µs: a row at t - 1 µs - 2h is still valid, one 1 µs older is not.
    t = T0 + 5 * US_H
    buffers = {
        1: records(("p1", t - 1 - 2 * US_H, 3.0, 7), ("e1", t, 1.0, 7)),
        2: records(("p2", t - 2 - 2 * US_H, 3.0, 7), ("e2", t, 1.0, 7)),
    }
    out = evaluate([event("e1", 1, t), event("e2", 2, t)], buffers)
    assert out.found["spend"].tolist() == [True, False]
    assert same(values(out.before, 0), [1, 1, 3.0, 3.0, 3.0, 3.0, 3.0])  # p1's own aggregates
    assert same(values(out.before, 1), [NAN] * len(FEATURES))
    # at t, 1h: only the event itself (the earlier row is 2h back); 24h: 3 + 1 = 4, min 1
    assert same(values(out.at_event, 1), [1, 1, 1.0, 1.0, 1.0, 4.0, 1.0])
    # the pair view's TTL is 2 days: the same earlier row is found there
    assert out.found["pair"].tolist() == [True, True]


def test_first_event_of_an_entity_has_nothing_before_it():
    out = evaluate([event("e", 9, T0)], {9: records(("e", T0, 4.0, 7))})
    assert not out.found["spend"][0] and same(values(out.before, 0), [NAN] * len(FEATURES))
    assert same(values(out.at_event, 0), [1, 1, 4.0, 4.0, 4.0, 4.0, 4.0])


def test_entities_stay_apart_and_unsorted_records_and_events_are_answered_in_batch_order():
    # Records appended out of time order (late events), two users with interleaved times,
    # events in the batch not in (user, time) order.
    buffers = {
        2: records(("u2b", T0 + 40 * US_MIN, 200.0, 7), ("u2a", T0 + 10 * US_MIN, 100.0, 7)),
        1: records(("u1c", T0 + 50 * US_MIN, 3.0, 7), ("u1a", T0, 1.0, 7), ("u1b", T0 + 20 * US_MIN, 2.0, 7)),
    }
    batch = [event("u2b", 2, T0 + 40 * US_MIN), event("u1c", 1, T0 + 50 * US_MIN), event("u1a", 1, T0)]
    out = evaluate(batch, buffers)
    # u2b at 00:40: u2a, u2b -> 2 rows, 300, mean 150, max 200 (user 1's rows never count)
    assert same(values(out.at_event, 0), [2, 2, 300.0, 150.0, 200.0, 300.0, 100.0])
    assert same(values(out.before, 0), [1, 1, 100.0, 100.0, 100.0, 100.0, 100.0])  # at u2a
    # u1c at 00:50: u1a, u1b, u1c -> 3 rows, 6, mean 2, max 3; before: at u1b (00:20): 2 rows, 3
    assert same(values(out.at_event, 1), [3, 3, 6.0, 2.0, 3.0, 6.0, 1.0])
    assert same(values(out.before, 1), [2, 2, 3.0, 1.5, 2.0, 3.0, 1.0])
    # u1a at 00:00 (the earliest): itself only, nothing before it
    assert same(values(out.at_event, 2), [1, 1, 1.0, 1.0, 1.0, 1.0, 1.0])
    assert out.found["spend"].tolist() == [True, True, False]
    latest = {r["user_id"]: (r["event_timestamp"], r["sum_1h"]) for r in out.latest["spend"].to_pylist()}
    assert latest == {
        2: (datetime(2024, 1, 1, 0, 40, tzinfo=UTC), 300.0),
        1: (datetime(2024, 1, 1, 0, 50, tzinfo=UTC), 6.0),
    }


def test_a_late_event_leaves_the_online_value_at_the_newest_row():
    # 00:00 10 and 01:00 30 were folded before; the late event at 00:30 (5) arrives now
    buf = records(("a", T0, 10.0, 7), ("c", T0 + 60 * US_MIN, 30.0, 7), ("late", T0 + 30 * US_MIN, 5.0, 7))
    out = evaluate([event("late", 1, T0 + 30 * US_MIN)], {1: buf})
    assert same(values(out.before, 0), [1, 1, 10.0, 10.0, 10.0, 10.0, 10.0])  # at a (00:00)
    assert same(values(out.at_event, 0), [2, 2, 15.0, 7.5, 10.0, 15.0, 5.0])  # a and the late row
    (row,) = out.latest["spend"].to_pylist()
    # at 01:00, 1h = [00:00, 01:00]: a, late, c -> 3 rows, 45, max 30
    assert row["event_timestamp"] == datetime(2024, 1, 1, 1, 0, tzinfo=UTC)
    assert row["rows_1h"] == 3 and row["sum_1h"] == 45.0 and row["max_1h"] == 30.0


def test_a_replayed_record_counts_once_but_two_events_at_one_time_count_twice():
    # a twice (a replay: same time, same id), b at the same time with another id, then the event c
    buf = records(("a", T0, 10.0, 7), ("b", T0, 10.0, 7), ("a", T0, 10.0, 7), ("c", T0 + 10 * US_MIN, 1.0, 7))
    out = evaluate([event("c", 1, T0 + 10 * US_MIN)], {1: buf})
    assert same(values(out.before, 0), [2, 2, 20.0, 10.0, 10.0, 20.0, 10.0])  # a and b
    assert same(values(out.at_event, 0), [3, 3, 21.0, 7.0, 10.0, 21.0, 1.0])  # a, b, c
    assert out.at_event["pair"]["pair_24h"][0] == 3


def test_null_values_are_skipped_and_an_all_null_window_is_null_but_counts_rows():
    buf = records(("a", T0, NAN, 7), ("b", T0 + 5 * US_MIN, NAN, 7))
    out = evaluate([event("b", 1, T0 + 5 * US_MIN)], {1: buf})
    # 2 rows, 0 amounts; sum / mean / max / min of no values are NULL
    assert same(values(out.at_event, 0), [2, 0, NAN, NAN, NAN, NAN, NAN])
    (row,) = out.latest["spend"].to_pylist()
    assert row["rows_1h"] == 2 and row["amounts_1h"] == 0
    assert row["sum_1h"] is None and row["mean_1h"] is None and row["min_24h"] is None


def test_events_that_are_no_rows_of_the_group_or_view_get_nulls():
    # No timestamp: no row of the group at all -> nothing applies, empty online tables.
    out = evaluate([event("x", 1, None)], {})
    assert out.applies["spend"].tolist() == [False] and out.applies["pair"].tolist() == [False]
    assert same(values(out.before, 0), [NAN] * len(FEATURES))
    assert out.latest["spend"].num_rows == 0 and out.latest["pair"].num_rows == 0
    assert out.latest["spend"].column_names == ["user_id", "event_timestamp", *FEATURES]
    # No merchant: a row of the card holder's view, not of the pair view.
    buf = records(("a", T0, 1.0, 7), ("m", T0 + US_MIN, 2.0, None))
    out = evaluate([event("m", 1, T0 + US_MIN, merchant_id=None)], {1: buf})
    assert out.applies["spend"].tolist() == [True] and out.applies["pair"].tolist() == [False]
    assert out.at_event["spend"]["rows_1h"][0] == 2 and math.isnan(out.at_event["pair"]["pair_24h"][0])
    assert out.latest["pair"].num_rows == 0


def test_aggregates_at_answers_unsorted_queries_in_their_own_order():
    # Two entities' sorted rows: entity 0 at 0, 10, 20 min (1, 2, 4); entity 1 at 5 min (8).
    ts = np.array([0, 10 * US_MIN, 20 * US_MIN, 5 * US_MIN], np.int64) + T0
    ent = np.array([0, 0, 0, 1], np.int64)
    keys = SearchKeys(2, T0 - 25 * US_H, T0 + US_H, "test")  # lowest: below every window start
    buf_key = keys.of(ent, ts)
    columns = ValueColumns(np.array([[1.0], [2.0], [4.0], [8.0]]))
    q_ent = np.array([1, 0, 0, 0], np.int64)
    q_ts = np.array([5, 20, 0, 10], np.int64) * US_MIN + T0
    got = aggregates_at(COMPILED["spend"], buf_key, columns, keys, q_ent, q_ts)
    assert got["rows_1h"].tolist() == [1, 3, 1, 2]
    assert got["sum_1h"].tolist() == [8.0, 7.0, 1.0, 3.0]
    assert got["max_1h"].tolist() == [8.0, 4.0, 1.0, 2.0]
    assert got["mean_1h"].tolist() == [8.0, 7 / 3, 1.0, 1.5]
    empty = aggregates_at(COMPILED["spend"], buf_key, columns, keys, q_ent[:0], q_ts[:0])
    assert all(len(v) == 0 for v in empty.values()) and set(empty) == set(FEATURES)


def test_times_too_far_apart_for_one_batch_are_refused_with_the_range():
    with pytest.raises(ValueError, match=r"spend: event times span too wide.*1970-01-01.*2255-"):
        SearchKeys(1_000, 0, 2**53, "spend")  # 285 years x 1000 entities: > 62 bits
