"""The incremental updater against hand-computed windows and against the offline SQL (parity),
on the real Redis at 127.0.0.1:6379 under a unique key prefix."""

from __future__ import annotations

import datetime as dt
import math
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_platform import features as fr
from ml_platform.featurestore import Aggregation, Entity, FeatureStore, FeatureView, FileSource
from ml_platform.featurestore.streaming import EVENT_ID, StreamingUpdater, compile_views, events_from_frame
from ml_platform.sources.generator import (
    TRANSACTION_COLUMNS,
    TRANSACTIONS_ARROW_SCHEMA,
    GeneratorConfig,
    write_dataset,
)
from ml_platform.timestamps import from_us, to_us

H, D = dt.timedelta(hours=1), dt.timedelta(days=1)
TOL = 1e-9


def T(text: str) -> int:
    return to_us(pd.Timestamp(text, tz="UTC"))


@pytest.fixture()
def project(client):
    name = f"test_stream_{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(client.scan_iter(match=f"{name}:*", count=1000))
    if keys:
        client.unlink(*keys)


user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
events_source = FileSource("events", timestamp_field="ts")


def spend_view() -> FeatureView:
    aggs = [Aggregation("count", H, name="rows_1h"), Aggregation("count", H, "amount", name="amounts_1h")]
    for label, window in (("1h", H), ("24h", D)):
        aggs += [
            Aggregation("sum", window, "amount", name=f"sum_{label}"),
            Aggregation("mean", window, "amount", name=f"mean_{label}"),
            Aggregation("min", window, "amount", name=f"min_{label}"),
            Aggregation("max", window, "amount", name=f"max_{label}"),
        ]
    return FeatureView("spend", entities=[user], source=events_source, aggregations=aggs, ttl=2 * D)


pair_view = FeatureView(
    "pair",
    entities=[user, merchant],
    source=events_source,
    aggregations=[Aggregation("count", D, name="pair_count_24h")],
    ttl=2 * D,
)


def ev(event_id, user_id, ts, amount, merchant_id=7):
    return {EVENT_ID: event_id, "user_id": user_id, "merchant_id": merchant_id, "ts": ts, "amount": amount}


# user 1: 00:00 10, 00:30 20 and 00:30 NULL amount (same time: peers), 01:00 30 (00:00 exactly 1h
# back: inside), next day 00:30 40 (00:30 the day before exactly 24h back: inside; 00:00 not);
# user 2: one event. Two batches; the second is folded by a second updater (another worker).
BATCH_1 = [
    ev("a", 1, T("2024-01-01 00:00"), 10.0),
    ev("b", 1, T("2024-01-01 00:30"), 20.0),
    ev("c", 1, T("2024-01-01 00:30"), None, merchant_id=8),
    ev("z", 2, T("2024-01-01 00:45"), 100.0),
]
BATCH_2 = [ev("d", 1, T("2024-01-01 01:00"), 30.0), ev("e", 1, T("2024-01-02 00:30"), 40.0)]

# (event id) -> at-event values: rows_1h, amounts_1h, sum/mean/min/max 1h, sum/mean/min/max 24h
AT_EVENT = {
    "a": (1, 1, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0),
    "b": (3, 2, 30.0, 15.0, 10.0, 20.0, 30.0, 15.0, 10.0, 20.0),
    "c": (3, 2, 30.0, 15.0, 10.0, 20.0, 30.0, 15.0, 10.0, 20.0),
    "z": (1, 1, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0),
    "d": (4, 3, 60.0, 20.0, 10.0, 30.0, 60.0, 20.0, 10.0, 30.0),
    "e": (1, 1, 40.0, 40.0, 40.0, 40.0, 90.0, 30.0, 20.0, 40.0),
}
# Looked up before each event (at t - 1 µs): the values at the entity's previous time, or null.
BEFORE = {
    "a": None,
    "b": AT_EVENT["a"],
    "c": AT_EVENT["a"],
    "z": None,
    "d": AT_EVENT["b"],
    "e": AT_EVENT["d"],
}
FEATURES = [
    "rows_1h",
    "amounts_1h",
    "sum_1h",
    "mean_1h",
    "min_1h",
    "max_1h",
    "sum_24h",
    "mean_24h",
    "min_24h",
    "max_24h",
]


