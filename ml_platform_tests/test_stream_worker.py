"""The stream worker end to end on the real Redis (127.0.0.1:6379) with a tiny trained platform:
exactly one prediction per event with the champion's version, features equal to the offline
point-in-time join, crash recovery by XAUTOCLAIM, replays, bad events, two workers, hot reload."""

from __future__ import annotations

import json
import math
import random
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from ml_platform import features as fr
from ml_platform.featurestore.streaming import StreamingUpdater
from ml_platform.registry import CHAMPION
from ml_platform.serving.champion import ChampionWatcher, load_version
from ml_platform.serving.stream import (
    StreamConfig,
    StreamWorker,
    event_payloads,
    parse_event,
    publish_events,
    publish_payloads,
    read_predictions,
    seed_from_raw,
)
from ml_platform.serving.stream.emit import pack_fields, utc_iso_column
from ml_platform.sources.generator import GeneratorConfig, generate_day, write_partition

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

try:
    from fixtures_platform import SMALL_CONFIG, tiny_platform
except ImportError:  # imported as a package
    from ml_platform_tests.fixtures_platform import SMALL_CONFIG, tiny_platform  # noqa: F401

TOL = 1e-9


class FixedModel:
    """A model source that always serves one model (the worker's `model_source` interface)."""

    def __init__(self, model):
        self.model = model

    def current(self):
        return self.model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def today_events(tiny_platform):
    """The transactions of the day after the platform's history: what the stream receives."""
    cfg = dict(SMALL_CONFIG)
    days = cfg.pop("days")
    start = tiny_platform.events[fr.EVENT_TS].min().date()
    config = GeneratorConfig(start=start, days=days, **cfg)
    return config, generate_day(config, start + timedelta(days=days))


@pytest.fixture(scope="module")
def champion(tiny_platform):
    version = tiny_platform.registry.champion().version
    return load_version(tiny_platform.registry, version)


@pytest.fixture()
def make_worker(tiny_platform, champion):
    """Workers sharing the platform's online store, each test with its own stream state, streams
    and dedup keys (`namespace` gives a worker a separate set); the state is seeded from the raw
    history unless seed=False."""
    platform = tiny_platform
    base = f"{platform.project}-{uuid.uuid4().hex[:6]}"
    seeded: set[str] = set()

    def make(
        consumer: str = "w1", model_source=None, seed: bool = True, namespace: str = "a", **config
    ) -> StreamWorker:
        project = f"{base}{namespace}"
        updater = StreamingUpdater(platform.redis, project, fr.FEATURE_VIEWS)
        if seed and project not in seeded:
            seed_from_raw(updater, platform.settings.raw_dir)
            seeded.add(project)
        defaults = {"consumer": consumer, "block_ms": 50, "claim_idle_ms": 60_000, "include_features": True}
        worker = StreamWorker(
            platform.redis,
            platform.online,
            updater,
            model_source or FixedModel(champion),
            project,
            StreamConfig(**{**defaults, **config}),
        )
        worker.ensure_group()
        worker.ensure_online_views()
        return worker

    yield make
    keys = list(platform.redis.scan_iter(match=f"{base}*", count=1000))
    for i in range(0, len(keys), 500):
        platform.redis.unlink(*keys[i : i + 500])


