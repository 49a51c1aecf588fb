"""The online/offline skew check against a real platform (generated events, offline views, Redis):
silent on a correct materialization, loud on a deliberately broken transformation."""

from __future__ import annotations

import json
from datetime import timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from ml_platform import features as fr
from ml_platform.featurestore.definitions import Aggregation, FeatureView, FileSource
from ml_platform.featurestore.skew import (
    MISSING_ONLINE,
    NULL_VS_VALUE,
    TIMESTAMP,
    VALUE,
    check_online_offline_skew,
)
from ml_platform.featurestore.store import FeatureStore

try:
    from fixtures_platform import tiny_platform  # a pytest fixture, used by name
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import tiny_platform  # noqa: F401

USER_STATS = fr.user_transaction_stats.name
ALL_VIEWS = [v.name for v in fr.FEATURE_VIEWS]


@pytest.fixture()
def platform(tiny_platform):
    """The module's platform; every test leaves the online store as a correct full materialization."""
    yield tiny_platform
    tiny_platform.store.materialize(as_of=tiny_platform.materialized_as_of)


def offline_latest(platform, view: str) -> pa.Table:
    return platform.store.latest_features(view, platform.materialized_as_of)


def test_no_skew_after_a_full_materialization(platform):
    report = check_online_offline_skew(platform.store, sample_size=10_000)
    assert report.ok, report.summary()
    assert report.mismatches == [] and report.mismatch_count == 0 and report.problems == []
    assert set(report.views) == set(ALL_VIEWS)
    # Every entity that has offline values was compared (sample_size exceeds them all).
    for name in ALL_VIEWS:
        expected = offline_latest(platform, name).num_rows
        assert expected > 0
        assert report.views[name]["offline_entities"] == expected == report.views[name]["sampled"]
    n_features = sum(report.views[v.name]["sampled"] * len(v.feature_names) for v in fr.FEATURE_VIEWS)
    assert report.sampled == sum(report.views[v]["sampled"] for v in ALL_VIEWS)
    assert report.compared_values == n_features
    meta = report.to_metadata()
    json.dumps(meta)  # metadata-ready
    assert meta["ok"] is True and meta["mismatching_values"] == 0
    assert report.summary().startswith("No skew")


def test_sampling_is_bounded_and_reproducible(platform):
    a = check_online_offline_skew(platform.store, views=[USER_STATS], sample_size=25, seed=3)
    b = check_online_offline_skew(platform.store, views=[fr.user_transaction_stats], sample_size=25, seed=3)
    assert a.ok and a.sampled == b.sampled == 25 and list(a.views) == [USER_STATS]
    assert a.compared_values == 25 * len(fr.user_transaction_stats.feature_names)


def test_a_broken_window_in_the_online_transformation_is_caught(platform, tmp_path):
    """The online values come from a variant whose `txn_count_30d` counts over 7 days (a typo in
    a window): the check fails and names exactly that view and feature."""
    good = fr.user_transaction_stats
    aggs = [
        Aggregation("count", timedelta(days=7), name="txn_count_30d") if a.name == "txn_count_30d" else a
        for a in good.aggregations
    ]
    raw = str(platform.settings.data_dir / fr.TRANSACTIONS_PATH)
    source = FileSource(path=raw, timestamp_field=fr.EVENT_TS, created_timestamp_column=fr.CREATED_TS)
    broken = FeatureView(good.name, list(good.entities), source, ttl=good.ttl, aggregations=aggs)
    broken_store = FeatureStore(tmp_path / "broken_repo", duckdb_threads=1)
    broken_store.apply([broken])
    broken_store.materialize_offline(good.name)
    broken_values = broken_store.latest_features(good.name, platform.materialized_as_of)
    platform.online.write_view(good, broken_values, mode="full", as_of=platform.materialized_as_of)

    report = check_online_offline_skew(platform.store, sample_size=1000)
    assert not report.ok
    assert {(e["view"], e["feature"], e["kind"]) for e in report.mismatches} == {
        (good.name, "txn_count_30d", VALUE)
    }
    assert report.views[good.name]["by_feature"] == {"txn_count_30d": report.mismatch_count}
    assert all(report.views[v]["mismatches"] == 0 for v in ALL_VIEWS if v != good.name)
    # By hand: the number of users whose 30-day count differs from their 7-day count.
    correct = offline_latest(platform, good.name).to_pandas().set_index("user_id")["txn_count_30d"]
    wrong = broken_values.to_pandas().set_index("user_id")["txn_count_30d"]
    differing = int((correct != wrong.reindex(correct.index)).sum())
    assert differing > 10 and report.mismatch_count == report.mismatched_entities == differing
    example = report.mismatches[0]
    user = example["entity"]["user_id"]
    assert example["offline"] == correct[user] and example["online"] == wrong[user]
    assert example["online"] < example["offline"]  # 7 days hold fewer transactions than 30
    assert example["online_ts"] == example["offline_ts"]  # same events, wrong transformation
    assert "txn_count_30d" in report.summary() and report.summary().startswith("SKEW")
    meta = report.to_metadata()
    json.dumps(meta)
    assert meta["ok"] is False and meta["examples"][0]["view"] == good.name


