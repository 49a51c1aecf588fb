"""Incremental offline materialization (`featurestore.incremental`) against the full query: on the
generator's daily partitions, every change the daily pipeline makes (a new day, labels merged
into a recent partition, a partition rewritten or removed far back) gives exactly the table a full
recompute gives, every row and value, while recomputing only from where the source changed; an
untouched source leaves the table as it is; float sums, a new definition or `full=True` recompute
everything."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ml_platform import features as fr
from ml_platform.featurestore import Aggregation, FeatureStore, FeatureView, incremental
from ml_platform.sources.generator import TRANSACTIONS_ARROW_SCHEMA, GeneratorConfig, write_dataset

AGGREGATED = [v.name for v in fr.FEATURE_VIEWS if v.aggregations]
DAYS = 40


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """DAYS + 1 days of the generator's events; the store starts with the first DAYS."""
    root = tmp_path_factory.mktemp("incremental")
    write_dataset(
        GeneratorConfig(n_users=150, n_merchants=110, days=DAYS + 1, seed=3, fraud_rate=0.05, label_maturity_days=2),
        root / "raw",
    )
    return root / "raw"


@pytest.fixture()
def store(tmp_path, generated) -> FeatureStore:
    raw = tmp_path / "raw"
    shutil.copytree(generated, raw)
    days = sorted((raw / "transactions").iterdir())
    shutil.move(str(days[-1]), str(tmp_path / days[-1].name))  # the day that arrives later
    age(raw)  # written an hour ago: not racy (see test_a_file_modified_right_before_its_listing...)
    fs = FeatureStore(tmp_path, duckdb_threads=1)
    fs.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    for name in AGGREGATED:
        assert fs.materialize_offline(name)["mode"] == "full"
    return fs