def _offline_lookup(platform, events: pd.DataFrame, refs: list[str]) -> pd.DataFrame:
    """The training set's view of these events: the offline point-in-time join at t - 1 µs."""
    entity_df = events[["transaction_id", "user_id", "merchant_id"]].copy()
    entity_df[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    return platform.store.get_historical_features(entity_df, refs)


def test_end_to_end_one_prediction_per_event_with_offline_features(
    tiny_platform, today_events, make_worker, champion
):
    platform = tiny_platform
    _config, events = today_events
    worker = make_worker()
    publish_events(platform.redis, worker.names.input, events)
    stats = worker.run(until_idle=True)
    predictions = read_predictions(platform.redis, worker.names.output)
    assert stats.entries == len(events) and stats.dead_letters == 0
    assert sorted(p["event_id"] for p in predictions) == sorted(events["transaction_id"])
    assert {p["model_version"] for p in predictions} == {platform.registry.champion().version}
    for p in predictions:
        assert p["decision"] == ("fraud" if p["probability"] >= p["threshold"] else "legit")
    assert platform.redis.xpending(worker.names.input, worker.config.group)["pending"] == 0

    # Every looked-up feature equals the offline point-in-time join over history + today's events
    # (the same rows the stream folded), i.e. what the training set would have seen.
    write_partition([events], platform.settings.raw_dir, events[fr.EVENT_TS].min().date())
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            platform.store.materialize_offline(view.name)
    refs = list(champion.contract.feature_refs)
    offline = _offline_lookup(platform, events, refs).set_index("transaction_id")
    compared = 0
    for p in predictions:
        want = offline.loc[p["event_id"]]
        for ref in refs:
            name = ref.split(":")[1]
            got, expected = p["features"][name], want[name]
            if pd.isna(expected):
                assert got is None, (p["event_id"], name, got)
            elif isinstance(expected, str):
                assert got == expected, (p["event_id"], name, got, expected)
            else:
                assert math.isclose(got, float(expected), rel_tol=TOL, abs_tol=TOL), (
                    p["event_id"],
                    name,
                    got,
                    expected,
                )
            compared += 1
    assert compared >= len(events) * 20

    # The HTTP API's view: the online store holds each entity's values after its newest event.
    last = events.sort_values(fr.EVENT_TS).groupby("user_id").tail(1).head(20)
    online = platform.online.read(
        fr.user_transaction_stats.feature_refs(),
        [{"user_id": int(u)} for u in last["user_id"]],
        include_event_timestamps=True,
        now=datetime.now(UTC) + timedelta(days=2),
    )
    table = pd.read_parquet(platform.store.offline_table_path("user_transaction_stats"))
    for i, row in enumerate(last.itertuples()):
        expected = table[
            (table["user_id"] == row.user_id) & (table[fr.EVENT_TS] == row.event_timestamp)
        ].iloc[0]
        assert online["user_transaction_stats__event_timestamp"][i] == row.event_timestamp.to_pydatetime()
        for name in fr.user_transaction_stats.feature_names:
            assert math.isclose(online[name][i], float(expected[name]), rel_tol=TOL, abs_tol=TOL)


def _txn(event_id, user_id, ts, amount, merchant_id=1):
    return {
        "transaction_id": event_id,
        "user_id": user_id,
        "merchant_id": merchant_id,
        "amount": amount,
        "merchant_category": "grocery",
        "country": "DE",
        "device": "ios",
        "channel": "pos",
        fr.EVENT_TS: ts.isoformat(),
    }


def test_events_of_one_entity_in_one_batch_see_each_other_in_event_time_order(tiny_platform, make_worker):
    worker = make_worker(seed=False)
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    new_user = 10_000_001  # no history
    events = [
        _txn("s3", new_user, t0 + timedelta(minutes=20), 30.0),  # arrives first, happened last
        _txn("s1", new_user, t0, 10.0),
        _txn("s2", new_user, t0 + timedelta(minutes=10), 20.0, merchant_id=2),
    ]
    publish_payloads(tiny_platform.redis, worker.names.input, [json.dumps(e) for e in events])
    worker.run(until_idle=True)
    assert worker.stats.batches == 1
    got = {p["event_id"]: p["features"] for p in read_predictions(tiny_platform.redis, worker.names.output)}
    assert got["s1"]["txn_count_1h"] is None and got["s1"]["amount_sum_24h"] is None  # nothing before it
    assert got["s2"]["txn_count_1h"] == 1 and got["s2"]["amount_sum_1h"] == pytest.approx(10.0)
    assert got["s3"]["txn_count_1h"] == 2 and got["s3"]["amount_max_1h"] == pytest.approx(20.0)
    assert got["s3"]["amount_mean_30d"] == pytest.approx(15.0)
    assert got["s2"]["user_merchant_txn_count_30d"] is None  # first time at merchant 2
    assert got["s3"]["user_merchant_txn_count_30d"] == 1  # s1 at merchant 1


def test_crashed_workers_pending_events_are_claimed_and_processed_once(
    tiny_platform, today_events, make_worker
):
    platform = tiny_platform
    events = today_events[1].head(60)
    worker_b = make_worker("B", claim_idle_ms=200, batch_size=25)
    publish_events(platform.redis, worker_b.names.input, events)
    # Worker A reads a batch and dies before acknowledging it.
    taken = platform.redis.xreadgroup(worker_b.config.group, "A", {worker_b.names.input: ">"}, count=25)
    assert len(taken[0][1]) == 25
    time.sleep(0.3)
    worker_b.run(until_idle=True)
    predictions = read_predictions(platform.redis, worker_b.names.output)
    ids = [p["event_id"] for p in predictions]
    assert len(ids) == len(set(ids)) == 60 and set(ids) == set(events["transaction_id"])
    assert worker_b.stats.claimed >= 25 and {p["consumer"] for p in predictions} == {"B"}
    assert platform.redis.xpending(worker_b.names.input, worker_b.config.group)["pending"] == 0
    # A was only slow: it comes back and emits its (stale) decision for an event B already
    # decided. The emit is conditional on the event's decision key: no second output.
    worker_a = make_worker("A")
    entry_id, fields = taken[0][1][0]
    event_id = json.loads(fields[b"event"])["transaction_id"]
    done_key = f"{worker_a.names.done_prefix}{event_id}"
    worker_a._finish(
        [(entry_id, done_key, event_id, json.dumps({"event_id": event_id, "late": True}), "v0 0.5 fraud")],
        [],
        [],
        [],
    )
    assert worker_a.stats.duplicates == 1 and worker_a.stats.predictions == 0
    assert len(read_predictions(platform.redis, worker_b.names.output)) == 60


def test_replays_give_no_second_decision_and_no_double_count(tiny_platform, today_events, make_worker):
    platform = tiny_platform
    events = today_events[1].head(80)
    worker = make_worker()
    publish_events(platform.redis, worker.names.input, events)
    worker.run(until_idle=True)
    first = {p["event_id"]: p for p in read_predictions(platform.redis, worker.names.output)}
    user = int(events["user_id"].iloc[-1])
    before = platform.online.read(fr.user_transaction_stats.feature_refs(), [{"user_id": user}], now=0.0)
    # The same events published again (a producer retry): no second decision, no double count.
    publish_events(platform.redis, worker.names.input, events)
    worker.run(until_idle=True)
    assert len(read_predictions(platform.redis, worker.names.output)) == 80
    assert worker.stats.duplicates == 80
    assert (
        platform.online.read(fr.user_transaction_stats.feature_refs(), [{"user_id": user}], now=0.0) == before
    )

    # A worker that folded these events and died before emitting: on the retry its features are
    # exactly those of a worker that saw each event once.
    crashed = make_worker("crashed", namespace="b")
    crashed.updater.fold([parse_event(p) for p in event_payloads(events)], crashed.transaction_views)
    publish_events(platform.redis, crashed.names.input, events)
    crashed.run(until_idle=True)
    again = {p["event_id"]: p for p in read_predictions(platform.redis, crashed.names.output)}
    assert again.keys() == first.keys()
    for event_id, p in first.items():
        assert again[event_id]["features"] == p["features"]
        assert again[event_id]["probability"] == p["probability"]


def test_malformed_events_go_to_the_dead_letter_stream_and_the_worker_keeps_going(tiny_platform, make_worker):
    platform = tiny_platform
    worker = make_worker(seed=False)
    t = datetime(2030, 2, 1, tzinfo=UTC)
    good = [_txn(f"ok{i}", 10_000_100 + i, t, 5.0) for i in range(3)]
    no_amount = _txn("bad1", 1, t, 1.0)
    del no_amount["amount"]
    payloads = [
        json.dumps(good[0]),
        json.dumps(no_amount),
        json.dumps(_txn("bad2", 1, t, "12,50")),
        json.dumps(_txn("bad3", 1, t, -4.0)),
        json.dumps({**_txn("bad4", 1, t, 1.0), fr.EVENT_TS: "yesterday noon"}),
        "{not json",
        json.dumps(good[1]),
        json.dumps({**_txn("bad5", 1, t, 1.0), "user_id": "seven"}),
        json.dumps(good[2]),
    ]
    publish_payloads(platform.redis, worker.names.input, payloads)
    platform.redis.xadd(worker.names.input, {"something": "else"})  # no event field at all
    worker.run(until_idle=True)
    dead = platform.redis.xrange(worker.names.dead_letter)
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert len(dead) == 7 and worker.stats.dead_letters == 7
    assert "field 'amount' is missing" in reasons[0]
    assert "'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got '12,50'" in reasons[1]
    assert "'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got -4.0" in reasons[2]
    assert "'event_timestamp' must be an ISO-8601 timestamp" in reasons[3] and "'yesterday noon'" in reasons[3]
    assert reasons[4].startswith("payload is not valid JSON")
    assert "'user_id' must be an integer in [1, 9223372036854775807], got 'seven'" in reasons[5]
    assert "no 'event' field" in reasons[6]
    assert dead[4][1][b"payload"] == b"{not json"  # the raw payload is kept for a re-publish
    assert sorted(p["event_id"] for p in read_predictions(platform.redis, worker.names.output)) == [
        "ok0",
        "ok1",
        "ok2",
    ]
    assert platform.redis.xpending(worker.names.input, worker.config.group)["pending"] == 0


def test_two_workers_in_one_group_process_disjoint_events_covering_all(
    tiny_platform, today_events, make_worker
):
    platform = tiny_platform
    events = today_events[1]
    workers = [make_worker("w1", batch_size=10), make_worker("w2", batch_size=10)]
    publish_events(platform.redis, workers[0].names.input, events)
    start = threading.Barrier(2)

    def run(w):
        start.wait()
        w.run(until_idle=True)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    predictions = read_predictions(platform.redis, workers[0].names.output)
    by_consumer = {"w1": set(), "w2": set()}
    for p in predictions:
        by_consumer[p["consumer"]].add(p["event_id"])
    assert len(predictions) == len(events)
    assert by_consumer["w1"].isdisjoint(by_consumer["w2"])
    assert by_consumer["w1"] | by_consumer["w2"] == set(events["transaction_id"])
    assert workers[0].stats.entries + workers[1].stats.entries == len(events)
    assert workers[0].stats.entries > 0 and workers[1].stats.entries > 0


def test_label_events_update_the_merchant_fraud_rate_online(tiny_platform, make_worker):
    platform = tiny_platform
    worker = make_worker(seed=False)
    merchant = 10_000_500
    t = datetime(2030, 3, 1, tzinfo=UTC)
    labels = [
        {
            "kind": "label",
            "transaction_id": f"l{i}",
            "merchant_id": merchant,
            "is_fraud": y,
            fr.LABEL_TS: (t + timedelta(hours=i)).isoformat(),
        }
        for i, y in enumerate([1, 0, 1])
    ]
    publish_payloads(platform.redis, worker.names.input, [json.dumps(x) for x in labels])
    worker.run(until_idle=True)
    assert worker.stats.labels == 3 and read_predictions(platform.redis, worker.names.output) == []
    got = platform.online.read(fr.merchant_fraud_stats.feature_refs(), [{"merchant_id": merchant}], now=t)
    assert got["merchant_label_count_30d"] == [3]
    assert got["merchant_fraud_rate_30d"][0] == pytest.approx(2 / 3, abs=TOL)


def test_the_worker_follows_the_champion_alias(tiny_platform, today_events, make_worker):
    platform = tiny_platform
    registry = platform.registry
    current = registry.champion().version
    previous = min(v for v in platform.versions if v != current)
    watcher = ChampionWatcher(registry, poll_s=0.2).start()
    try:
        worker = make_worker(model_source=watcher)
        events = today_events[1]
        publish_events(platform.redis, worker.names.input, events.head(10))
        worker.run(until_idle=True)
        registry.set_alias(CHAMPION, previous, who="test", why="hot reload test")
        deadline = time.monotonic() + 30
        while watcher.current().version != previous and time.monotonic() < deadline:
            time.sleep(0.1)
        publish_events(platform.redis, worker.names.input, events.iloc[10:20])
        worker.run(until_idle=True)
    finally:
        registry.set_alias(CHAMPION, current, who="test", why="restore after hot reload test")
        watcher.stop()
    versions = [p["model_version"] for p in read_predictions(platform.redis, worker.names.output)]
    assert versions == [current] * 10 + [previous] * 10


def test_batch_helpers_match_the_standard_library_exactly():
    """The emit's batch shortcuts give what the per-event standard-library calls give: the output
    times (`datetime.isoformat`) and the emit script's u32-length-prefixed blob. (The payload
    decoding is compared with `json.loads` in test_stream_events.py.)"""
    rng = random.Random(0)
    lo, hi = -62_135_596_800_000_000, 253_402_300_799_999_999  # year 1 .. 9999, in µs
    stamps = [rng.randrange(lo, hi) for _ in range(2000)] + [lo, hi, -1, 0, 1, 1_700_000_000_000_000]
    stamps += [s - s % 1_000_000 for s in stamps[:200]]  # whole seconds: no fraction in isoformat
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    want = [(epoch + timedelta(microseconds=s)).isoformat() for s in stamps]
    got = [t + "+00:00" for t in utc_iso_column(np.array(stamps, dtype=np.int64))]
    assert got == want

    items = [(b"1-0", "key:é", "x" * 70_000), (b"", 7, "")]
    fields = [b"1-0", "key:é".encode(), b"x" * 70_000, b"", b"7", b""]
    assert pack_fields(items) == b"".join(len(f).to_bytes(4, "little") + f for f in fields)
    assert pack_fields([]) == b""


class _PoisonedPath:
    """The champion's scoring path, except that a batch holding the amount 666.0 raises."""

    def __init__(self, path):
        self.path = path

    def __getattr__(self, name):
        return getattr(self.path, name)

    def score_columns(self, request, looked_up):
        if (request["amount"] == 666.0).any():
            raise RuntimeError("poisoned amount")
        return self.path.score_columns(request, looked_up)


def test_a_failing_event_in_the_pipelined_loop_is_isolated_and_nothing_is_lost(
    tiny_platform, champion, make_worker
):
    """Small batches, so the fold of the next batch is in flight when the poisoned one fails:
    only the poisoned event is dead-lettered; every other event gets exactly one prediction."""
    platform = tiny_platform
    worker = make_worker(seed=False, batch_size=4, model_source=FixedModel(_PoisonedPath(champion)))
    assert worker.config.pipeline
    t = datetime(2030, 3, 1, tzinfo=UTC)
    events = [_txn(f"p{i}", 20_000_000 + i % 7, t + timedelta(seconds=i), 10.0 + i) for i in range(30)]
    events[13]["amount"] = 666.0
    publish_payloads(platform.redis, worker.names.input, [json.dumps(e) for e in events])
    worker.run(until_idle=True)
    dead = platform.redis.xrange(worker.names.dead_letter)
    assert [json.loads(f[b"payload"])["transaction_id"] for _, f in dead] == ["p13"]
    assert "processing failed: RuntimeError: poisoned amount" in dead[0][1][b"reason"].decode()
    predicted = [p["event_id"] for p in read_predictions(platform.redis, worker.names.output)]
    assert sorted(predicted) == sorted(e["transaction_id"] for i, e in enumerate(events) if i != 13)
    assert platform.redis.xpending(worker.names.input, worker.config.group)["pending"] == 0
    # The user-level counts saw every event once, the poisoned one too (it was folded, not scored).
    assert worker.stats.predictions == 29 and worker.stats.dead_letters == 1
    worker.close()


def test_the_champion_watcher_keeps_the_old_model_when_a_load_fails(tiny_platform):
    """A version that fails to load never replaces the serving one; the error names it, and it
    is tried again only after `retry_after_s`."""
    registry = tiny_platform.registry
    current = registry.champion().version
    previous = min(v for v in tiny_platform.versions if v != current)
    attempts: list[int] = []
    broken = {previous}

    def loader(_registry, version):
        attempts.append(version)
        if version in broken:
            raise OSError(f"artifact of v{version} unreadable")
        return ("model", version)

    changes = []
    watcher = ChampionWatcher(registry, loader=loader, retry_after_s=3600, on_change=changes.append)
    first = watcher.check_now()
    assert (first.from_version, first.to_version) == (None, current) and changes == [first]
    assert watcher.current() == ("model", current) and watcher.check_now() is None  # no move, no load
    try:
        registry.set_alias(CHAMPION, previous, who="test", why="failed-load test")
        assert watcher.check_now() is None
        assert watcher.current() == ("model", current) and watcher.version == current
        assert f"v{previous}" in watcher.last_error and "artifact of" in watcher.last_error
        assert watcher.check_now() is None and attempts == [current, previous]  # not retried yet
        watcher.retry_after_s = 0.0
        broken.clear()
        change = watcher.check_now()
        assert (change.from_version, change.to_version) == (current, previous)
        assert watcher.current() == ("model", previous) and watcher.last_error is None
    finally:
        registry.set_alias(CHAMPION, current, who="test", why="restore after failed-load test")


def test_an_event_loop_can_drive_the_champion_watcher(tiny_platform):
    import asyncio

    registry = tiny_platform.registry
    current = registry.champion().version
    previous = min(v for v in tiny_platform.versions if v != current)
    watcher = ChampionWatcher(registry, poll_s=0.05, loader=lambda _r, v: v)

    async def scenario() -> list[int]:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.watch(stop))
        seen = []
        try:
            for target in (current, previous):
                await asyncio.to_thread(
                    registry.set_alias, CHAMPION, target, who="test", why="async watch test"
                )
                for _ in range(200):
                    if watcher.current() == target:
                        break
                    await asyncio.sleep(0.05)
                seen.append(watcher.current())
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
        return seen

    try:
        assert asyncio.run(scenario()) == [current, previous]
    finally:
        registry.set_alias(CHAMPION, current, who="test", why="restore after async watch test")


