"""Batch scoring's looked-up features read by row number (`serving.batch_positions`): the same
chunks, value for value and type for type, as the join that carries every feature, on the real
views; answers nulled by the TTL or by no earlier row; values gathered across skipped row groups."""

from __future__ import annotations

import contextlib
from datetime import timedelta

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ml_platform import features as fr
from ml_platform.featurestore import offline
from ml_platform.serving import batch
from ml_platform.serving.batch_features import chunk_reader, events_relation, stage_features
from ml_platform.serving.batch_positions import _row_groups
from ml_platform.serving.scoring import load_champion
from ml_platform.sources.generator import GeneratorConfig, write_day

try:
    from fixtures_platform import SMALL_CONFIG, tiny_platform  # tiny_platform: a fixture, used by name
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import SMALL_CONFIG, tiny_platform  # noqa: F401


@pytest.mark.parametrize("sizes", [[1000] * 10, [1000, 1000, 500, 1500, 2000, 4000]])  # equal groups, and not
def test_values_are_gathered_by_file_row_across_skipped_row_groups(tmp_path, sizes):
    path = tmp_path / "t.parquet"
    with pq.ParquetWriter(path, pa.schema([("v", pa.float64())])) as writer:
        start = 0
        for size in sizes:
            writer.write_table(pa.table({"v": np.arange(start, start + size) * 1.5}))
            start += size
    parquet = pq.ParquetFile(path)
    assert [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)] == sizes
    by_row = np.array([-1, 1500, 3700, 1200, -1, 9900, 3500])  # file rows matched by 7 events (-1: none)

    (groups,), index = _row_groups([parquet], by_row)

    holding = sorted({int(np.searchsorted(np.cumsum(sizes), r, side="right")) for r in by_row[by_row >= 0]})
    assert groups == holding and len(groups) < len(sizes)  # only the groups holding a match are read
    values = parquet.read_row_groups(groups, columns=["v"]).column("v").to_numpy()
    matched = by_row >= 0
    np.testing.assert_array_equal(values[index[matched]], by_row[matched] * 1.5)
    assert (index[~matched] == 0).all()


def test_a_match_near_a_group_boundary_reads_its_neighbour_too_and_every_group_read_needs_no_index(tmp_path):
    """The map of matched rows counts blocks of 64 rows: a match in a block across two groups
    reads both (the values still come from the right row); when every group is read, each
    event's index is its file row."""
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"v": np.arange(300) * 2.0}), path, row_group_size=100)
    parquet = pq.ParquetFile(path)

    (groups,), index = _row_groups([parquet], np.array([-1, 250, 201]))  # block 192..255 spans groups 1, 2
    assert groups == [1, 2]
    values = parquet.read_row_groups(groups, columns=["v"]).column("v").to_numpy()
    assert values[index].tolist() == [200.0, 500.0, 402.0]  # (the unmatched event's index is 0)

    (groups,), index = _row_groups([parquet], np.array([5, -1, 150, 299]))
    assert groups == [0, 1, 2] and index.tolist() == [5, 0, 150, 299]


def staged_chunks(store, model, day, tmp_path, by_number: bool):
    files = batch.raw_partition_files(store, day)
    columns_dir = tmp_path / f"columns_{by_number}" if by_number else None
    with contextlib.closing(
        batch._staging_connection(store, tmp_path / f"s_{by_number}.duckdb", None)
    ) as con:
        events_sql, _, columns = events_relation(con, files, model.contract.request_columns)
        staged = stage_features(con, store, model.contract.feature_refs, events_sql, columns_dir)
        chunks = list(chunk_reader(con, events_sql, columns, staged, 37))
    return staged, pa.Table.from_batches(chunks)