def _row(result_part, view, i):
    return tuple(result_part[view][f][i] for f in FEATURES)


def _assert_values(got, expected, what):
    if expected is None:
        assert all(math.isnan(v) for v in got), f"{what}: expected nulls, got {got}"
        return
    assert np.allclose(got, expected, rtol=0, atol=TOL), f"{what}: {got} != {expected}"


def test_pair_view_shares_the_card_holders_buffer():
    compiled, groups = compile_views(fr.FEATURE_VIEWS)
    assert set(groups) == {"user_transaction_stats", "merchant_transaction_stats", "merchant_fraud_stats"}
    assert compiled["user_merchant_stats"].group == "user_transaction_stats"
    assert groups["user_transaction_stats"].extra_keys == ("merchant_id",)
    assert groups["merchant_fraud_stats"].timestamp_field == fr.LABEL_TS
    assert "user_profile" not in compiled  # no aggregations: nothing to update incrementally


def test_hand_computed_windows_ties_nulls_and_a_second_worker(client, project):
    views = [spend_view(), pair_view]
    first = StreamingUpdater(client, project, views)
    r1 = first.fold(BATCH_1, with_event_values=True)
    second = StreamingUpdater(client, project, views)  # another worker: no cache, same Redis state
    r2 = second.fold(BATCH_2, with_event_values=True)
    for batch, result in ((BATCH_1, r1), (BATCH_2, r2)):
        for i, e in enumerate(batch):
            _assert_values(_row(result.at_event, "spend", i), AT_EVENT[e[EVENT_ID]], f"at {e[EVENT_ID]}")
            _assert_values(_row(result.before, "spend", i), BEFORE[e[EVENT_ID]], f"before {e[EVENT_ID]}")
    # c's merchant 8 is a new pair: nothing before it; d (merchant 7) sees a and b (not c).
    assert math.isnan(r1.before["pair"]["pair_count_24h"][2])
    assert r2.before["pair"]["pair_count_24h"][0] == 2 and r2.at_event["pair"]["pair_count_24h"][0] == 3
    assert r2.at_event["pair"]["pair_count_24h"][1] == 3  # e: b (exactly 24h back: inside), d, e
    # latest: one row per touched entity at its newest time -- what the online store gets.
    latest = r2.latest["spend"].to_pylist()
    assert len(latest) == 1 and latest[0]["user_id"] == 1
    assert latest[0]["event_timestamp"] == from_us(T("2024-01-02 00:30"))
    assert latest[0]["rows_1h"] == 1 and latest[0]["sum_24h"] == pytest.approx(90.0, abs=TOL)
    pairs = {(r["user_id"], r["merchant_id"]): r["pair_count_24h"] for r in r1.latest["pair"].to_pylist()}
    assert pairs == {(1, 7): 2, (1, 8): 1, (2, 7): 1}


def test_all_null_window_gives_null_sum_and_zero_count(client, project):
    up = StreamingUpdater(client, project, [spend_view()])
    r = up.fold([ev("n1", 5, T("2024-01-01 00:00"), None)], with_event_values=True)
    assert r.at_event["spend"]["rows_1h"][0] == 1 and r.at_event["spend"]["amounts_1h"][0] == 0
    assert math.isnan(r.at_event["spend"]["sum_1h"][0]) and math.isnan(r.at_event["spend"]["max_24h"][0])
    row = r.latest["spend"].to_pylist()[0]
    assert row["amounts_1h"] == 0 and row["sum_1h"] is None and row["mean_24h"] is None


