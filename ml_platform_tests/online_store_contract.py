"""The contract every `OnlineStore` implementation must pass (as Feast does for its online stores).

Use it by subclassing `OnlineStoreContract` in a `test_*.py` module and providing an `open_store`
fixture: a function `(views, namespace) -> OnlineStore` giving a handle on the store of
`namespace` (two calls with the same namespace are two handles on the same data, as two processes
would be). The base class makes a fresh namespace per test and tears it down with
`delete_project()`. `ml_platform_tests/test_online_store_contract.py` runs it on RedisOnlineStore.

What is checked: every value type round-trips exactly (from Arrow and from Python rows), nulls and
NaN stay distinct, TTL expiry (the boundary is kept), unknown entities, a full write replaces
(never merges), a failed full write leaves the previous version serving, a read across two views
is one snapshot while a writer flips versions, views of different join keys stay one version
each while both are rebuilt, metadata and teardown.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest

from ml_platform.featurestore.definitions import (
    Bool,
    Entity,
    FeatureView,
    Field,
    FileSource,
    Float32,
    Float64,
    Int32,
    Int64,
    String,
    UnixTimestamp,
)
from ml_platform.featurestore.online import (
    NOT_FOUND,
    OUTSIDE_MAX_AGE,
    PRESENT,
    OnlineStore,
    OnlineStoreError,
)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TS = pa.timestamp("us", tz="UTC")
SOURCE = FileSource("unused.parquet")
user = Entity("user", join_keys=["user_id"])
merchant = Entity("merchant", join_keys=["merchant_id"])

# One feature of every value type, with extreme and awkward values per type.
every_type = FeatureView(
    "every_type",
    [user],
    SOURCE,
    schema=[
        Field("f64", Float64),
        Field("f32", Float32),
        Field("i64", Int64),
        Field("i32", Int32),
        Field("flag", Bool),
        Field("at", UnixTimestamp),
        Field("text", String),
    ],
    ttl=timedelta(hours=1),
)
EVERY_TYPE_REFS = every_type.feature_refs()
EVERY_TYPE_ROWS = [  # user_id 1..4, all fresh at T0; row 4 is all nulls
    {
        "user_id": 1,
        "event_timestamp": T0,
        "f64": 0.1,
        "f32": 0.5,
        "i64": 2**63 - 1,
        "i32": 2**31 - 1,
        "flag": True,
        "at": datetime(2020, 2, 29, 23, 59, 59, 999_999, tzinfo=UTC),
        "text": "Ünïcødé-ß 🚀",
    },
    {
        "user_id": 2,
        "event_timestamp": T0 - timedelta(minutes=1),
        "f64": -1e308,
        "f32": -1.25,
        "i64": -(2**63),
        "i32": -(2**31),
        "flag": False,
        "at": datetime(1969, 12, 31, 23, 59, 59, 1, tzinfo=UTC),
        "text": "",
    },
    {
        "user_id": 3,
        "event_timestamp": T0 - timedelta(minutes=2),
        "f64": float("inf"),
        "f32": 3.0,
        "i64": 0,
        "i32": 7,
        "flag": True,
        "at": T0,
        "text": "a" * 300,
    },
    {
        "user_id": 4,
        "event_timestamp": T0 - timedelta(minutes=3),
        **{f.name: None for f in every_type.schema},
    },
]


def wide_view(name: str, n_features: int = 3, ttl: timedelta | None = None) -> FeatureView:
    return FeatureView(
        name, [user], SOURCE, schema=[Field(f"f{i:02d}", Float64) for i in range(n_features)], ttl=ttl
    )


def wide_table(ids: Sequence[int], value: float, ts: datetime, n_features: int = 3) -> pa.Table:
    cols = {"user_id": pa.array(ids, pa.int64()), "event_timestamp": pa.array([ts] * len(ids), TS)}
    for i in range(n_features):
        cols[f"f{i:02d}"] = pa.array([value] * len(ids), pa.float64())
    return pa.table(cols)


def every_type_table(rows=EVERY_TYPE_ROWS) -> pa.Table:
    types = {"user_id": pa.int64(), "event_timestamp": TS, "f64": pa.float64(), "f32": pa.float32()}
    types |= {"i64": pa.int64(), "i32": pa.int32(), "flag": pa.bool_(), "at": TS, "text": pa.string()}
    return pa.table({c: pa.array([r[c] for r in rows], t) for c, t in types.items()})


def expected_every_type(rows=EVERY_TYPE_ROWS) -> dict[str, list]:
    return {
        "user_id": [r["user_id"] for r in rows],
        **{f.name: [r[f.name] for r in rows] for f in every_type.schema},
    }


def check_snapshot(out: dict[str, list], view_columns: dict[str, str]) -> dict[str, float]:
    """The generation each view was read at, after checking that every entity of a view came
    from one version (one value, none missing). `view_columns`: view -> its output column."""
    generations = {}
    for view, column in view_columns.items():
        values = set(out[column])
        if None in values:
            raise AssertionError(f"view {view}: an entity was missing during a version flip: {values}")
        if len(values) != 1:
            raise AssertionError(f"view {view}: one read mixed versions: {sorted(values)}")
        generations[view] = values.pop()
    return generations


def check_flip_order(first: float, second: float) -> None:
    """The writer flips `first`'s view to generation g, then `second`'s: a snapshot read sees
    (g, g) or (g, g-1), never the second view ahead nor more than one flip apart."""
    if not (first == second or first == second + 1):
        raise AssertionError(
            f"read across two views is not one snapshot: first view at generation {first}, second at {second}"
        )


class OnlineStoreContract:
    """Subclass with an `open_store` fixture (see the module docstring)."""

    @pytest.fixture()
    def open_store(self):
        raise NotImplementedError("provide an open_store fixture: (views, namespace) -> OnlineStore")

    @pytest.fixture()
    def namespace(self) -> str:
        return f"contract_{uuid.uuid4().hex[:12]}"

    @pytest.fixture()
    def store(self, open_store, namespace):
        s = open_store([every_type], namespace)
        yield s
        s.delete_project()
        assert s.materialized_views() == []
        s.close()

    # ---- values

    def test_implements_the_protocol(self, store):
        assert isinstance(store, OnlineStore)

    def test_every_value_type_round_trips_from_arrow(self, store):
        result = store.write_view(every_type, every_type_table(), as_of=T0)
        assert result["rows"] == 4 and result["mode"] == "full"
        out = store.read(EVERY_TYPE_REFS, [{"user_id": i} for i in (1, 2, 3, 4)], now=T0)
        assert out == expected_every_type()
        assert list(out) == ["user_id", *[f.name for f in every_type.schema]]  # join keys first
        assert [type(v) for v in out["i64"][:3]] == [int, int, int]  # not through float64

    def test_every_value_type_round_trips_from_python_rows(self, store):
        store.write_view(every_type, every_type_table(EVERY_TYPE_ROWS[3:]), as_of=T0)  # materialized
        later = [{**r, "event_timestamp": T0 + timedelta(seconds=1)} for r in EVERY_TYPE_ROWS]
        assert store.update_entities(every_type, later) == {"rows": 4, "written": 4}
        out = store.read(
            EVERY_TYPE_REFS, [{"user_id": i} for i in (1, 2, 3, 4)], now=T0, include_event_timestamps=True
        )
        assert out == {
            **expected_every_type(),
            "every_type__event_timestamp": [T0 + timedelta(seconds=1)] * 4,
        }

    def test_nulls_and_nan_stay_distinct(self, store):
        rows = [
            {**EVERY_TYPE_ROWS[0], "user_id": 10, "f64": float("nan"), "f32": float("nan")},
            {**EVERY_TYPE_ROWS[3], "user_id": 11},
        ]
        store.write_view(every_type, every_type_table(rows))
        out = store.read(EVERY_TYPE_REFS, [{"user_id": 10}, {"user_id": 11}], now=T0, include_status=True)
        assert math.isnan(out["f64"][0]) and math.isnan(out["f32"][0])
        assert {f.name: out[f.name][1] for f in every_type.schema} == {
            f.name: None for f in every_type.schema
        }
        assert out["every_type__status"] == [PRESENT, PRESENT]  # all-null features are still a value

    # ---- entities and freshness

    def test_missing_entities_order_and_duplicates(self, store):
        store.write_view(every_type, every_type_table())
        rows = [{"user_id": 2}, {"user_id": 999}, {"user_id": 1}, {"user_id": 2}, {"user_id": -1}]
        out = store.read(["every_type:i32"], rows, now=T0, include_status=True, include_event_timestamps=True)
        assert out["user_id"] == [2, 999, 1, 2, -1]
        assert out["i32"] == [-(2**31), None, 2**31 - 1, -(2**31), None]
        assert out["every_type__status"] == [PRESENT, NOT_FOUND, PRESENT, PRESENT, NOT_FOUND]
        t2 = T0 - timedelta(minutes=1)
        assert out["every_type__event_timestamp"] == [t2, None, T0, t2, None]
        assert store.read(["every_type:i32"], [], now=T0) == {"user_id": [], "i32": []}
        assert store.read({"every_type": ["i32"]}, [{"user_id": 1}], full_feature_names=True, now=T0) == {
            "user_id": [1],
            "every_type__i32": [2**31 - 1],
        }

    def test_ttl_expiry_keeps_the_boundary(self, store):
        store.write_view(every_type, every_type_table())  # ttl 1 h; user 1 at T0, user 2 at T0 - 1 min
        at_boundary = T0 + timedelta(hours=1)
        out = store.read(
            ["every_type:i64"],
            [{"user_id": 1}, {"user_id": 2}],
            now=at_boundary,
            include_status=True,
            include_event_timestamps=True,
        )
        assert out["i64"] == [2**63 - 1, None]
        assert out["every_type__status"] == [PRESENT, OUTSIDE_MAX_AGE]
        assert out["every_type__event_timestamp"] == [T0, T0 - timedelta(minutes=1)]  # the age is reported
        past = store.read(
            ["every_type:i64"],
            [{"user_id": 1}],
            now=at_boundary + timedelta(microseconds=1),
            include_status=True,
        )
        assert past["i64"] == [None] and past["every_type__status"] == [OUTSIDE_MAX_AGE]
        assert store.read(["every_type:i64"], [{"user_id": 1}], now=T0.timestamp())["i64"] == [
            2**63 - 1
        ]  # epoch seconds
        assert store.read(["every_type:i64"], [{"user_id": 1}])["i64"] == [None]  # wall clock: years later

    def test_a_view_without_ttl_never_expires(self, open_store, namespace):
        forever = wide_view("forever", 1, ttl=None)
        s = open_store([forever], namespace)
        try:
            s.write_view(forever, wide_table([1], 4.0, datetime(2000, 1, 1, tzinfo=UTC), 1))
            assert s.read(["forever:f00"], [{"user_id": 1}], include_status=True) == {
                "user_id": [1],
                "f00": [4.0],
                "forever__status": [PRESENT],
            }
        finally:
            s.delete_project()

    # ---- versions

    def test_full_write_replaces_the_view(self, store):
        store.write_view(every_type, every_type_table())
        first = store.metadata("every_type")["version"]
        store.write_view(every_type, every_type_table(EVERY_TYPE_ROWS[2:3]))  # only user 3 now
        out = store.read(["every_type:i32"], [{"user_id": 1}, {"user_id": 3}], now=T0, include_status=True)
        assert out["i32"] == [None, 7] and out["every_type__status"] == [NOT_FOUND, PRESENT]
        meta = store.metadata("every_type")
        assert meta["version"] > first and meta["rows"] == 1

    def test_failed_full_write_keeps_the_previous_version(self, store):
        store.write_view(every_type, every_type_table())
        version = store.metadata("every_type")["version"]

        def source_that_breaks():
            yield every_type_table(EVERY_TYPE_ROWS[:1]).to_batches()[0]
            raise ConnectionError("the offline store went away mid-read")

        with pytest.raises(ConnectionError, match="went away"):
            store.write_view(every_type, source_that_breaks())
        bad = every_type_table().set_column(2, "f64", pa.array(["x", "y", "z", "w"]))
        with pytest.raises(TypeError, match="'f64'"):
            store.write_view(every_type, bad)
        out = store.read(EVERY_TYPE_REFS, [{"user_id": i} for i in (1, 2, 3, 4)], now=T0)
        assert out == expected_every_type()
        assert store.metadata("every_type")["version"] == version
        assert store.write_view(every_type, every_type_table())["version"] > version  # and it recovers

    def test_snapshot_read_across_two_views_while_a_writer_flips(self, open_store, namespace):
        """A writer flips view A to generation g, then view B to g, for g = 1..8, while a reader
        reads both views for 200 entities in one call. Every read must see each view at one
        version (no mix within a view, no missing entity) and the pair at a moment in the writer's
        order: (g, g) or (g, g-1), never B ahead of A."""
        a, b = wide_view("snap_a"), wide_view("snap_b")
        writer, reader = open_store([a, b], namespace), open_store([a, b], namespace)
        ids = list(range(3000))
        probe = [{"user_id": i} for i in range(0, 3000, 15)]
        try:
            for view in (a, b):
                writer.write_view(view, wide_table(ids, 0.0, T0))
            seen: list[tuple[float, float]] = []
            errors: list[BaseException] = []
            done = threading.Event()
            read_since_flip = threading.Event()  # the reader keeps up, also on a loaded machine

            def write_generations():
                try:
                    for g in range(1, 9):
                        read_since_flip.wait(timeout=10)
                        read_since_flip.clear()
                        for view in (a, b):
                            writer.write_view(view, wide_table(ids, float(g), T0 + timedelta(seconds=g)))
                except Exception as exc:  # noqa: BLE001 - the main thread asserts there was none
                    errors.append(exc)
                finally:
                    done.set()

            thread = threading.Thread(target=write_generations)
            switch = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)  # hand the GIL over often, so reads and flips interleave
            thread.start()
            try:
                while not done.is_set():
                    out = reader.read(["snap_a:f00", "snap_b:f00"], probe, now=T0, full_feature_names=True)
                    gen = check_snapshot(out, {"snap_a": "snap_a__f00", "snap_b": "snap_b__f00"})
                    check_flip_order(gen["snap_a"], gen["snap_b"])
                    seen.append((gen["snap_a"], gen["snap_b"]))
                    read_since_flip.set()
            finally:
                thread.join()
                sys.setswitchinterval(switch)
            assert errors == []
            final = reader.read(["snap_a:f00", "snap_b:f00"], probe, now=T0, full_feature_names=True)
            assert check_snapshot(final, {"snap_a": "snap_a__f00", "snap_b": "snap_b__f00"}) == {
                "snap_a": 8.0,
                "snap_b": 8.0,
            }
            # The reader really ran during the flips: it saw both views at one generation and A ahead.
            assert any(x == y + 1 for x, y in seen), f"no read between two flips: {sorted(set(seen))}"
            assert len({x for x, _ in seen}) >= 3, f"too few generations seen: {sorted(set(seen))}"
        finally:
            writer.delete_project()
            reader.close()
            writer.close()

    def test_snapshot_read_is_one_moment_even_if_flips_happen_during_the_call(self, open_store, namespace):
        """Deterministic companion of the test above: the entity rows themselves flip both views
        (A then B, to generation 1) the first time they are read again after one full pass over
        them, i.e. in the middle of the read call. An implementation that reads one view after the
        other sees A old and B new; a snapshot read sees both old (flips after the snapshot) or
        both new (flips before it)."""
        a, b = wide_view("mid_a"), wide_view("mid_b")
        writer, reader = open_store([a, b], namespace), open_store([a, b], namespace)
        ids = list(range(50))
        try:
            for view in (a, b):
                writer.write_view(view, wide_table(ids, 0.0, T0))
            state = {"reads": 0, "flipped": False}

            class FlipsOnSecondPass(dict):
                def __getitem__(self, key):
                    state["reads"] += 1
                    if state["reads"] > len(ids) and not state["flipped"]:
                        state["flipped"] = True
                        for view in (a, b):
                            writer.write_view(view, wide_table(ids, 1.0, T0 + timedelta(seconds=1)))
                    return super().__getitem__(key)

            rows = [FlipsOnSecondPass(user_id=i) for i in ids]
            out = reader.read(["mid_a:f00", "mid_b:f00"], rows, now=T0, full_feature_names=True)
            gen = check_snapshot(out, {"mid_a": "mid_a__f00", "mid_b": "mid_b__f00"})
            assert state["flipped"], "the rows were read only once: the flips did not happen mid-read"
            assert gen["mid_a"] == gen["mid_b"], f"one read saw two moments: {gen}"
            after = reader.read(
                ["mid_a:f00", "mid_b:f00"], [{"user_id": i} for i in ids], now=T0, full_feature_names=True
            )
            assert check_snapshot(after, {"mid_a": "mid_a__f00", "mid_b": "mid_b__f00"}) == {
                "mid_a": 1.0,
                "mid_b": 1.0,
            }
        finally:
            writer.delete_project()
            reader.close()
            writer.close()

    def test_views_of_different_join_keys_each_stay_one_version_while_a_writer_flips(
        self, open_store, namespace
    ):
        """A user view and a (user, merchant) view, rebuilt again and again while a reader reads
        both: each view must come back from one version (no mix, no missing entity). (Their
        relative order is only promised for views with the same join keys on Redis Cluster, see
        docs/online_store.md, so it is not checked here.)"""
        user_view = wide_view("dk_user", 1)
        pair = FeatureView("dk_pair", [user, merchant], SOURCE, schema=[Field("n", Int64)])
        writer, reader = open_store([user_view, pair], namespace), open_store([user_view, pair], namespace)
        ids = list(range(1000))

        def pair_rows(g):
            return [{"user_id": u, "merchant_id": u % 13, "event_timestamp": T0, "n": g} for u in ids]

        probe = [{"user_id": u, "merchant_id": u % 13} for u in range(0, 1000, 7)]
        try:
            writer.write_view(user_view, wide_table(ids, 0.0, T0, 1))
            writer.write_view(pair, pair_rows(0))
            done, errors, seen = threading.Event(), [], set()
            read_since_flip = threading.Event()  # the reader keeps up: every generation is read

            def flips():
                try:
                    for g in range(1, 7):
                        read_since_flip.wait(timeout=10)
                        read_since_flip.clear()
                        writer.write_view(user_view, wide_table(ids, float(g), T0, 1))
                        writer.write_view(pair, pair_rows(g))
                except Exception as exc:  # noqa: BLE001 - asserted below
                    errors.append(exc)
                finally:
                    done.set()

            switch = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)
            thread = threading.Thread(target=flips)
            thread.start()
            try:
                while not done.is_set():
                    out = reader.read(["dk_user:f00", "dk_pair:n"], probe, now=T0)
                    gen = check_snapshot(out, {"dk_user": "f00", "dk_pair": "n"})
                    seen.add((gen["dk_user"], gen["dk_pair"]))
                    read_since_flip.set()
            finally:
                thread.join()
                sys.setswitchinterval(switch)
            assert errors == []
            assert len({u for u, _ in seen}) >= 3, f"too few generations seen: {sorted(seen)}"
        finally:
            writer.delete_project()
            reader.close()
            writer.close()

    # ---- lifecycle and errors

    def test_metadata_materialized_views_and_teardown(self, store):
        assert store.metadata("every_type") == {} and store.materialized_views() == []
        with pytest.raises(OnlineStoreError, match="'every_type' has not been materialized"):
            store.read(EVERY_TYPE_REFS, [{"user_id": 1}])
        store.write_view(every_type, every_type_table(), as_of=T0)
        meta = store.metadata("every_type")
        assert (
            meta["as_of"] == T0
            and meta["rows"] == 4
            and meta["features"] == [f.name for f in every_type.schema]
        )
        assert store.materialized_views() == ["every_type"]
        assert store.delete_project() > 0
        assert store.metadata("every_type") == {} and store.materialized_views() == []
        with pytest.raises(OnlineStoreError, match="has not been materialized"):
            store.read(EVERY_TYPE_REFS, [{"user_id": 1}])

    def test_unknown_feature_and_bad_entity_rows_name_the_problem(self, store):
        store.write_view(every_type, every_type_table())
        with pytest.raises(ValueError, match=r"has no feature \['nope'\]"):
            store.read(["every_type:nope"], [{"user_id": 1}])
        with pytest.raises(ValueError, match="entity row 1 has no join key 'user_id'"):
            store.read(EVERY_TYPE_REFS, [{"user_id": 1}, {"merchant_id": 1}])
        with pytest.raises(ValueError, match="'user_id' must be a 64-bit integer, got 'abc'"):
            store.read(EVERY_TYPE_REFS, [{"user_id": "abc"}])

    def test_read_async_gives_the_same_values(self, store):
        store.write_view(every_type, every_type_table())
        out = asyncio.run(
            store.read_async(EVERY_TYPE_REFS, [{"user_id": i} for i in (1, 2, 3, 4, 5)], now=T0)
        )
        expected = expected_every_type()
        assert out == {k: [*v, 5 if k == "user_id" else None] for k, v in expected.items()}