@pytest.fixture(scope="module")
def extra_days(tiny_platform):
    """Two generated days after the history: "late", 45 days on (every card holder's windowed
    features past their 30-day TTL, answered null; the profile view has no TTL and answers), and
    "new", the next day with twice the card holders (the new half has no earlier row: null)."""
    last = pd.to_datetime(tiny_platform.events[fr.EVENT_TS], utc=True).max().date()
    config = {k: v for k, v in SMALL_CONFIG.items() if k != "days"}
    late, new = last + timedelta(days=45), last + timedelta(days=1)
    write_day(GeneratorConfig(start=late, days=1, **config), late, tiny_platform.settings.raw_dir)
    config["n_users"] *= 2
    write_day(GeneratorConfig(start=new, days=1, **config), new, tiny_platform.settings.raw_dir)
    return {"late": late, "new": new, "last": last}


@pytest.mark.parametrize("which", ["last", "late", "new"])
def test_by_number_views_give_the_wide_joins_chunks_exactly(tiny_platform, extra_days, tmp_path, which):
    store, model = tiny_platform.store, load_champion(tiny_platform.registry)
    day = extra_days[which]

    wide_views, wide = staged_chunks(store, model, day, tmp_path, by_number=False)
    number_views, by_number = staged_chunks(store, model, day, tmp_path, by_number=True)

    # the aggregated views and the raw profile view (no TTL: it answers every day) took the
    # by-number path (on the late day no windowed feature row is young enough to answer: no join)
    taken = {v.view: v.positional is not None for v in number_views}
    windowed = ("user_transaction_stats", "merchant_transaction_stats", "user_merchant_stats")
    if which == "late":
        assert not any(taken[v] for v in windowed)
        assert all(v.table is None for v in number_views if v.view in windowed)
    else:
        assert all(taken[v] for v in windowed), taken
    assert taken["user_profile"] and not any(v.positional for v in wide_views)
    assert by_number.schema.equals(wide.schema)
    for name in wide.column_names:
        assert by_number.column(name).equals(wide.column(name)), name
    counts = wide.column("txn_count_30d")
    if which == "late":  # nulled by the TTL, not by a missing row: the profile still answers
        assert counts.null_count == len(wide)
        assert wide.column("account_age_days").null_count < len(wide)
    elif which == "new":  # answers, and nulls for the card holders with no earlier row
        assert 0 < counts.null_count < len(wide) and pc.max(counts).as_py() > 1
    else:  # card holders have history within the TTL (but a first-time one): real answers throughout
        assert counts.null_count <= len(wide) // 100 and pc.max(counts).as_py() > 1


def test_by_number_answers_by_hand_nulls_ttl_and_no_row(tmp_path):
    """Five lookups against a hand-made materialized table (two row groups): a match, a match
    whose value is null, a match past the TTL, a card holder with no row, a null count."""
    from featurestore_fixtures import T, user

    from ml_platform.featurestore import Field, FileSource
    from ml_platform.featurestore.definitions import FeatureView, Float64, Int64
    from ml_platform.serving.batch_positions import stage_positional

    path = tmp_path / "stats.parquet"
    ts = pa.timestamp("us", tz="UTC")
    rows = pa.table(
        {
            "user_id": pa.array([1, 1, 2], pa.int64()),
            "event_timestamp": pa.array(
                [T("2024-01-01 10:00"), T("2024-01-01 11:00"), T("2024-01-01 10:30")], ts
            ),
            "created_timestamp": pa.array([None, None, None], ts),
            "x": pa.array([1.5, None, 4.0], pa.float64()),
            "n": pa.array([1, 2, None], pa.int64()),
        }
    )
    pq.write_table(rows, path, row_group_size=2)
    view = FeatureView(
        name="stats",
        entities=[user],
        source=FileSource(path=str(path)),
        schema=[Field("x", Float64), Field("n", Int64)],
        ttl=timedelta(hours=1),
    )
    scan = offline.scan_sql(str(path), file_row_number=True)
    table = offline.materialized_feature_table(view, scan, extra=[f"file_row_number AS {offline.FILE_ROW}"])
    lookups = [(1, "10:30"), (1, "11:30"), (2, "12:00"), (3, "12:00"), (2, "11:00")]
    con = _entity_rows(lookups)

    staged = stage_positional(
        con, view, table, [path], ["x", "n"], (pa.float64(), pa.int64()), 5, tmp_path / "v", 2
    )
    x, n = staged.read(0, 5)
    staged.close()

    # 10:00's row; 11:00's row (x null there); 10:30's row is 90 min old: past the TTL; user 3 has
    # no row; 10:30's row within the TTL (n null there)
    assert x.to_pylist() == [1.5, None, None, None, 4.0]
    assert n.to_pylist() == [1, 2, None, None, None]
    assert staged.read(3, 5)[0].to_pylist() == [None, 4.0]  # a chunk's row range