def test_replays_count_once_and_late_events_are_exact(client, project):
    up = StreamingUpdater(client, project, [spend_view(), pair_view])
    up.fold(BATCH_1 + BATCH_2)
    key = up.buffer_key("spend", {"user_id": 1})
    size = client.strlen(key)
    # Replays: the whole history again, in another order, through a fresh worker: nothing double counts.
    again = StreamingUpdater(client, project, [spend_view(), pair_view])
    r = again.fold(list(reversed(BATCH_1 + BATCH_2)), with_event_values=True)
    by_id = {e[EVENT_ID]: i for i, e in enumerate(reversed(BATCH_1 + BATCH_2))}
    for event_id, expected in AT_EVENT.items():
        _assert_values(_row(r.at_event, "spend", by_id[event_id]), expected, f"replayed {event_id}")
        _assert_values(
            _row(r.before, "spend", by_id[event_id]), BEFORE[event_id], f"replayed before {event_id}"
        )
    assert client.strlen(key) > size  # the replayed records were appended ...
    assert r.latest["spend"].to_pylist()[0]["sum_24h"] == pytest.approx(90.0, abs=TOL)  # ... and ignored
    # A late event (00:50, after 01:00 was folded) sees exactly the rows before it.
    late = again.fold([ev("late", 1, T("2024-01-01 00:50"), 5.0)], with_event_values=True)
    _assert_values(_row(late.before, "spend", 0), AT_EVENT["b"], "late before")
    _assert_values(
        _row(late.at_event, "spend", 0), (4, 3, 35.0, 35 / 3, 5.0, 20.0, 35.0, 35 / 3, 5.0, 20.0), "late at"
    )
    # The online value stays at the newest time (01-02 00:30), now counting the late row in its 24h.
    row = late.latest["spend"].to_pylist()[0]
    assert row["event_timestamp"] == from_us(T("2024-01-02 00:30"))
    assert row["sum_24h"] == pytest.approx(95.0, abs=TOL) and row["rows_1h"] == 1
    # 01-02 00:40: 24h back is 01-01 00:40, so late, d, e and itself; b is out.
    nxt = again.fold([ev("f", 1, T("2024-01-02 00:40"), 1.0)], with_event_values=True)
    assert nxt.at_event["spend"]["rows_1h"][0] == 2 and nxt.at_event["spend"]["sum_24h"][0] == pytest.approx(
        76.0
    )


def test_ttl_nulls_stale_lookups_and_old_rows_are_trimmed(client, project):
    up = StreamingUpdater(client, project, [spend_view()], trim_slack=H)
    up.fold([ev(f"o{i}", 3, T("2024-01-01 00:00") + i * 60_000_000, 1.0) for i in range(5)])
    key = up.buffer_key("spend", {"user_id": 3})
    assert client.strlen(key) == 8 + 5 * 24  # header + 5 records (time, amount, event-id hash)
    # 3 days later: the previous row is older than the view's 2-day TTL -> nothing looked up; the
    # buffer keeps only what the 24h window + 1h slack needs.
    r = up.fold([ev("new", 3, T("2024-01-04 00:00"), 2.0)], with_event_values=True)
    assert not r.found["spend"][0] and math.isnan(r.before["spend"]["rows_1h"][0])
    assert r.at_event["spend"]["rows_1h"][0] == 1
    assert client.strlen(key) == 8 + 24
    # expiry: the 24h window + 1h slack + state_expiry 0, refreshed by this fold
    assert (D + H).total_seconds() * 1000 - 60_000 < client.pttl(key) <= (D + H).total_seconds() * 1000


