"""RedisOnlineStore's own behaviour against the real Redis (127.0.0.1:6379 or
ML_PLATFORM_TEST_REDIS_URL, via conftest's `client`): key layout, incremental and stream upserts,
builds racing each other, version retirement, offline -> online materialization. What every
OnlineStore must do is in online_store_contract.py (run by test_online_store_contract.py); the
Redis server and URL handling is in test_online_store_redis_server.py.

Every test works under its own random project prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from ml_platform.featurestore.definitions import (
    Entity,
    FeatureView,
    Field,
    FileSource,
    Float64,
    Int64,
    String,
)
from ml_platform.featurestore.materialize_online import materialize
from ml_platform.featurestore.online import OnlineStoreError, RedisOnlineStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")

user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])
country = Entity("country", join_keys=["country_code"], value_type=String)
SOURCE = FileSource("unused.parquet")

pair = FeatureView("pair", [user, merchant], SOURCE, schema=[Field("pair_count", Int64)], ttl=None)
country_risk = FeatureView("country_risk", [country], SOURCE, schema=[Field("risk", Float64)])


def _wide_view(name: str, n_features: int = 20, ttl: timedelta | None = None) -> FeatureView:
    return FeatureView(
        name, [user], SOURCE, schema=[Field(f"f{i:02d}", Float64) for i in range(n_features)], ttl=ttl
    )


def _wide_table(ids, value: float, ts: datetime, n_features: int = 20) -> pa.Table:
    cols = {"user_id": pa.array(ids, pa.int64()), "event_timestamp": pa.array([ts] * len(ids), TS)}
    for i in range(n_features):
        cols[f"f{i:02d}"] = pa.array([value] * len(ids), pa.float64())
    return pa.table(cols)


@pytest.fixture()
def online(client):
    store = RedisOnlineStore(client, project=f"test_{uuid.uuid4().hex[:12]}", views=[pair, country_risk])
    yield store
    store.delete_project()
    assert list(client.scan_iter(match=store.namespace + "*")) == []
    store.close()


def test_multi_key_and_string_key_entities_and_input_errors(online):
    table = pa.table(
        {
            "user_id": pa.array([1, 1, 2], pa.int64()),
            "merchant_id": pa.array([10, 11, 10], pa.int64()),
            "event_timestamp": pa.array([T0] * 3, TS),
            "pair_count": pa.array([3, 1, 7], pa.int64()),
        }
    )
    online.write_view(pair, table)
    online.write_view(
        country_risk,
        pa.table(
            {"country_code": ["DE", "FR|x"], "event_timestamp": pa.array([T0] * 2, TS), "risk": [0.25, 0.5]}
        ),
    )
    rows = [
        {"user_id": 1, "merchant_id": 11, "country_code": "FR|x"},
        {"user_id": 2, "merchant_id": 10, "country_code": "DE"},
        {"user_id": 2, "merchant_id": 11, "country_code": "US"},
        {"user_id": 1, "merchant_id": 10, "country_code": "DE", "amount": 12.5},  # extra keys are ignored
    ]
    out = online.read(["pair:pair_count", "country_risk:risk"], rows)
    assert out == {
        "user_id": [1, 2, 2, 1],
        "merchant_id": [11, 10, 11, 10],
        "country_code": ["FR|x", "DE", "US", "DE"],
        "pair_count": [1, 7, None, 3],
        "risk": [0.5, 0.25, None, 0.25],
    }
    with pytest.raises(ValueError, match=r"entity row 1 has no join key 'merchant_id'"):
        online.read(["pair:pair_count"], [{"user_id": 1, "merchant_id": 2}, {"user_id": 1}])
    with pytest.raises(
        ValueError, match=r"entity row 0: join key 'user_id' must be a 64-bit integer, got 'abc'"
    ):
        online.read(["pair:pair_count"], [{"user_id": "abc", "merchant_id": 2}])
    assert online.read(["pair:pair_count"], [{"user_id": "1", "merchant_id": 11.0}])["pair_count"] == [1]
    with pytest.raises(ValueError, match=r"has no feature \['nope'\]"):
        online.read(["pair:nope"], [{"user_id": 1, "merchant_id": 2}])
    with pytest.raises(ValueError, match="must look like 'feature_view:feature'"):
        online.read(["pair_count"], [{"user_id": 1, "merchant_id": 2}])
    with pytest.raises(OnlineStoreError, match="'never_written' has not been materialized"):
        online.read(["never_written:x"], [{"user_id": 1}])
    with pytest.raises(ValueError, match=r"has no join key column \['merchant_id'\]"):
        online.write_view(pair, table.drop_columns(["merchant_id"]))
    with pytest.raises(ValueError, match="'user_id' has 1 null values"):
        online.write_view(pair, table.set_column(0, "user_id", pa.array([1, None, 2], pa.int64())))


def test_full_rematerialization_is_atomic_for_concurrent_readers(client, online):
    view = _wide_view("wide", 20)
    online.views[view.name] = view
    ids = list(range(30_000))
    online.write_view(view, _wide_table(ids, 1.0, T0))
    online.batch_size = 300  # many commands, so the build takes a while and readers run during it
    reader_store = RedisOnlineStore(client, project=online.project, views=[view])
    refs = view.feature_refs()
    probe = [{"user_id": i} for i in range(0, 30_000, 150)]  # 200 entities spread over all batches
    seen: list[tuple[float, set]] = []
    errors: list[str] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            out = reader_store.read(refs, probe, now=T0)
            values = {v for f in refs for v in out[f.split(":")[1]]}
            if None in values:
                errors.append("an entity was missing during the rebuild")
            if len(values) != 1:
                errors.append(f"mixed snapshot: {sorted(values, key=str)}")
            seen.append((time.perf_counter(), values))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        time.sleep(0.05)
        started = time.perf_counter()
        result = online.write_view(view, _wide_table(ids, 2.0, T0 + timedelta(minutes=1)))
        finished = time.perf_counter()
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    reader_store.close()
    assert errors == []
    during = [values for t, values in seen if started <= t <= finished]
    assert len(during) >= 3, f"the reader should have run during the rebuild (reads during: {len(during)})"
    assert seen[0][1] == {1.0} and seen[-1][1] == {2.0}
    assert result["version"] == 2 and result["rows"] == 30_000
    # the old version is gone (grace 0) and nothing of the build is left behind
    keys = sorted(k.decode() for k in client.scan_iter(match=online.namespace + "*"))
    assert keys == [online.data_key("wide", 2), online.meta_key("wide")]


def test_incremental_touches_only_changed_entities_newer_wins(client, online):
    view = _wide_view("inc", 3)
    online.views[view.name] = view
    online.write_view(view, _wide_table([1, 2, 3], 1.0, T0, 3), as_of=T0)
    data_key = online.data_key("inc", 1)
    before = {i: client.hget(data_key, i.to_bytes(8, "big", signed=True)) for i in (1, 2, 3)}
    changes = pa.concat_tables(
        [
            _wide_table([2, 4], 5.0, T0 + timedelta(hours=1), 3),  # changed + new entity
            _wide_table([3], 9.0, T0 - timedelta(hours=1), 3),  # older than what is stored: ignored
        ]
    )
    result = online.write_view(view, changes, mode="incremental", as_of=T0 + timedelta(hours=1))
    assert result["rows"] == 3 and result["version"] == 1 and result["mode"] == "incremental"
    after = {i: client.hget(data_key, i.to_bytes(8, "big", signed=True)) for i in (1, 2, 3)}
    assert after[1] == before[1] and after[3] == before[3] and after[2] != before[2]
    out = online.read(["inc:f00", "inc:f02"], [{"user_id": i} for i in (1, 2, 3, 4)], now=T0)
    assert out["f00"] == [1.0, 5.0, 1.0, 5.0] and out["f02"] == [1.0, 5.0, 1.0, 5.0]
    meta = online.metadata("inc")
    assert meta["version"] == 1 and meta["rows"] == 4 and meta["last_mode"] == "incremental"
    assert meta["as_of"] == T0 + timedelta(hours=1) and meta["last_rows"] == 3
    # an incremental run never moves as_of backwards
    online.write_view(view, _wide_table([1], 1.5, T0 + timedelta(hours=2), 3), mode="incremental", as_of=T0)
    assert online.metadata("inc")["as_of"] == T0 + timedelta(hours=1)
    with pytest.raises(OnlineStoreError, match="has not been materialized"):
        online.write_view(_wide_view("fresh", 3), _wide_table([1], 1.0, T0, 3), mode="incremental")


def test_update_entities_is_per_entity_newer_wins_and_validated(online):
    view = _wide_view("live", 2)
    online.views[view.name] = view
    online.write_view(view, _wide_table([1, 2], 1.0, T0, 2))
    result = online.update_entities(
        "live",
        [
            {"user_id": 1, "event_timestamp": T0 + timedelta(seconds=1), "f00": 7.0, "f01": None},
            {
                "user_id": 2,
                "event_timestamp": T0 - timedelta(seconds=1),
                "f00": 8.0,
                "f01": 8.0,
            },  # late: ignored
            {"user_id": 3, "event_timestamp": T0, "f00": 9.0, "f01": 9.0},
        ],
    )
    assert result == {"rows": 3, "written": 2}
    out = online.read(["live:f00", "live:f01"], [{"user_id": i} for i in (1, 2, 3)], now=T0)
    assert out["f00"] == [7.0, 1.0, 9.0] and out["f01"] == [None, 1.0, 9.0]
    # the same entity twice in one batch: the newer event wins whatever the order
    twice = online.update_entities(
        "live",
        [
            {"user_id": 5, "event_timestamp": T0 + timedelta(seconds=2), "f00": 2.0, "f01": 2.0},
            {"user_id": 5, "event_timestamp": T0 + timedelta(seconds=1), "f00": 1.0, "f01": 1.0},
        ],
    )
    assert twice == {"rows": 2, "written": 1}
    assert online.read(["live:f00"], [{"user_id": 5}], now=T0)["f00"] == [2.0]
    with pytest.raises(ValueError, match=r"row 0 has no \['f01'\]"):
        online.update_entities("live", [{"user_id": 1, "event_timestamp": T0, "f00": 1.0}])
    with pytest.raises(ValueError, match=r"feature 'f00' must hold Float64 values, got \['high'\]"):
        online.update_entities("live", [{"user_id": 1, "event_timestamp": T0, "f00": "high", "f01": 1.0}])
    with pytest.raises(ValueError, match=r"row 0: 'event_timestamp' must be a datetime, got 12"):
        online.update_entities("live", [{"user_id": 1, "event_timestamp": 12, "f00": 1.0, "f01": 1.0}])
    # ISO strings are accepted for the event time (as they arrive on a stream)
    iso = online.update_entities(
        "live", [{"user_id": 6, "event_timestamp": "2026-03-01T12:00:00+00:00", "f00": 6.0, "f01": 6.0}]
    )
    assert iso == {"rows": 1, "written": 1}
    # a store that has no definitions uses the schema recorded in Redis
    bare = RedisOnlineStore(online.client, project=online.project)
    assert (
        bare.update_entities("live", [{"user_id": 4, "event_timestamp": T0, "f00": 1.0, "f01": 2.0}])[
            "written"
        ]
        == 1
    )
    assert bare.read(["live:f01"], [{"user_id": 4}], now=T0) == {"user_id": [4], "f01": [2.0]}
    changed = _wide_view("live", 3)  # a feature was added in code but not re-materialized
    with pytest.raises(OnlineStoreError, match="run a full materialization"):
        online.update_entities(
            changed, [{"user_id": 1, "event_timestamp": T0, "f00": 1.0, "f01": 1.0, "f02": 1.0}]
        )


def test_stream_updates_during_a_full_build_are_not_lost(online):
    view = _wide_view("race", 2)
    online.views[view.name] = view
    online.write_view(view, _wide_table([1, 2, 3, 4], 1.0, T0, 2))
    newer = T0 + timedelta(minutes=5)

    def batches():
        # The stream worker updates entity 4 before the bulk load reaches it (it lands in the
        # overlay) and entity 1 after the bulk load wrote it (newer event time wins).
        online.update_entities("race", [{"user_id": 4, "event_timestamp": newer, "f00": 40.0, "f01": 40.0}])
        yield _wide_table([1, 2], 2.0, T0 + timedelta(minutes=1), 2).to_batches()[0]
        online.update_entities("race", [{"user_id": 1, "event_timestamp": newer, "f00": 10.0, "f01": 10.0}])
        yield _wide_table([3, 4], 2.0, T0 + timedelta(minutes=1), 2).to_batches()[0]

    online.batch_size = 1
    online.write_view(view, batches())
    out = online.read(["race:f00"], [{"user_id": i} for i in (1, 2, 3, 4)], now=T0)
    assert out["f00"] == [10.0, 2.0, 2.0, 40.0]
    assert online.metadata("race")["version"] == 2


def test_overlapping_full_builds_keep_the_newer_one(client, online):
    view = _wide_view("twice", 1)
    online.views[view.name] = view
    online.write_view(view, _wide_table([1, 2], 1.0, T0, 1))
    other = RedisOnlineStore(client, project=online.project, views=[view])

    def batches():
        yield _wide_table([1], 2.0, T0, 1).to_batches()[0]
        other.write_view(view, _wide_table([1, 2], 3.0, T0, 1))  # starts and finishes meanwhile
        yield _wide_table([2], 2.0, T0, 1).to_batches()[0]

    with pytest.raises(OnlineStoreError, match="another full materialization started"):
        online.write_view(view, batches())
    assert online.read(["twice:f00"], [{"user_id": 1}, {"user_id": 2}], now=T0)["f00"] == [3.0, 3.0]
    keys = sorted(k.decode() for k in client.scan_iter(match=online.namespace + "*"))
    assert keys == [online.data_key("twice", 3), online.meta_key("twice")]
    assert online.metadata("twice")["version"] == 3 and online.metadata("twice")["building"] is None
    other.close()


def test_failed_full_build_keeps_the_previous_version(client, online):
    view = _wide_view("safe", 2)
    online.views[view.name] = view
    online.write_view(view, _wide_table([1, 2], 1.0, T0, 2))
    bad = _wide_table([3], 2.0, T0, 2).set_column(2, "f00", pa.array(["not a number"]))

    def batches():
        yield _wide_table([1, 2], 2.0, T0, 2).to_batches()[0]
        yield bad.to_batches()[0]

    with pytest.raises(TypeError, match="feature column 'f00' of type string cannot be stored as double"):
        online.write_view(view, batches())
    assert online.read(["safe:f00"], [{"user_id": 1}, {"user_id": 2}], now=T0)["f00"] == [1.0, 1.0]
    meta = online.metadata("safe")
    assert meta["version"] == 1 and meta["building"] is None
    assert not client.exists(online.data_key("safe", 2))
    # the next build works and gets a fresh version number
    assert online.write_view(view, _wide_table([1], 3.0, T0, 2))["version"] == 3


def test_old_versions_are_deleted_after_the_grace_period(client, online):
    view = _wide_view("retire", 1)
    online.views[view.name] = view
    online.retire_grace_seconds = 30.0
    for value in (1.0, 2.0):
        online.write_view(view, _wide_table([1], value, T0, 1))
    assert client.exists(online.data_key("retire", 1)) and online.metadata("retire")["retired_versions"] == [
        1
    ]
    assert online.reap_retired("retire") == []  # still within the grace period
    assert online.reap_retired(now=time.time() + 31) == [online.data_key("retire", 1)]
    assert not client.exists(online.data_key("retire", 1))
    assert online.metadata("retire")["retired_versions"] == []
    online.retire_grace_seconds = 0.0
    online.write_view(view, _wide_table([1], 3.0, T0, 1))
    assert not client.exists(online.data_key("retire", 2)) and client.exists(online.data_key("retire", 3))


def test_materialize_from_the_offline_store_matches_point_in_time(tmp_path, online):
    """Online values after materialize() equal the offline point-in-time values at the same moment."""
    import pandas as pd

    from ml_platform.featurestore import FeatureStore

    rows = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "updated_at": pd.to_datetime(
                [
                    T0 - timedelta(days=3),
                    T0 - timedelta(days=1),
                    T0 - timedelta(hours=1),
                    T0 + timedelta(hours=1),
                ],
                utc=True,
            ),
            "home_country": ["DE", "FR", None, "IT"],
            "account_age_days": [10, 12, 400, 1],
        }
    )
    (tmp_path / "users").mkdir()
    rows.to_parquet(tmp_path / "users" / "users.parquet", index=False)
    view = FeatureView(
        "user_profile",
        [user],
        FileSource("users/users.parquet", timestamp_field="updated_at"),
        schema=[Field("home_country", String), Field("account_age_days", Int64)],
        ttl=timedelta(days=2),
    )
    store = FeatureStore(tmp_path)
    store.apply([view])
    online.views[view.name] = view
    [result] = materialize(online, store, as_of=T0)
    assert result["rows"] == 2 and result["mode"] == "full"  # user 3 is in the future of as_of
    entity_rows = [{"user_id": i} for i in (1, 2, 3)]
    got = online.read(view.feature_refs(), entity_rows, now=T0)
    offline = store.get_historical_features(
        pd.DataFrame({"user_id": [1, 2, 3], "event_timestamp": [T0] * 3}), view.feature_refs()
    )
    expected = {
        "home_country": [None if pd.isna(v) else v for v in offline["home_country"]],
        "account_age_days": [None if pd.isna(v) else int(v) for v in offline["account_age_days"]],
    }
    assert got == {"user_id": [1, 2, 3], **expected}
    assert got["home_country"] == ["FR", None, None] and got["account_age_days"] == [12, 400, None]
    # incremental: only the entity whose event time is after the last as_of is written
    [inc] = materialize(online, store, as_of=T0 + timedelta(hours=2), mode="incremental")
    assert inc["mode"] == "incremental" and inc["rows"] == 1
    assert online.read(view.feature_refs(), [{"user_id": 3}], now=T0 + timedelta(hours=2))[
        "home_country"
    ] == ["IT"]