def test_raw_source_by_number_by_hand_text_ttl_nulls_two_files(tmp_path):
    """A profile-like view read from its raw source (two Parquet files, a text column, a 2-hour
    TTL), joined by row number across the files: seven lookups computed by hand."""
    from featurestore_fixtures import T, user

    from ml_platform.featurestore import Field, FileSource
    from ml_platform.featurestore.definitions import FeatureView, Int64, String
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.serving.batch_positions import stage_positional, usable_types

    folder = tmp_path / "raw" / "profiles"
    folder.mkdir(parents=True)
    ts = pa.timestamp("us", tz="UTC")
    schema = pa.schema([("user_id", pa.int64()), ("updated_at", ts), ("home_country", pa.string()),
                        ("account_age_days", pa.int64())])  # fmt: skip
    at = [T(f"2024-01-01 {hm}") for hm in ("09:00", "09:30", "11:00", "08:00", "12:30")]
    # file rows 0..2, then 3..4: user 1 twice (its later age null), user 2's first country null
    pq.write_table(
        pa.table([[1, 2, 1], at[:3], ["FR", None, "DE"], [10, 20, None]], schema=schema), folder / "a.parquet"
    )
    pq.write_table(pa.table([[4, 2], at[3:], ["ES", "IT"], [40, 21]], schema=schema), folder / "b.parquet")
    view = FeatureView(
        name="profile",
        entities=[user],
        source=FileSource(path="raw/profiles", timestamp_field="updated_at", created_timestamp_column=None),
        schema=[Field("home_country", String), Field("account_age_days", Int64)],
        ttl=timedelta(hours=2),
    )
    store = FeatureStore(tmp_path)
    store.apply([user, view])
    lookups = [
        (1, "10:00"),
        (1, "11:30"),
        (2, "10:00"),
        (2, "13:00"),
        (3, "12:00"),
        (4, "11:00"),
        (1, "08:00"),
    ]
    con = _entity_rows(lookups)

    table, files = store.numbered_feature_table(con, view)
    assert [f.name for f in files] == ["a.parquet", "b.parquet"]
    features = ["home_country", "account_age_days"]
    types = usable_types(files, features, {"home_country": "VARCHAR", "account_age_days": "BIGINT"})
    assert types == (pa.string(), pa.int64())
    staged = stage_positional(con, view, table, files, features, types, len(lookups), tmp_path / "v", 2)
    country, age = staged.read(0, len(lookups))
    tail = staged.read(3, 5)
    staged.close()

    # 09:00's row; 11:00's (age null there); 09:30's (country null there); file b's 12:30 row;
    # user 3 has no row; user 4's 08:00 row is 3 hours old: past the TTL; nothing before 08:00
    assert country.type == pa.string() and age.type == pa.int64()
    assert country.to_pylist() == ["FR", "DE", None, "IT", None, None, None]
    assert age.to_pylist() == [10, None, 20, 21, None, None, None]
    assert [a.to_pylist() for a in tail] == [["IT", None], [21, None]]  # a chunk's row range


def _entity_rows(lookups: list[tuple[int, str]]):
    """A connection holding the entity rows point_in_time_sql joins from: (user, "HH:MM" on
    2024-01-01) numbered 0..n-1 in this order."""
    from featurestore_fixtures import T

    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute(
        f"CREATE TEMP TABLE {offline.ENTITY_TABLE} ({offline.ROW_ID} BIGINT, user_id BIGINT, "
        f"{offline.ENTITY_TS} TIMESTAMPTZ)"
    )
    for i, (u, hm) in enumerate(lookups):
        con.execute(f"INSERT INTO {offline.ENTITY_TABLE} VALUES (?, ?, ?)", [i, u, T(f"2024-01-01 {hm}")])
    return con
