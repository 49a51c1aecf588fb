"""The OnlineStore contract (online_store_contract.py) run on a local three-master Redis Cluster
(`LocalRedisCluster`, started once per session from the system redis-server on free loopback
ports: the `redis_cluster` / `cluster_client` fixtures of conftest.py), plus what only a cluster has: entities spread over the masters, one entity's keys in one
slot, a flip that dies half-way through its buckets."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from datetime import timedelta

import numpy as np
import pytest
import redis
import redis.asyncio.cluster as aiocluster
from online_store_contract import T0, OnlineStoreContract, check_snapshot, wide_table, wide_view

from ml_platform.featurestore.definitions import (
    Entity,
    FeatureView,
    Field,
    FileSource,
    Int64,
    String,
    ValueType,
)
from ml_platform.featurestore.online import OnlineStoreError, RedisOnlineStore, scripts
from ml_platform.featurestore.online.cluster_layout import BUCKETS, bucket_slots
from ml_platform.featurestore.online.cluster_store import RedisClusterOnlineStore
from ml_platform.featurestore.online.entity_keys import (
    entity_bucket,
    entity_buckets,
    entity_field,
    entity_fields_from_rows,
)


class TestRedisClusterOnlineStore(OnlineStoreContract):
    @pytest.fixture()
    def open_store(self, cluster_client, redis_cluster):
        opened: list[RedisOnlineStore] = []
        node_url = redis_cluster.url.replace("redis+cluster://", "redis://")

        def open_store(views, namespace):
            store = RedisOnlineStore(
                cluster_client,
                project=namespace,
                views=views,
                async_client=aiocluster.RedisCluster.from_url(node_url),
            )
            assert isinstance(store, RedisClusterOnlineStore)  # chosen by the client's type
            opened.append(store)
            return store

        yield open_store
        namespaces = {s.namespace for s in opened}
        for store in opened:
            store.close()
            with contextlib.suppress(RuntimeError):  # its connections may belong to a finished event loop
                asyncio.run(store.async_client.aclose())
        for namespace in namespaces:  # every test removed what it wrote, on every master
            assert redis_cluster.keys_by_master(namespace + "*") == {p: [] for p in redis_cluster.ports}


# ---- the layout


def test_bucket_hash_is_the_same_vectorised_and_per_entity():
    """The one rule that places an entity: numpy path (bulk loads, reads) == per-field path."""
    one = [("user_id", ValueType.Int64)]
    two = [("user_id", ValueType.Int64), ("merchant_id", ValueType.Int64)]
    for keys, rows in (
        (one, [{"user_id": u} for u in (0, 1, -1, 2**63 - 1, -(2**63), 12345)]),
        (two, [{"user_id": u, "merchant_id": 7 * u + 1} for u in range(-3, 20)]),
    ):
        fields = entity_fields_from_rows(keys, rows)
        assert isinstance(fields, np.ndarray)
        assert entity_buckets(fields, BUCKETS).tolist() == [
            entity_bucket(entity_field(keys, r), BUCKETS) for r in rows
        ]
    spread = np.bincount(
        entity_buckets(entity_fields_from_rows(one, [{"user_id": u} for u in range(32_000)]), 32)
    )
    assert len(spread) == 32 and spread.min() > 850 and spread.max() < 1150  # ~1000 each
    # String keys take the per-field path; the bucket only depends on the field's bytes.
    text = [("country_code", ValueType.String)]
    fields = entity_fields_from_rows(text, [{"country_code": c} for c in ("DE", "FR", "DE")])
    buckets = entity_buckets(fields, BUCKETS).tolist()
    assert buckets[0] == buckets[2] == entity_bucket(b"\x00\x02DE", BUCKETS)


def test_buckets_spread_evenly_over_the_masters(redis_cluster):
    """The tags put bucket i's slot in the i-th slice of the slot space: with three masters owning
    equal contiguous ranges, each master gets BUCKETS/3 of them (5 or 6 of 16)."""
    ranges = redis_cluster.masters_by_slot()
    per_master = {port: 0 for _, _, port in ranges}
    for slot in bucket_slots(BUCKETS):
        (port,) = [p for first, last, p in ranges if first <= slot <= last]
        per_master[port] += 1
    assert BUCKETS == 16 and sorted(per_master.values()) == [5, 5, 6]


def test_entities_spread_over_the_masters_and_one_entity_keys_share_a_slot(cluster_client, redis_cluster):
    """Written through the store, 600 users land on all three masters (each holds 20-50 % of
    them); user u's values in both views and both views' bucket pointers sit in one slot, on the
    master that owns it; a read of one user asks that one master."""
    a, b = wide_view("spread_a"), wide_view("spread_b")
    store = RedisOnlineStore(cluster_client, project=f"cluster_{uuid.uuid4().hex[:12]}", views=[a, b])
    ids = list(range(600))
    try:
        for view in (a, b):
            store.write_view(view, wide_table(ids, 1.0, T0))
        data = redis_cluster.keys_by_master(store.namespace + "*:data:*")
        per_master = {}
        for port, keys in data.items():
            node = redis.Redis(host="127.0.0.1", port=port)
            per_master[port] = sum(node.hlen(k) for k in keys)
            node.close()
        assert sum(per_master.values()) == 2 * len(ids)
        assert all(0.2 * 1200 <= n <= 0.5 * 1200 for n in per_master.values()), per_master

        ranges = redis_cluster.masters_by_slot()
        join_keys = [("user_id", ValueType.Int64)]
        for user in (0, 1, 599):
            field = entity_field(join_keys, {"user_id": user})
            holders = []
            for port, keys in data.items():
                node = redis.Redis(host="127.0.0.1", port=port)
                holders += [(port, k) for k in keys if node.hexists(k, field)]
                node.close()
            assert len(holders) == 2  # one data key per view
            bucket = entity_bucket(field, BUCKETS)
            ptrs = [store.keys.ptr(bucket, v.name) for v in (a, b)]
            slots = {cluster_client.keyslot(k) for _, k in holders} | {
                cluster_client.keyslot(p) for p in ptrs
            }
            slot = bucket_slots(BUCKETS)[bucket]
            assert slots == {slot}
            (owner,) = [p for first, last, p in ranges if first <= slot <= last]
            assert {port for port, _ in holders} == {owner}
            items, _ = store._read_items(
                store._plan(["spread_a:f00", "spread_b:f00"], [{"user_id": user}]), [b"1", b"1"]
            )
            assert len(items) == 1  # one MULTI/EXEC, on that master
        out = store.read(
            ["spread_a:f00", "spread_b:f00"], [{"user_id": u} for u in ids], now=T0, full_feature_names=True
        )
        assert out["spread_a__f00"] == [1.0] * 600 and out["spread_b__f00"] == [1.0] * 600
    finally:
        store.delete_project()
        store.close()


# ---- the flip on a cluster


class DiesMidCommit(RedisClusterOnlineStore):
    """A writer that dies after the global flip, when only the first half of the buckets followed."""

    def _each_bucket(self, script, frame):
        if script is scripts.BUCKET_COMMIT and frame(0)[1][0] == getattr(self, "die_on", None):
            self.die_on = None  # (the roll forwards before it commit the version already current)
            half = self.keys.buckets // 2
            super()._each_bucket(
                script, lambda b: frame(b) if b < half else ([self.keys.ptr(b, "x")], [b"0"])
            )
            raise redis.ConnectionError("writer lost mid-commit")
        return super()._each_bucket(script, frame)


def test_a_flip_that_dies_half_committed_serves_the_new_version_and_is_rolled_forward(
    cluster_client, redis_cluster
):
    """After the global flip, half the buckets hold v2 as `version` and half as `next`: every read
    sees v2 for every entity (none missing, no v1); the next full build commits the stragglers
    and removes v1's and v2's data keys, and a stream update meanwhile reaches v2."""
    view = wide_view("halfway", 1, ttl=timedelta(days=1))
    project = f"cluster_{uuid.uuid4().hex[:12]}"
    writer = DiesMidCommit(cluster_client, project=project, views=[view])
    reader = RedisOnlineStore(cluster_client, project=project, views=[view])
    ids = list(range(400))
    rows = [{"user_id": u} for u in ids]
    try:
        writer.write_view(view, wide_table(ids, 1.0, T0, 1))
        assert check_snapshot(reader.read(["halfway:f00"], rows, now=T0), {"halfway": "f00"}) == {
            "halfway": 1.0
        }
        writer.die_on = b"2"
        with pytest.raises(redis.ConnectionError, match="mid-commit"):
            writer.write_view(view, wide_table(ids, 2.0, T0 + timedelta(seconds=1), 1))
        ptrs = [
            cluster_client.hmget(writer.keys.ptr(b, "halfway"), ["version", "next"]) for b in range(BUCKETS)
        ]
        assert sorted({tuple(p) for p in ptrs}) == [(b"1", b"2"), (b"2", None)]  # really half-way
        assert writer.metadata("halfway")["version"] == 2
        fresh = RedisOnlineStore(cluster_client, project=project, views=[view])  # no cached version
        for store in (reader, fresh):
            assert check_snapshot(store.read(["halfway:f00"], rows, now=T0), {"halfway": "f00"}) == {
                "halfway": 2.0
            }
        later = {"user_id": 7, "event_timestamp": T0 + timedelta(seconds=5), "f00": 9.0}
        assert reader.update_entities(view, [later]) == {"rows": 1, "written": 1}
        assert fresh.read(["halfway:f00"], [{"user_id": 7}], now=T0)["f00"] == [9.0]

        writer.write_view(view, wide_table(ids, 3.0, T0 + timedelta(seconds=2), 1))  # rolls forward first
        assert check_snapshot(fresh.read(["halfway:f00"], rows, now=T0), {"halfway": "f00"}) == {
            "halfway": 3.0
        }
        versions = {
            k.rsplit(b":", 1)[1]
            for keys in redis_cluster.keys_by_master(writer.namespace + "*:data:*").values()
            for k in keys
        }
        assert versions == {b"3"}  # nothing left of v1 or v2
        meta = cluster_client.hgetall(writer.meta_key("halfway"))
        assert sorted(k for k in meta if k.startswith(b"schema:")) == [b"schema:3"]  # v1 retired too
    finally:
        writer.delete_project()
        for s in (writer, reader):
            s.close()


def test_string_keyed_and_multi_key_views_on_a_cluster(cluster_client):
    """String join keys (per-field bucket path) and two-key entities read back exactly."""
    country = Entity("country", join_keys=["country_code"], value_type=String)
    user, merchant = Entity("user", join_keys=["user_id"]), Entity("merchant", join_keys=["merchant_id"])
    risk = FeatureView("risk", [country], FileSource("x.parquet"), schema=[Field("label", String)])
    pair = FeatureView("pair", [user, merchant], FileSource("x.parquet"), schema=[Field("n", Int64)])
    store = RedisOnlineStore(cluster_client, project=f"cluster_{uuid.uuid4().hex[:12]}", views=[risk, pair])
    try:
        codes = [f"C{i}" for i in range(50)]
        store.write_view(
            risk, [{"country_code": c, "event_timestamp": T0, "label": c.lower()} for c in codes]
        )
        store.write_view(
            pair,
            [{"user_id": u, "merchant_id": u % 7, "event_timestamp": T0, "n": u * 10} for u in range(50)],
        )
        out = store.read(["risk:label"], [{"country_code": c} for c in [*codes, "nope"]], now=T0)
        assert out["label"] == [c.lower() for c in codes] + [None]
        out = store.read(
            ["pair:n"],
            [{"user_id": u, "merchant_id": u % 7} for u in (3, 49, 48)] + [{"user_id": 3, "merchant_id": 4}],
            now=T0,
        )
        assert out["n"] == [30, 490, 480, None]
        assert store.metadata("pair")["rows"] == 50
    finally:
        store.delete_project()
        store.close()


def test_writes_survive_masters_losing_their_script_cache(cluster_client, redis_cluster):
    """After SCRIPT FLUSH on every master (what a restart does), stream updates, incremental and
    full writes load the scripts again instead of failing with NOSCRIPT."""
    view = wide_view("noscript", 1, ttl=None)
    store = RedisOnlineStore(cluster_client, project=f"cluster_{uuid.uuid4().hex[:12]}", views=[view])
    ids = list(range(100))
    try:
        store.write_view(view, wide_table(ids, 1.0, T0, 1))
        for step, write in enumerate(
            [
                lambda: store.update_entities(
                    view,
                    [{"user_id": u, "event_timestamp": T0 + timedelta(seconds=1), "f00": 2.0} for u in ids],
                ),
                lambda: store.write_view(
                    view, wide_table(ids, 3.0, T0 + timedelta(seconds=2), 1), mode="incremental"
                ),
                lambda: store.write_view(view, wide_table(ids, 4.0, T0 + timedelta(seconds=3), 1)),
            ]
        ):
            for port in redis_cluster.ports:
                node = redis.Redis(host="127.0.0.1", port=port)
                node.script_flush()
                node.close()
            write()
            out = store.read(["noscript:f00"], [{"user_id": u} for u in ids], now=T0)
            assert out["f00"] == [float(step + 2)] * len(ids)
    finally:
        store.delete_project()
        store.close()


def test_retired_versions_with_a_grace_period_are_reaped_from_every_bucket(cluster_client, redis_cluster):
    """With retire_grace_seconds, the replaced version's bucket keys stay (readers never use
    them: no bucket lists the version any more) until reap_retired deletes all of them."""
    view = wide_view("graced", 1, ttl=None)
    store = RedisOnlineStore(
        cluster_client, project=f"cluster_{uuid.uuid4().hex[:12]}", views=[view], retire_grace_seconds=30
    )
    ids = list(range(200))
    try:
        store.write_view(view, wide_table(ids, 1.0, T0, 1))
        store.write_view(view, wide_table(ids, 2.0, T0, 1))
        assert store.metadata("graced")["retired_versions"] == [1]

        def versions_stored():
            keys = redis_cluster.keys_by_master(store.namespace + "*:data:*").values()
            return sorted({k.rsplit(b":", 1)[1] for ks in keys for k in ks})

        assert versions_stored() == [b"1", b"2"]
        assert store.read(["graced:f00"], [{"user_id": u} for u in ids])["f00"] == [2.0] * 200
        assert store.reap_retired(now=time.time() + 1) == []  # still in its grace period
        reaped = store.reap_retired(now=time.time() + 31)
        assert sorted(reaped) == sorted(store.keys.data(b, "graced", 1) for b in range(BUCKETS))
        assert versions_stored() == [b"2"] and store.metadata("graced")["retired_versions"] == []
    finally:
        store.delete_project()
        store.close()


def test_a_client_with_another_bucket_count_refuses_instead_of_reading_nothing(cluster_client):
    """The bucket count is part of the layout: a store configured with 8 buckets on data written
    with 16 would look for every entity in the wrong place; it raises, naming both numbers."""
    view = wide_view("layout", 1, ttl=None)
    project = f"cluster_{uuid.uuid4().hex[:12]}"
    store = RedisOnlineStore(cluster_client, project=project, views=[view])
    other = RedisClusterOnlineStore(cluster_client, project=project, views=[view], buckets=8)
    try:
        store.write_view(view, wide_table([1, 2, 3], 1.0, T0, 1))
        with pytest.raises(OnlineStoreError, match="written with 16 buckets per view, this store uses 8"):
            other.read(["layout:f00"], [{"user_id": 1}])
        with pytest.raises(OnlineStoreError, match="written with 16 buckets"):
            other.write_view(view, wide_table([1], 2.0, T0, 1))
        assert store.read(["layout:f00"], [{"user_id": u} for u in (1, 2, 3)])["f00"] == [1.0] * 3
    finally:
        store.delete_project()
        store.close()
        other.close()


def test_a_cluster_redis_url_in_the_settings_gives_the_platform_the_cluster_store(redis_cluster, tmp_path):
    """REDIS_URL=redis+cluster://host:port is all a deployment changes: the platform's client
    (redis_server.client_from_url, used by FeatureStore, the API and the stream worker) is a
    RedisCluster and the online store built on it is the cluster store."""
    from redis.cluster import RedisCluster

    from ml_platform.featurestore.redis_server import redis_client
    from ml_platform.settings import load_settings

    url = "redis+cluster://" + redis_cluster.url.split("://", 1)[1]
    settings = load_settings({"REDIS_URL": url, "ML_PLATFORM_DATA_DIR": str(tmp_path)})
    client = redis_client(settings)
    try:
        assert isinstance(client, RedisCluster)
        assert len(client.get_primaries()) == 3
        store = RedisOnlineStore(client, project=f"t_{uuid.uuid4().hex[:8]}", views=[])
        assert type(store).__name__ == "RedisClusterOnlineStore"
    finally:
        client.close()