def _generated_store(tmp_path):
    """A small generated raw dataset (plus copies of some rows at the very same times -- ties --
    and exactly one window later) with offline tables of every aggregated view."""
    config = GeneratorConfig(n_users=200, n_merchants=120, days=8, fraud_rate=0.05, label_maturity_days=1)
    write_dataset(config, tmp_path / "raw")
    generated = pd.read_parquet(tmp_path / "raw" / "transactions").drop(columns=["date"])
    ties = generated.sample(40, random_state=1).copy()
    ties["transaction_id"] = "tie-" + ties["transaction_id"]
    ties["amount"] = ties["amount"] * 3 + 1
    ties["created_timestamp"] = ties["created_timestamp"] + pd.Timedelta(seconds=1)
    # ... and copies exactly one window length later: rows right on a window's lower bound.
    early = generated[
        generated["event_timestamp"] < generated["event_timestamp"].min() + pd.Timedelta(days=1)
    ]
    shifted = []
    for span in ("1h", "24h", "7D"):
        rows = early.sample(15, random_state=len(span)).copy()
        rows["transaction_id"] = f"edge{span}-" + rows["transaction_id"]
        for col in ("event_timestamp", "created_timestamp", "label_timestamp"):
            rows[col] = rows[col] + pd.Timedelta(span)
        shifted.append(rows)
    extra = pd.concat([ties, *shifted], ignore_index=True)
    day = generated["event_timestamp"].min().date()
    pq.write_table(
        pa.Table.from_pandas(
            extra[TRANSACTION_COLUMNS], schema=TRANSACTIONS_ARROW_SCHEMA, preserve_index=False
        ),
        tmp_path / "raw" / "transactions" / f"date={day.isoformat()}" / "part-ties.parquet",
    )
    store = FeatureStore(tmp_path, duckdb_threads=1)
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            store.materialize_offline(view.name)
    raw = pd.read_parquet(tmp_path / "raw" / "transactions")
    return store, raw


def test_parity_with_the_offline_sql_for_every_view(tmp_path, client, project):
    """Feed the same raw events to the offline SQL and to the updater: every feature value per
    (entity, time) is the same float, bit for bit, and so is every looked-up value (the
    point-in-time join at t - 1 µs). Exact because every sum and mean of the platform's views is
    fixed point (`Aggregation.decimals`): both sides add integer cents, not floats in their own order."""
    store, raw = _generated_store(tmp_path)
    views = [v for v in fr.FEATURE_VIEWS if v.aggregations]
    assert all(a.decimals is not None for v in views for a in v.aggregations if a.function in ("sum", "mean"))
    # Same-time events exist in the data (ties are part of the test).
    assert (
        raw.duplicated(["user_id", fr.EVENT_TS]).any() or raw.duplicated(["merchant_id", fr.EVENT_TS]).any()
    )
    workers = [StreamingUpdater(client, project, views), StreamingUpdater(client, project, views)]
    at_event: dict[tuple, dict] = {}
    before_rows = []
    # Transactions in event-time order, labels in label-time order; batches alternate between two
    # workers sharing the state (each with its own cache).
    by_time = raw.sort_values([fr.EVENT_TS, "transaction_id"], kind="stable").reset_index(drop=True)
    labels = raw[raw[fr.LABEL_TS].notna()].sort_values([fr.LABEL_TS, "transaction_id"], kind="stable")
    feeds = [
        (by_time, [v.name for v in views if v.source.timestamp_field == fr.EVENT_TS], 97),
        (labels, ["merchant_fraud_stats"], 61),
    ]
    for frame, names, size in feeds:
        events = events_from_frame(frame, views)
        for b, start in enumerate(range(0, len(events), size)):
            batch = events[start : start + size]
            result = workers[b % 2].fold(batch, names, with_event_values=True)
            for name in names:
                cv = workers[0].compiled[name]
                for i, e in enumerate(batch):
                    key = (name, *(e[k] for k in cv.join_keys), e[cv.timestamp_field])
                    at_event[key] = {f: result.at_event[name][f][i] for f in cv.feature_names}  # last wins
                    if name != "merchant_fraud_stats":
                        before_rows.append(
                            (name, e, {f: result.before[name][f][i] for f in cv.feature_names})
                        )

    compared = 0
    for view in views:
        offline = pd.read_parquet(store.offline_table_path(view.name))
        stamps = (
            offline[fr.EVENT_TS]
            .dt.tz_convert("UTC")
            .dt.tz_localize(None)
            .astype("datetime64[us]")
            .astype("int64")
        )
        for row, ts in zip(offline.to_dict("records"), stamps.tolist()):
            got = at_event[(view.name, *(row[k] for k in view.join_keys), ts)]
            for f in view.feature_names:
                want = row[f]
                if pd.isna(want):
                    assert math.isnan(got[f]), (view.name, row, f)
                else:
                    assert got[f] == want, (view.name, row, f, got[f])
                compared += 1
    assert compared > 20_000, compared

    # Looked-up values: the training set's point-in-time join at feature_lookup_time(t).
    entity_df = pd.DataFrame(
        {
            "user_id": [e["user_id"] for _, e, _ in before_rows],
            "merchant_id": [e["merchant_id"] for _, e, _ in before_rows],
            fr.EVENT_TS: [
                fr.feature_lookup_time(pd.Timestamp(from_us(e[fr.EVENT_TS]))) for _, e, _ in before_rows
            ],
        }
    )
    refs = [r for v in views if v.name != "merchant_fraud_stats" for r in v.feature_refs()]
    pit = store.get_historical_features(entity_df, refs)
    mismatches = []
    for i, (name, e, got) in enumerate(before_rows):
        for f, value in got.items():
            want = pit[f].iloc[i]
            same = math.isnan(value) if pd.isna(want) else value == float(want)
            if not same:
                mismatches.append((name, e[EVENT_ID], f, value, want))
    assert not mismatches, mismatches[:5]


