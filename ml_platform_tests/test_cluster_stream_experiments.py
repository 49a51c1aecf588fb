"""The streaming updater, the stream worker and the experiments store on a local three-master Redis
Cluster (`redis_cluster` / `cluster_client` of conftest.py, one per session), each compared with
the same work on the real single Redis (127.0.0.1:6379, its own key prefix, removed afterwards):

  (a) the fold writes buffers into the online store's hash-tagged buckets (all 16, all masters,
      an entity's buffer in the slot of its online values) and gives exactly the single node's
      looked-up features and online values;
  (b) the stream worker scores a stream end to end on the cluster: every event emitted exactly
      once, even when the split emit loses its connection after the outputs and before the XACK
      (replayed: no second output, no second dead letter), with the single node's outputs;
  (c) the experiments store: rewards and decisions (the single node's outcomes and posteriors,
      duplicates refused, also between two concurrent processes), sticky assignment, label days,
      the router reading posteriors, and the rollout's compare-and-set, all in one slot.

Why this file is over 400 lines: the three parts share the session's cluster, the generated
events, the single-node twin runs and the check that nothing is left on any master; one file
keeps them to one cluster and one generation (the file runs in ~15 s, the cluster start included).
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import uuid
from datetime import date, timedelta
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import redis
import redis.asyncio as aioredis
from fixtures_platform import TEST_REDIS_URL, delete_project_keys

from ml_platform import features as fr
from ml_platform.experiments.config import ExperimentConfig
from ml_platform.experiments.manage import ROLLOUT_PREFIX, RolloutControl, stage_config
from ml_platform.experiments.rollout import ABORTED, Evidence, RolloutPlan, start_rollout
from ml_platform.experiments.router import ExperimentRouter
from ml_platform.experiments.store import ACCEPTED, DUPLICATE, UNKNOWN, ExperimentStore
from ml_platform.featurestore.definitions import ValueType
from ml_platform.featurestore.online import RedisOnlineStore
from ml_platform.featurestore.online.cluster_layout import BUCKETS, bucket_tags
from ml_platform.featurestore.online.entity_keys import entity_bucket, entity_field
from ml_platform.featurestore.redis_cluster import async_cluster_client_from_url, cluster_client_from_url
from ml_platform.featurestore.streaming import StreamingUpdater, events_from_frame
from ml_platform.serving.stream import (
    StreamConfig,
    StreamWorker,
    publish_events,
    publish_payloads,
    read_predictions,
)
from ml_platform.serving.stream.emit import Emitter
from ml_platform.serving.stream.seeding import empty_feature_table
from ml_platform.sources.generator import GeneratorConfig, generate_day, generate_users

TRANSACTION_VIEWS = ["user_transaction_stats", "merchant_transaction_stats", "user_merchant_stats"]
LABEL_VIEWS = ["merchant_fraud_stats"]
START = date(2026, 11, 1)


@pytest.fixture()
def single(client):
    """The real single Redis (conftest's `client`), the twin of every cluster run."""
    return client


@pytest.fixture(scope="module")
def generated():
    """Two days of a 1,500 card holder population: ~2,000 transactions, some labelled."""
    config = GeneratorConfig(start=START, days=2, n_users=1500, n_merchants=120, fraud_rate=0.05,
                             label_maturity_days=1)  # fmt: skip
    frame = pd.concat([generate_day(config, START + timedelta(days=d)) for d in range(2)], ignore_index=True)
    return config, frame, generate_users(config)


def unlink_on_masters(cluster, pattern: str) -> None:
    """UNLINK every key matching `pattern` on every master (one key per command: a node refuses
    a multi-key command across slots)."""
    for port in cluster.ports:
        node = redis.Redis(host="127.0.0.1", port=port)
        pipe = node.pipeline(transaction=False)
        for key in node.scan_iter(match=pattern, count=1000):
            pipe.unlink(key)
        pipe.execute()
        node.close()


def remove_everywhere(cluster, single_client, cluster_project: str, single_project: str) -> None:
    """Delete both projects' keys and check that none is left on the single node or any master."""
    unlink_on_masters(cluster, f"{cluster_project}:*")
    delete_project_keys(single_client, single_project)
    assert cluster.keys_by_master(f"{cluster_project}:*") == {p: [] for p in cluster.ports}
    assert list(single_client.scan_iter(match=f"{single_project}:*")) == []


def normal(values: list) -> list:
    """NaN as a marker, so lists of read values compare equal when NaN sits in the same place."""
    return ["NaN" if isinstance(v, float) and math.isnan(v) else v for v in values]


def projects() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:10]
    return f"tc_{tag}", f"ts_{tag}"  # cluster, single