def test_a_stream_update_computing_a_wrong_amount_is_caught(platform):
    """A buggy stream path writes amount * 1.01 for three users at the same event time."""
    view = fr.user_transaction_stats
    latest = offline_latest(platform, view.name)
    bad = latest.slice(0, 3).to_pylist()
    for row in bad:
        row["amount_sum_24h"] = row["amount_sum_24h"] * 1.01
    platform.online.update_entities(view, bad)

    report = check_online_offline_skew(platform.store, views=[view.name], sample_size=1000)
    assert not report.ok and report.mismatch_count == 3 and report.mismatched_entities == 3
    assert sorted(e["entity"]["user_id"] for e in report.mismatches) == sorted(r["user_id"] for r in bad)
    for e in report.mismatches:
        assert (e["view"], e["feature"], e["kind"]) == (view.name, "amount_sum_24h", VALUE)
        assert e["online"] == pytest.approx(e["offline"] * 1.01, rel=1e-12)


def test_stale_missing_and_expired_online_values_are_caught(platform):
    """Online holds an older event for one user, nothing for another, and an expired value for a
    third (its event time is older than the view's TTL at as_of)."""
    view = fr.user_transaction_stats
    as_of = platform.materialized_as_of
    latest = offline_latest(platform, view.name)
    users = latest.column("user_id").to_pylist()
    stale_user, missing_user, expired_user = users[0], users[1], users[2]
    older = platform.store.latest_features(
        view.name, latest.column(fr.EVENT_TS)[0].as_py() - timedelta(microseconds=1)
    )
    older_row = older.filter(pc.equal(older.column("user_id"), stale_user))
    assert older_row.num_rows == 1  # the stale user has an earlier event within the TTL
    rows = latest.filter(pc.invert(pc.is_in(latest.column("user_id"), pa.array([stale_user, missing_user]))))
    expired = rows.column(fr.EVENT_TS).to_pylist()
    pos = users.index(expired_user) - 2  # two rows before it were removed
    expired[pos] = as_of - view.ttl - timedelta(seconds=1)
    rows = rows.set_column(
        rows.schema.get_field_index(fr.EVENT_TS),
        fr.EVENT_TS,
        pa.array(expired, rows.schema.field(fr.EVENT_TS).type),
    )
    platform.online.write_view(
        view, pa.concat_tables([rows, older_row.select(rows.schema.names)]), as_of=as_of
    )

    report = check_online_offline_skew(platform.store, views=[view.name], sample_size=1000)
    assert not report.ok and report.mismatched_entities == 3
    kinds = {}
    for e in report.mismatches:
        kinds.setdefault(e["entity"]["user_id"], set()).add(e["kind"])
    assert kinds[missing_user] == {MISSING_ONLINE}
    assert TIMESTAMP in kinds[stale_user]
    assert kinds[expired_user] == {TIMESTAMP, NULL_VS_VALUE}  # read as null online: past its TTL
    stale = next(
        e for e in report.mismatches if e["entity"]["user_id"] == stale_user and e["kind"] == TIMESTAMP
    )
    assert stale["online_ts"] < stale["offline_ts"]


def test_values_updated_online_after_the_materialization_are_skipped_not_flagged(platform):
    view = fr.user_transaction_stats
    row = offline_latest(platform, view.name).slice(0, 1).to_pylist()[0]
    row[fr.EVENT_TS] = platform.materialized_as_of + timedelta(seconds=5)  # a later stream event
    row["txn_count_1h"] = 1
    platform.online.update_entities(view, [row])
    report = check_online_offline_skew(platform.store, views=[view.name], sample_size=1000)
    assert report.ok and report.skipped_newer_online == 1
    assert report.sampled == offline_latest(platform, view.name).num_rows - 1
    assert "skipped" in report.summary()


def test_a_view_missing_online_fails_the_check(platform):
    platform.online.client.delete(platform.online.meta_key(fr.user_profile.name))
    report = check_online_offline_skew(platform.store, sample_size=5)
    assert not report.ok and report.problems and "user_profile" in report.problems[0]