def _brute_force(rows, t, window_us):
    """spend_view's aggregates at t over `rows` (time, amount) with time in [t - window, t]."""
    inside = [a for ts, a in rows if t - window_us <= ts <= t]
    amounts = [a for a in inside if a is not None]
    if not amounts:
        return len(inside), 0, math.nan, math.nan, math.nan, math.nan
    return len(inside), len(amounts), sum(amounts), sum(amounts) / len(amounts), min(amounts), max(amounts)


def test_trimmed_buffers_stay_exact_in_every_workers_cache(client, project):
    """Days of events for a few card holders, folded in small batches alternating between two
    workers (each with its own cache), with a 1 h trim slack so buffers are trimmed every few
    batches, by either worker: every looked-up and at-event value equals a brute-force
    computation over all the events, and the buffers stay small."""
    rng = np.random.default_rng(7)
    workers = [StreamingUpdater(client, project, [spend_view()], trim_slack=H) for _ in range(2)]
    start, n = T("2024-03-01 00:00"), 1500
    times = np.sort(start + rng.integers(0, 5 * 86_400_000_000, n))
    events = [
        ev(
            f"t{i}",
            int(rng.integers(1, 4)),
            int(ts),
            None if rng.random() < 0.1 else float(rng.integers(1, 500)),
        )
        for i, ts in enumerate(times)
    ]
    history: dict[int, list] = {}
    position = 0
    batch_no = 0
    while position < n:
        size = int(rng.integers(1, 40))
        batch = events[position : position + size]
        position += size
        got = workers[batch_no % 2].fold(batch, with_event_values=True)
        batch_no += 1
        for i, e in enumerate(batch):
            history.setdefault(e["user_id"], []).append((e["ts"], e["amount"]))
        for i, e in enumerate(batch):
            rows = history[e["user_id"]]
            earlier = [ts for ts, _ in rows if ts < e["ts"]]
            at = [_brute_force(rows, e["ts"], w) for w in (3_600_000_000, 86_400_000_000)]
            expected_at = (at[0][0], at[0][1], *at[0][2:], *at[1][2:])
            assert np.allclose(
                _row(got.at_event, "spend", i), expected_at, rtol=0, atol=TOL, equal_nan=True
            ), f"at event {e[EVENT_ID]}: {_row(got.at_event, 'spend', i)} != {expected_at}"
            if earlier and max(earlier) >= e["ts"] - 1 - 2 * 86_400_000_000:
                prev = max(earlier)
                b = [_brute_force(rows, prev, w) for w in (3_600_000_000, 86_400_000_000)]
                expected_before = (b[0][0], b[0][1], *b[0][2:], *b[1][2:])
            else:
                expected_before = None
            expected_before = expected_before or (math.nan,) * len(FEATURES)
            assert np.allclose(
                _row(got.before, "spend", i), expected_before, rtol=0, atol=TOL, equal_nan=True
            ), f"before {e[EVENT_ID]}: {_row(got.before, 'spend', i)} != {expected_before}"
    # Trimmed: a buffer holds about the last 24h + slack, not 5 days of a card holder's events.
    for user_id in (1, 2, 3):
        records = (client.strlen(workers[0].buffer_key("spend", {"user_id": user_id})) - 8) // 24
        assert records < len(history[user_id]) / 2, (user_id, records, len(history[user_id]))
    # A worker trims its own copy as the script trims the buffer: one whole-buffer read per card
    # holder (the first), then only deltas, trims included.
    alone = StreamingUpdater(client, project + "x", [spend_view()], trim_slack=H)
    try:
        buffers_folded = 0  # (fold, card holder) pairs: one script reply each
        for i in range(0, n, 25):
            alone.fold(events[i : i + 25])
            buffers_folded += len({e["user_id"] for e in events[i : i + 25]})
        assert alone.cache.full_reads == 3
        assert alone.cache.delta_reads == buffers_folded - 3
    finally:
        alone.delete_state()