# --------------------------------------------------------------------------- (a) the fold


def fold_stream(
    client, project: str, frame: pd.DataFrame, midway=None
) -> tuple[dict, dict, list, RedisOnlineStore]:
    """Fold the frame's transactions (event-time order) and labels (label-time order) in batches of
    250 alternating between two updaters (two workers sharing the state, each with its own cache),
    writing each batch's latest values into the online store as the worker does; `midway()` runs
    before the third batch. Returns the looked-up features per view and feature (in fold order)
    and the online store's values of every entity of every aggregated view."""
    updaters = [StreamingUpdater(client, project, fr.FEATURE_VIEWS) for _ in range(2)]
    online = RedisOnlineStore(client, project, views=fr.FEATURE_VIEWS)
    for name in TRANSACTION_VIEWS + LABEL_VIEWS:
        online.write_view(name, empty_feature_table(updaters[0].compiled[name].view))
    events = events_from_frame(frame, [v for v in fr.FEATURE_VIEWS if v.aggregations])
    transactions = sorted(events, key=lambda e: e[fr.EVENT_TS])
    labels = sorted((e for e in events if e[fr.LABEL_TS] is not None), key=lambda e: e[fr.LABEL_TS])
    before: dict[str, list] = {}
    for events_of, views in ((transactions, TRANSACTION_VIEWS), (labels, LABEL_VIEWS)):
        for i in range(0, len(events_of), 250):
            if midway is not None and i == 500 and views is TRANSACTION_VIEWS:
                midway()
            folded = updaters[(i // 250) % 2].fold(events_of[i : i + 250], views)
            for view in views:
                for feature, values in folded.before[view].items():
                    before.setdefault(f"{view}:{feature}", []).append(np.asarray(values, dtype=float))
                online.update_entities(view, folded.latest[view])
    now = pd.Timestamp(max(frame[fr.LABEL_TS].max(), frame[fr.EVENT_TS].max())).to_pydatetime()
    rows = {
        ("user_id",): [{"user_id": int(u)} for u in sorted(frame["user_id"].unique())],
        ("merchant_id",): [{"merchant_id": int(m)} for m in sorted(frame["merchant_id"].unique())],
        ("user_id", "merchant_id"): [
            {"user_id": int(u), "merchant_id": int(m)}
            for u, m in sorted(set(zip(frame["user_id"].tolist(), frame["merchant_id"].tolist())))
        ],
    }
    reads = {}
    for name in TRANSACTION_VIEWS + LABEL_VIEWS:
        view = updaters[0].compiled[name].view
        out = online.read(
            view.feature_refs(), rows[tuple(view.join_keys)], include_event_timestamps=True, now=now
        )
        reads[name] = {column: normal(values) for column, values in out.items()}
    return {k: np.concatenate(v) for k, v in before.items()}, reads, updaters, online


def test_the_fold_on_a_cluster_fills_the_online_buckets_with_the_single_node_values(
    single, cluster_client, redis_cluster, generated
):
    """Bugs this catches: a buffer key routed to another master than its slot's (the per-bucket
    script fails), replies given back to the wrong buffers (the worker cache and so the looked-up
    features differ), buffers outside the online buckets or on one master (the layout checks),
    cluster upserts of the latest values that lose or mix entities (the online reads differ), a
    fold that fails instead of reloading its script on masters that lost it."""
    _config, frame, _users = generated
    cluster_project, single_project = projects()
    try:

        def lose_scripts():  # what a master restart does: the next fold loads them again
            for port in redis_cluster.ports:
                node = redis.Redis(host="127.0.0.1", port=port)
                node.script_flush()
                node.close()

        c_before, c_reads, c_updaters, c_online = fold_stream(
            cluster_client, cluster_project, frame, lose_scripts
        )
        s_before, s_reads, s_updaters, s_online = fold_stream(single, single_project, frame)

        assert sorted(c_before) == sorted(s_before)
        for ref, values in s_before.items():
            np.testing.assert_array_equal(c_before[ref], values, err_msg=ref)
        assert c_reads == s_reads
        # not vacuous: windows saw several events, label rates were computed
        assert max(c_reads["user_transaction_stats"]["txn_count_24h"]) >= 3
        assert (
            max(v for v in c_reads["merchant_transaction_stats"]["merchant_txn_count_24h"] if v is not None)
            >= 10
        )
        assert any(v not in (None, "NaN") for v in c_reads["merchant_fraud_stats"]["merchant_fraud_rate_30d"])
        assert np.nanmax(c_before["user_transaction_stats:txn_count_24h"]) >= 2
        # the other worker's appends reached each cache as deltas, not only as whole buffers
        assert sum(u.cache.delta_reads for u in c_updaters) > 0

        # Layout: buffers in all 16 online buckets, on every master; an entity's buffer in the
        # slot of its online values.
        state = redis_cluster.keys_by_master(f"{cluster_project}:stream:state:*")
        assert all(len(keys) > 50 for keys in state.values()), {p: len(k) for p, k in state.items()}
        tags = {re.search(rb"\{([^}]*)\}", k).group(1) for keys in state.values() for k in keys}
        assert tags == set(bucket_tags(BUCKETS))
        for user in frame["user_id"].unique()[:20].tolist():
            bucket = entity_bucket(entity_field([("user_id", ValueType.Int64)], {"user_id": user}), BUCKETS)
            buffer = c_updaters[0].buffer_key("user_transaction_stats", {"user_id": user})
            assert cluster_client.keyslot(buffer) == c_online.keys.slots[bucket]
            assert cluster_client.exists(buffer) == 1
        assert not any(b"{" in k for k in single.scan_iter(match=f"{single_project}:stream:state:*"))
    finally:
        for updaters, online in ((locals().get("c_updaters"), locals().get("c_online")),
                                 (locals().get("s_updaters"), locals().get("s_online"))):  # fmt: skip
            if updaters:
                updaters[0].delete_state()
                for u in updaters:
                    u.close()
            if online is not None:
                online.delete_project()
                online.close()
        remove_everywhere(redis_cluster, single, cluster_project, single_project)


# --------------------------------------------------------------------------- (b) the stream worker


class StandIn:
    """A deterministic model and its source in one (the worker's model interface): a logistic of
    stream features (card holder, merchant, pair) and online ones (profile, fraud rate)."""

    version = 1
    name = "stand-in"
    contract = SimpleNamespace(
        feature_refs=("user_transaction_stats:txn_count_24h", "user_transaction_stats:amount_mean_7d",
                      "merchant_transaction_stats:merchant_txn_count_24h",
                      "user_merchant_stats:user_merchant_txn_count_30d", "user_profile:account_age_days",
                      "merchant_fraud_stats:merchant_fraud_rate_30d"),
        request_columns=("amount",), decision_threshold=0.5, model_name="stand-in", input_columns=(),
    )  # fmt: skip

    def current(self):
        return self

    def score_columns(self, request, looked_up) -> np.ndarray:
        def num(name):
            return np.nan_to_num(
                np.asarray([np.nan if v is None else v for v in looked_up[name]], dtype=float)
            )

        z = (0.3 * num("txn_count_24h") - 0.01 * num("amount_mean_7d") + 0.05 * num("merchant_txn_count_24h")
             + 0.2 * num("user_merchant_txn_count_30d") - 0.001 * num("account_age_days")
             + 2 * num("merchant_fraud_rate_30d") + 0.004 * request["amount"] - 0.5)  # fmt: skip
        return 1.0 / (1.0 + np.exp(-z))


class AckLostOnce(Emitter):
    """The split emit losing its connection once, after a batch's outputs and dead letters were
    written and before its XACK: the worker's state when it dies there."""

    lost = False

    def _ack(self, ids):
        if not self.lost and ids:
            self.lost = True
            raise redis.ConnectionError("connection lost before the XACK (test)")
        super()._ack(ids)


BAD_PAYLOADS = ["not json", '{"transaction_id": "t-x"}', '{"kind": "label"}']


def score_stream(client, project: str, frame: pd.DataFrame, users: pd.DataFrame, *, lose_ack: bool = False,
                 **config) -> tuple[StreamWorker, list[dict], list]:  # fmt: skip
    """Run one worker over: 3 malformed entries, the frame's transactions, the first 100 of them
    again (a producer publishing twice). Returns the worker, its predictions and dead letters."""
    online = RedisOnlineStore(client, project, views=fr.FEATURE_VIEWS, batch_size=1000)
    profile = users.rename(columns={"updated_at": fr.EVENT_TS})[
        ["user_id", fr.EVENT_TS, "home_country", "account_age_days"]
    ]
    online.write_view("user_profile", profile.to_dict("records"))
    updater = StreamingUpdater(client, project, fr.FEATURE_VIEWS)
    worker = StreamWorker(client, online, updater, StandIn(), project,
                          StreamConfig(consumer="w1", block_ms=20, batch_size=200, claim_idle_ms=60_000, **config))  # fmt: skip
    if lose_ack:
        worker._emit = AckLostOnce(client, worker.names, worker.config, worker.consumer)
    worker.ensure_group()
    worker.ensure_online_views()
    publish_payloads(client, worker.names.input, BAD_PAYLOADS)
    publish_events(client, worker.names.input, frame)
    publish_events(client, worker.names.input, frame.head(100))
    try:
        worker.run(until_idle=True)
    finally:
        worker.close()
        online.close()
    dead = client.xrange(worker.names.dead_letter)
    return worker, read_predictions(client, worker.names.output), dead


def test_the_stream_worker_on_a_cluster_emits_every_event_exactly_once(
    single, cluster_client, redis_cluster, generated
):
    """Bugs this catches: done keys outside the output stream's slot or cross-slot reads of them
    (the emit or the dedup fails), lost outputs (events without a prediction), a replay emitted
    again (an event twice: the producer's duplicates and the batch replayed after the lost XACK),
    a dead letter written again on that replay (the guard: 6 dead letters instead of 3), entries
    left unacknowledged, cluster features or scores that differ from the single node's, a one-slot
    stream layout that does not run the single atomic script."""
    _config, frame, users = generated
    day = frame[frame[fr.EVENT_TS] >= pd.Timestamp(START + timedelta(days=1), tz="UTC")].reset_index(
        drop=True
    )
    cluster_project, single_project = projects()
    try:
        worker, outputs, dead = score_stream(cluster_client, cluster_project, day, users, lose_ack=True)
        assert worker._emit.split and worker._emit.lost  # the split emit ran, and lost one XACK
        assert cluster_client.keyslot(worker.names.done_prefix + "t-1") == cluster_client.keyslot(
            worker.names.output
        )
        ids = [p["event_id"] for p in outputs]
        assert len(ids) == len(set(ids)) and sorted(ids) == sorted(day["transaction_id"])  # each exactly once
        assert len(dead) == len(BAD_PAYLOADS)  # each malformed entry dead-lettered once, replay included
        assert sorted(f[b"payload"].decode() for _, f in dead) == sorted(BAD_PAYLOADS)
        assert cluster_client.xpending(worker.names.input, worker.config.group)["pending"] == 0
        assert worker.stats.retries >= 1 and worker.stats.duplicates >= 100

        _, single_outputs, single_dead = score_stream(single, single_project, day, users)
        assert len(single_dead) == len(BAD_PAYLOADS)
        twins = {p["event_id"]: p for p in single_outputs}
        assert sorted(twins) == sorted(ids)
        for p in outputs:
            twin = twins[p["event_id"]]
            assert (p["probability"], p["decision"], p["features"]) == (
                twin["probability"], twin["decision"], twin["features"])  # fmt: skip
        assert len({p["decision"] for p in outputs}) == 2  # the stand-in's scores are not constant

        # Streams named with one hash tag: the emit is the one atomic script, as on one node.
        tag = f"{{{cluster_project}}}"
        tagged, outputs, dead = score_stream(
            cluster_client, cluster_project + "t", day.head(150), users, input_stream=f"{tag}:in",
            output_stream=f"{tag}:out", dead_letter_stream=f"{tag}:dead",
        )  # fmt: skip
        assert not tagged._emit.split
        assert len(outputs) == 150 and len(dead) == len(BAD_PAYLOADS)
    finally:
        unlink_on_masters(redis_cluster, f"{{{cluster_project}}}:*")  # the tagged streams
        unlink_on_masters(redis_cluster, f"{cluster_project}t:*")
        remove_everywhere(redis_cluster, single, cluster_project, single_project)


# --------------------------------------------------------------------------- (c) experiments


@pytest.fixture()
def stores(single, cluster_client, redis_cluster):
    """An experiments store on the cluster and one on the single node (async clients on one loop)."""
    cluster_project, single_project = projects()
    loop = asyncio.new_event_loop()
    node_url = redis_cluster.url
    c_async, s_async = async_cluster_client_from_url(node_url), aioredis.Redis.from_url(TEST_REDIS_URL)
    pair = SimpleNamespace(
        cluster=ExperimentStore(cluster_client, cluster_project, c_async),
        single=ExperimentStore(single, single_project, s_async),
        run=loop.run_until_complete,
    )
    yield pair
    loop.run_until_complete(c_async.aclose())
    loop.run_until_complete(s_async.aclose())
    loop.close()
    remove_everywhere(redis_cluster, single, cluster_project, single_project)


def test_rewards_and_decisions_on_a_cluster_match_the_single_node_and_count_once(
    stores, cluster_client, redis_cluster
):
    """Bugs this catches: experiment keys in several slots (CROSSSLOT in the scripts and MULTI),
    a reward applied to the wrong experiment or arm, a duplicate accepted (the API's 409) or an
    unknown decision accepted (404), a decision's reward counted twice by two processes at once,
    decisions all on one master; and any difference from the single node's posteriors."""
    config = ExperimentConfig(name="ab", arms={"v1": 1, "v2": 2, "v3": 3}, discount=0.999)
    pids = [f"p-{i}" for i in range(600)]
    arms = [("v1", "v2", "v3")[i % 3] for i in range(600)]
    rewards = [(pid, float(i % 3 == 1) if i % 7 else 0.5) for i, pid in enumerate(pids[:500])]
    batch = rewards + rewards[:50] + [(f"never-{i}", 1.0) for i in range(10)]  # 50 twice in one call
    outcomes = {}
    for side in ("single", "cluster"):
        store = getattr(stores, side)
        store.start(config, who="test")
        stores.run(store.record_decisions("ab", pids, arms, [0.25] * 600, 3600))
        first = stores.run(store.feedback(batch))
        again = store.feedback_sync(rewards[:20])  # a later call for decisions rewarded already
        store.client.pexpire(store.decision_key(pids[599]), 1)  # its feedback window has passed
        stores.run(asyncio.sleep(0.01))
        expired = store.feedback_sync([(pids[599], 1.0)])
        outcomes[side] = (first, again, expired)
        raw = store.client.hgetall(store.key("ab", "posterior"))
        outcomes[side + ":posterior"] = {k: float(v) for k, v in raw.items()}
        outcomes[side + ":stats"] = {  # (the selection probability is a Monte Carlo estimate)
            a: {k: v for k, v in s.to_dict().items() if k != "selection_probability"}
            for a, s in store.stats("ab").items()
        }
        outcomes[side + ":feedback"] = store.feedback_counts("ab")
    first, again, expired = outcomes["cluster"]
    assert [o for o, _ in first] == [ACCEPTED] * 500 + [DUPLICATE] * 50 + [UNKNOWN] * 10
    assert [a for _, a in first[:500]] == arms[:500]  # each reward went to the arm that served
    assert [o for o, _ in again] == [DUPLICATE] * 20 and expired == [(UNKNOWN, "")]
    assert outcomes["cluster"] == outcomes["single"]
    assert outcomes["cluster:posterior"] == outcomes["single:posterior"]
    for key in ("stats", "feedback"):
        assert outcomes[f"cluster:{key}"] == outcomes[f"single:{key}"], key
    assert outcomes["cluster:feedback"]["accepted"] == 500 and outcomes["cluster:feedback"]["duplicate"] == 70
    assert sum(s["samples"] for s in outcomes["cluster:stats"].values()) == 500

    # Layout: the experiment, its evidence and its reward markers in one slot; decisions on every master.
    store = stores.cluster
    slots = {
        cluster_client.keyslot(store.key("ab", part))
        for part in (None, "posterior", "counts", "sticky", "label-days")
    }
    slots |= {cluster_client.keyslot(store.keys.rewarded("ab", pid)) for pid in pids[:5]}
    slots |= {cluster_client.keyslot(store.active_key)}
    assert len(slots) == 1
    decisions = redis_cluster.keys_by_master(f"{store.project}:xd:*")
    assert all(len(keys) > 100 for keys in decisions.values()), {p: len(k) for p, k in decisions.items()}

    # Two processes rewarding the same 200 new decisions at once: each counted exactly once.
    more = [f"q-{i}" for i in range(200)]
    stores.run(store.record_decisions("ab", more, ["v2"] * 200, [0.5] * 200, 3600))
    results: list = []

    def reward_all(seed: int) -> None:
        client = cluster_client_from_url(redis_cluster.url)
        other = ExperimentStore(client, store.project)
        order = more[::-1] if seed else more
        for i in range(0, 200, 10):
            results.extend(other.feedback_sync([(pid, 1.0) for pid in order[i : i + 10]]))
        client.close()

    threads = [threading.Thread(target=reward_all, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o for o, _ in results) == [ACCEPTED] * 200 + [DUPLICATE] * 200
    stats = store.stats("ab")
    assert stats["v2"].samples == outcomes["cluster:stats"]["v2"]["samples"] + 200


def test_sticky_assignment_label_days_and_the_router_on_a_cluster(stores):
    """Bugs this catches: a second decision moving a card holder to another arm, a label day
    applied twice, the router reading no or other posteriors than the store holds."""
    store = stores.cluster
    config = ExperimentConfig(name="sticky-ab", arms={"v1": 1, "v2": 2}, sticky=True)
    store.start(config, who="test")
    first = stores.run(store.stick("sticky-ab", list(range(50)), ["v1|0.5"] * 50))
    again = stores.run(store.stick("sticky-ab", list(range(60)), ["v2|0.5"] * 60))
    assert first == ["v1|0.5"] * 50 and again == ["v1|0.5"] * 50 + ["v2|0.5"] * 10

    day = [("v2", 1.0)] * 40 + [("v1", 0.0)] * 40
    assert store.apply_label_day("sticky-ab", "2026-11-05", day) == 80
    assert store.apply_label_day("sticky-ab", "2026-11-05", day) is None  # a re-run adds nothing
    assert store.label_days("sticky-ab") == {"2026-11-05": 80}

    router = ExperimentRouter(store, load=lambda version: f"model-v{version}", seed=3)
    active = router.refresh()
    assert router.last_error is None and active is not None and active.name == "sticky-ab"
    held = store.read_posterior(config)
    np.testing.assert_array_equal(active.posterior.alpha, held.alpha)
    np.testing.assert_array_equal(active.posterior.beta, held.beta)
    assert active.posterior.alpha.tolist() == [1.0, 41.0] and active.posterior.beta.tolist() == [41.0, 1.0]
    assert active.probabilities[1] > 0.99  # v2 won every reward
    assert active.models == ("model-v1", "model-v2")
    assert (router.assign(200, active).arms == 1).mean() > 0.95


def test_the_rollout_compare_and_set_on_a_cluster(stores, cluster_client):
    """Bugs this catches: the rollout state and its active pointer in two slots (the WATCH/MULTI
    fails), a stale revision overwriting a newer state, an advance or abort that does not reach
    the experiment the routers read."""
    store = stores.cluster
    control = RolloutControl(store, registry=None)  # (the registry is only consulted to start or complete)
    plan = RolloutPlan.from_spec("shadow,50,100", min_duration_s=0, min_samples=0)
    name = f"{ROLLOUT_PREFIX}3-1700000000000"
    state = start_rollout(3, 2, plan, who="test", now=1_700_000_000.0)
    store.start(
        stage_config(name, state), who="test"
    )  # what RolloutControl.start does after its registry checks
    assert control._save(name, state, 0, active=True) == 1
    assert (
        len({cluster_client.keyslot(k) for k in (control.key(name), control.active_key, store.key(name))})
        == 1
    )

    loaded_name, loaded, revision = control.load()
    assert (loaded_name, revision, loaded.stage.name) == (name, 1, "shadow")
    with pytest.raises(RuntimeError, match=r"changed meanwhile \(revision 1, expected 0\)"):
        control._save(name, loaded, 0, active=True)  # a writer holding an old revision

    transition = control.advance(Evidence(samples=100), who="test", revision=1)
    assert transition is not None and transition.to_stage == "50%"
    assert control.status()["revision"] == 2
    assert store.config(name).weights == {"v2": 0.5, "v3": 0.5}  # the experiment follows the stage
    assert (
        control.advance(Evidence(samples=100), who="test", revision=1) is None
    )  # evidence of a past stage: hold
    assert control.status()["stage"] == "50%"

    control.abort(who="test", why="operator")
    status = control.status(name)
    assert status["status"] == ABORTED and status["revision"] == 3
    assert store.status(name) == "stopped" and store.active() is None
    assert cluster_client.get(control.active_key) is None