def age(folder: Path, seconds: float = 3600) -> None:
    """Set every file's mtime `seconds` back, as if it had been written then."""
    for f in folder.rglob("*.parquet"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def partitions(fs: FeatureStore) -> list[Path]:
    return sorted((fs.repo_path / "raw" / "transactions").iterdir())


def assert_equals_a_full_recompute(fs: FeatureStore, name: str) -> int:
    """The table now, against the same view recomputed in full from the same files: no row of one
    missing from the other, every value the same (EXCEPT ALL both ways); the row count."""
    path = fs.offline_table_path(name)
    kept = path.with_name(f"{name}.incremental.parquet")
    shutil.copy(path, kept)
    assert fs.materialize_offline(name, full=True)["mode"] == "full"
    con = duckdb.connect()
    a, b = f"read_parquet('{kept}')", f"read_parquet('{path}')"
    rows = con.execute(f"SELECT count(*) FROM {a}").fetchone()[0]
    assert rows == con.execute(f"SELECT count(*) FROM {b}").fetchone()[0] > 100
    for x, y in ((a, b), (b, a)):
        assert con.execute(f"SELECT count(*) FROM (SELECT * FROM {x} EXCEPT ALL SELECT * FROM {y})").fetchone() == (0,)
    kept.unlink()
    return rows


def test_an_untouched_source_leaves_every_table_as_it_is(store):
    before = {n: store.offline_table_path(n).read_bytes() for n in AGGREGATED}
    for name in AGGREGATED:
        result = store.materialize_offline(name)
        assert (result["mode"], result["recomputed_from"], result["changed_files"]) == ("unchanged", None, 0)
        assert result["rows"] == pq.ParquetFile(store.offline_table_path(name)).metadata.num_rows
        assert store.offline_table_path(name).read_bytes() == before[name]


def test_a_new_day_and_labels_merged_into_recent_days_recompute_from_the_earliest_change(store):
    """What the daily pipeline does: day 41 arrives, and labels of days 38-40 arrive in their
    partitions (rewritten). The transactions views recompute from day 38's first event; the labels
    view from the earliest label time among the old and new versions of those partitions."""
    parts = partitions(store)
    shutil.move(str(store.repo_path / f"date={_day(store, DAYS + 1)}"), str(parts[0].parent))
    recent = parts[-3:]
    new_label_time = pd.Timestamp(_day(store, DAYS + 1), tz="UTC") + pd.Timedelta(hours=12)
    first_event = {}
    for part in recent:
        frame = pd.read_parquet(part).drop(columns=["date"], errors="ignore")
        unlabeled = frame["label_timestamp"].isna()
        frame.loc[unlabeled, "is_fraud"] = 0.0
        frame.loc[unlabeled, "label_timestamp"] = new_label_time
        first_event[part.name] = frame["event_timestamp"].min()
        _rewrite(part, frame)
    for name in AGGREGATED:
        result = store.materialize_offline(name)
        assert result["mode"] == "incremental" and result["changed_files"] == 4, result
        since = pd.Timestamp(result["recomputed_from"])
        if name == "merchant_fraud_stats":  # labels: the earliest label time in those partitions
            assert since >= min(first_event.values())
        else:
            assert since == min(first_event.values())  # day 38's first transaction
        assert assert_equals_a_full_recompute(store, name) == result["rows"]


def test_a_partition_rewritten_or_removed_far_back_recomputes_from_there(store):
    parts = partitions(store)
    frame = pd.read_parquet(parts[9]).drop(columns=["date"], errors="ignore")
    frame["amount"] = (frame["amount"] * 2).round(2)  # a re-import with other amounts
    _rewrite(parts[9], frame)
    result = store.materialize_offline("user_transaction_stats")
    assert result["mode"] == "incremental"
    assert pd.Timestamp(result["recomputed_from"]) == frame["event_timestamp"].min()
    assert_equals_a_full_recompute(store, "user_transaction_stats")
    first_of_day_5 = pd.read_parquet(parts[4])["event_timestamp"].min()
    shutil.rmtree(parts[4])  # a day removed: its rows' features must go, and their successors'
    result = store.materialize_offline("merchant_transaction_stats")
    assert result["mode"] == "incremental" and pd.Timestamp(result["recomputed_from"]) == first_of_day_5
    assert_equals_a_full_recompute(store, "merchant_transaction_stats")


def test_float_sums_a_new_definition_and_full_true_recompute_everything(store):
    assert store.materialize_offline("user_merchant_stats", full=True)["mode"] == "full"
    floats = FeatureView(
        "float_spend", entities=[fr.user], source=fr.transactions_source,
        aggregations=[Aggregation("sum", dt.timedelta(days=1), "amount", name="spend_24h")],  # no decimals
    )
    store.apply([floats])
    assert [store.materialize_offline("float_spend")["mode"] for _ in range(2)] == ["full", "full"]
    redefined = FeatureView(
        "user_merchant_stats", entities=[fr.user, fr.merchant], source=fr.transactions_source,
        aggregations=[Aggregation("count", dt.timedelta(days=7), name="user_merchant_txn_count_30d")],
    )
    store.apply([redefined])
    assert store.materialize_offline("user_merchant_stats")["mode"] == "full"  # another fingerprint
    assert store.materialize_offline("user_merchant_stats")["mode"] == "unchanged"


def _day(fs: FeatureStore, number: int) -> str:
    """The date of generated day `number` (1-based), from the partition names."""
    first = dt.date.fromisoformat(partitions(fs)[0].name.removeprefix("date="))
    return (first + dt.timedelta(days=number - 1)).isoformat()


def _rewrite(folder: Path, frame: pd.DataFrame) -> None:
    """Replace a day partition's files by one file with `frame` (as the label feed does)."""
    for f in folder.glob("*.parquet"):
        f.unlink()
    table = pa.Table.from_pandas(frame[TRANSACTIONS_ARROW_SCHEMA.names], schema=TRANSACTIONS_ARROW_SCHEMA,
                                 preserve_index=False)
    pq.write_table(table, folder / "part-0.parquet")


def test_a_file_modified_right_before_its_listing_counts_as_changed_next_time():
    """A rewrite within the file system's timestamp granularity can keep size, mtime and inode:
    a file whose recorded mtime is within RACY_S of the listing compares as changed."""
    listed = 10**18
    old, racy = listed - int(incremental.RACY_S * 1e9) - 1, listed - 1
    text = incremental.encode_record({"a": (10, old, 1), "b": (20, racy, 2)}, {"a": 100, "b": 200}, listed)
    recorded = incremental.decode_record(text)
    step = incremental.plan(recorded, {"a": (10, old, 1), "b": (20, racy, 2)}, lambda files: {f: 200 for f in files})
    assert (step.mode, step.since_us, step.changed_files) == ("incremental", 200, 1)  # b only
    assert incremental.plan(recorded, {"a": (10, old, 1)}, lambda files: {}).since_us == 200  # b removed
    assert incremental.decode_record("not json") is None and incremental.decode_record(None) is None


def test_an_unreadable_table_is_recomputed_whole(store):
    path = store.offline_table_path("user_merchant_stats")
    rows = pq.ParquetFile(path).metadata.num_rows
    path.write_bytes(b"not parquet")
    result = store.materialize_offline("user_merchant_stats")
    assert (result["mode"], result["rows"]) == ("full", rows)