def test_submitted_folds_and_a_dropped_reply_stay_exact(client, project):
    """The stream worker's overlap: fold N+1 is sent while N is evaluated. A fold whose reply was
    never collected (the worker dropped it after an error) is stale; the next folds still see
    its records, exactly once."""
    up = StreamingUpdater(client, project, [spend_view(), pair_view])
    first = up.submit(BATCH_1)
    first.collect()
    second = up.submit(BATCH_2)  # sent before the first batch is evaluated
    r1 = first.result(with_event_values=True)
    for i, e in enumerate(BATCH_1):
        _assert_values(_row(r1.at_event, "spend", i), AT_EVENT[e[EVENT_ID]], f"at {e[EVENT_ID]}")
    dropped = second  # never collected
    late = up.submit([ev("g", 1, T("2024-01-02 00:50"), 2.0)])
    with pytest.raises(RuntimeError, match="stale"):
        dropped.result()
    got = late.result(with_event_values=True)
    # 24h back from 01-02 00:50 is 01-01 00:50: d (01:00, 30), e (00:30 next day, 40) and g itself.
    assert got.at_event["spend"]["rows_1h"][0] == 2
    assert got.at_event["spend"]["sum_24h"][0] == pytest.approx(72.0, abs=TOL)
    assert got.before["spend"]["sum_24h"][0] == pytest.approx(AT_EVENT["e"][6], abs=TOL)
    up.close()


def test_one_buffer_per_key_whatever_the_key_values_type(client, project):
    """7 and "7" name the same buffer: two events of one batch, keyed both ways, see each other."""
    up = StreamingUpdater(client, project, [spend_view()])
    r = up.fold(
        [ev("a", 7, T("2024-01-01 00:00"), 1.0), ev("b", "7", T("2024-01-01 00:10"), 2.0)],
        with_event_values=True,
    )
    assert r.at_event["spend"]["rows_1h"].tolist() == [1.0, 2.0]
    assert r.before["spend"]["sum_1h"][1] == pytest.approx(1.0)
    assert r.latest["spend"].num_rows == 1