def test_an_experiment_routes_stream_events_by_arm_with_each_arms_own_features(
    tiny_platform, today_events, make_worker, tmp_path
):
    """The stream worker routes by the same experiment as the API (the router reads the shared
    posteriors in Redis): each arm's events are scored by its version with exactly the features a
    worker serving that version alone computes; the decision is recorded for late feedback and
    the prediction log says which arm served."""
    from ml_platform.experiments.config import ExperimentConfig
    from ml_platform.experiments.router import ExperimentRouter
    from ml_platform.experiments.store import ExperimentStore
    from ml_platform.serving.prediction_log_drain import drain_stream_predictions
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    platform = tiny_platform
    _config, events = today_events
    events = events.head(300)
    store = ExperimentStore(platform.redis, f"{platform.project}:xs-{uuid.uuid4().hex[:6]}")  # cleaned with the project
    store.start(ExperimentConfig(name="stream-ab", arms={"v1": 1, "v2": 2}), who="test")
    try:
        router = ExperimentRouter(store, load=lambda v: load_version(platform.registry, v), seed=3)
        router.refresh()
        routed = make_worker(namespace="x")
        routed.router = router
        publish_events(platform.redis, routed.names.input, events)
        routed.run(until_idle=True)
        got = {p["event_id"]: p for p in read_predictions(platform.redis, routed.names.output)}
        assert len(got) == len(events)
        assert {p["arm"] for p in got.values()} == {"v1", "v2"}
        alone = {}
        for version, namespace in ((1, "y"), (2, "z")):
            worker = make_worker(namespace=namespace, model_source=FixedModel(load_version(platform.registry, version)))
            publish_events(platform.redis, worker.names.input, events)
            worker.run(until_idle=True)
            alone[version] = {p["event_id"]: p for p in read_predictions(platform.redis, worker.names.output)}
        for event_id, p in got.items():
            assert p["experiment"] == "stream-ab" and p["role"] == "live" and p["model_version"] == int(p["arm"][1:])
            assert 0 < p["selection_probability"] <= 1
            twin = alone[p["model_version"]][event_id]
            assert p["probability"] == pytest.approx(twin["probability"], abs=TOL)
            assert p["features"] == twin["features"]
        some = next(iter(got.values()))
        assert store.feedback_sync([(f"stream-{some['event_id']}", 1.0)]) == [("accepted", some["arm"])]
        stats = store.stats("stream-ab")
        assert stats["v1"].served + stats["v2"].served == len(events)
        drain_stream_predictions(platform.redis, routed.names.output, tmp_path / "log")
        log = read_prediction_log(tmp_path / "log", sources=["stream"], with_features=False)
        assert len(log) == len(events) and set(log["experiment"]) == {"stream-ab"}
        assert (log["arm"] == "v" + log["model_version"].astype(str)).all()
    finally:
        store.delete("stream-ab")
