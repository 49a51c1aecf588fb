"""The synthetic generator and the file source write exactly the raw transaction contract."""

from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy.stats import ks_2samp

from ml_platform.settings import SyntheticDefaults
from ml_platform.sources import (
    TRANSACTION_COLUMNS,
    DriftScenario,
    EventsFormatError,
    GeneratorConfig,
    generate_day,
    generate_users,
    import_events,
    load_events,
    population,
    write_day,
    write_partition,
    write_range,
    write_users,
)

SMALL = {"n_users": 2000, "n_merchants": 200}
FAR_FUTURE = "2030-01-01T00:00:00Z"


def _concat_days(config: GeneratorConfig) -> pd.DataFrame:
    return pd.concat([generate_day(config, d) for d in config.dates()], ignore_index=True)


@pytest.fixture(scope="module")
def month() -> pd.DataFrame:
    """28 days with every label already known (as_of far in the future)."""
    return _concat_days(GeneratorConfig(days=28, as_of=FAR_FUTURE, **SMALL))


@pytest.fixture(scope="module")
def month_default_as_of() -> pd.DataFrame:
    """The same 28 days, labels as known at the end of the last day (the default as_of)."""
    return _concat_days(GeneratorConfig(days=28, **SMALL))


# --- Determinism ---


def test_same_seed_and_date_give_identical_frames_even_with_a_cold_cache():
    config = GeneratorConfig(days=5, **SMALL)
    first = generate_day(config, "2024-01-03")
    population.build_population.cache_clear()  # the population is rebuilt from the seed alone
    pd.testing.assert_frame_equal(generate_day(config, date(2024, 1, 3)), first)


def test_other_seed_or_other_date_differ():
    config = GeneratorConfig(days=5, **SMALL)
    day = generate_day(config, "2024-01-03")
    other_seed = generate_day(GeneratorConfig(seed=8, days=5, **SMALL), "2024-01-03")
    other_day = generate_day(config, "2024-01-04")
    assert not day["amount"].equals(other_seed["amount"].iloc[: len(day)])
    assert len(set(day["user_id"].head(50)) ^ set(other_seed["user_id"].head(50))) > 0
    assert not np.array_equal(day["amount"].to_numpy()[:100], other_day["amount"].to_numpy()[:100])


# --- Contract ---

EXPECTED_DTYPES = {
    "transaction_id": "str",
    "user_id": "int64",
    "merchant_id": "int64",
    "merchant_category": "str",
    "amount": "float64",
    "country": "str",
    "device": "str",
    "channel": "str",
    "event_timestamp": "datetime64[us, UTC]",
    "created_timestamp": "datetime64[us, UTC]",
    "is_fraud": "Int64",
    "label_timestamp": "datetime64[us, UTC]",
}


def test_frame_has_the_contract_columns_and_dtypes(month):
    assert list(month.columns) == TRANSACTION_COLUMNS
    assert {c: str(t) for c, t in month.dtypes.items()} == EXPECTED_DTYPES
    assert (month["amount"] > 0).all()
    assert month["country"].str.fullmatch(r"[A-Z]{2}").all()
    assert (month["created_timestamp"] >= month["event_timestamp"]).all()
    lag = (month["created_timestamp"] - month["event_timestamp"]).dt.total_seconds()
    assert lag.max() < 60  # a small ingestion delay
    # Each day's events fall on that day.
    assert month.groupby(month["event_timestamp"].dt.date).size().index.tolist() == [
        date(2024, 1, 1) + timedelta(days=i) for i in range(28)
    ]


def test_transaction_ids_are_unique_across_days(month):
    assert month["transaction_id"].is_unique
    assert month["transaction_id"].iloc[0] == "20240101-000-00000000"


def test_parquet_file_schema_is_the_contract(tmp_path):
    config = GeneratorConfig(days=2, **SMALL)
    part = write_day(config, "2024-01-02", tmp_path) / "part-0.parquet"
    schema = pq.read_schema(part)
    assert schema.field("event_timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("label_timestamp").type == pa.timestamp("us", tz="UTC")
    assert schema.field("is_fraud").type == pa.int64()
    assert schema.field("transaction_id").type == pa.string()
    assert schema.names == TRANSACTION_COLUMNS
    pd.testing.assert_frame_equal(pd.read_parquet(part), generate_day(config, "2024-01-02"))


def test_users_table(tmp_path):
    config = GeneratorConfig(days=2, **SMALL)
    users = generate_users(config)
    assert len(users) == 2000 and users["user_id"].tolist() == list(range(1, 2001))
    assert {c: str(t) for c, t in users.dtypes.items()} == {
        "user_id": "int64",
        "home_country": "str",
        "account_age_days": "int64",
        "updated_at": "datetime64[us, UTC]",
    }
    assert (users["updated_at"] == pd.Timestamp("2024-01-01", tz="UTC")).all()
    assert (users["account_age_days"] >= 1).all()
    path = write_users(config, tmp_path)
    assert path == tmp_path / "users" / "users.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(path), users)


# --- Labels ---


def test_label_delays(month):
    known = month[month["is_fraud"].notna()]
    assert len(known) == len(month)  # as_of far in the future: every label arrived
    delay_days = (known["label_timestamp"] - known["event_timestamp"]).dt.total_seconds() / 86400
    fraud = known["is_fraud"] == 1
    # Chargebacks 1-30 days after the event.
    assert delay_days[fraud].between(1.0, 30.0).all()
    assert delay_days[fraud].std() > 1.0
    # Legit labels confirmed exactly label_maturity_days (7) later.
    assert (np.abs(delay_days[~fraud] - 7.0) < 1e-9).all()


def test_labels_not_arrived_by_as_of_are_null(month_default_as_of):
    df = month_default_as_of
    as_of = pd.Timestamp("2024-01-29", tz="UTC")  # end of the last generated day
    assert df["is_fraud"].isna().equals(df["label_timestamp"].isna())
    assert (df["label_timestamp"].dropna() <= as_of).all()
    # Nothing is known about the last day (no chargeback within a day, legit needs 7).
    assert df.loc[df["event_timestamp"] >= as_of - pd.Timedelta(days=1), "is_fraud"].isna().all()
    # Events more than 7 days old are labelled (but for slow chargebacks); younger ones only by chargebacks.
    mature = df[df["event_timestamp"] <= as_of - pd.Timedelta(days=7)]
    assert mature["is_fraud"].notna().mean() > 0.995
    recent = df[(df["event_timestamp"] > as_of - pd.Timedelta(days=7))]
    assert (recent["is_fraud"].dropna() == 1).all()


def test_explicit_as_of_hides_later_labels():
    config = GeneratorConfig(days=10, as_of="2024-01-05T12:00:00Z", **SMALL)
    day = generate_day(config, "2024-01-01")
    # Legit labels of Jan 1 arrive Jan 8: unknown at Jan 5 noon; only chargebacks are known.
    assert (day["is_fraud"].dropna() == 1).all()
    assert (day["label_timestamp"].dropna() <= pd.Timestamp("2024-01-05T12:00:00Z")).all()
    assert generate_day(config, "2024-01-01")["event_timestamp"].equals(
        generate_day(GeneratorConfig(days=10, **SMALL), "2024-01-01")["event_timestamp"]
    )


# --- Fraud: rate and behaviour ---


def test_fraud_rate_is_in_the_target_range(month):
    assert 0.005 <= month["is_fraud"].mean() <= 0.01
    assert month["is_fraud"].sum() > 150


def test_fraud_breaks_the_card_holders_habits(month):
    users = generate_users(GeneratorConfig(**SMALL)).set_index("user_id")
    fraud = month["is_fraud"] == 1
    legit = ~fraud
    usual = month[legit].groupby("user_id")["amount"].median()
    ratio = month["amount"] / month["user_id"].map(usual)
    not_probe = month["amount"] >= 5  # card-testing probes are tiny on purpose
    assert ratio[fraud & not_probe].median() > 2.0 * ratio[legit & not_probe].median()
    assert (month["amount"] < 3)[fraud].mean() > 10 * (month["amount"] < 3)[legit].mean()  # card testing

    night = month["event_timestamp"].dt.hour < 6
    assert night[fraud].mean() > 2.5 * night[legit].mean()
    foreign = month["country"] != month["user_id"].map(users["home_country"])
    assert foreign[fraud].mean() > 10 * foreign[legit].mean()
    # Bursts: another transaction of the same card within the previous hour.
    ordered = month.sort_values(["user_id", "event_timestamp"])
    burst = (ordered.groupby("user_id")["event_timestamp"].diff() < pd.Timedelta(hours=1)).reindex(
        month.index
    )
    assert burst[fraud].mean() > 4 * burst[legit].mean()
    # Fraud is not trivially separable: some of it happens at home, in daytime.
    assert (~foreign & ~night)[fraud].mean() > 0.2


# --- Drift ---


def test_drift_shifts_amounts_and_adds_categories_and_nothing_before_it():
    drift = DriftScenario(start_date=date(2024, 1, 11), amount_scale=1.5, new_categories=("crypto_exchange",))
    drifted = GeneratorConfig(days=14, drift=drift, **SMALL)
    plain = GeneratorConfig(days=14, **SMALL)
    pd.testing.assert_frame_equal(generate_day(drifted, "2024-01-10"), generate_day(plain, "2024-01-10"))

    def period(first: int, last: int) -> pd.DataFrame:
        return pd.concat([generate_day(drifted, date(2024, 1, d)) for d in range(first, last + 1)])

    before, before_2, after = period(3, 6), period(7, 10), period(11, 14)
    assert ks_2samp(before["amount"], after["amount"]).pvalue < 0.01
    assert ks_2samp(before["amount"], before_2["amount"]).pvalue > 0.01
    assert after["amount"].median() / before["amount"].median() == pytest.approx(1.5, rel=0.1)
    assert "crypto_exchange" not in set(before["merchant_category"]) | set(before_2["merchant_category"])
    assert 0.04 < (after["merchant_category"] == "crypto_exchange").mean() < 0.15


def test_drift_changes_the_fraud_pattern_to_card_testing():
    drift = DriftScenario(start_date=date(2024, 1, 8), fraud_pattern="card_testing")
    df = _concat_days(GeneratorConfig(days=14, drift=drift, as_of=FAR_FUTURE, n_users=5000, n_merchants=200))
    fraud = df[df["is_fraud"] == 1]
    probe = fraud["amount"] < 3  # card-testing probes
    drifted = fraud["event_timestamp"] >= pd.Timestamp("2024-01-08", tz="UTC")
    assert probe[~drifted].mean() < 0.45
    assert probe[drifted].mean() > 0.65


def test_generator_defaults_are_the_platform_synthetic_defaults():
    config = GeneratorConfig()
    assert (config.seed, config.n_users, config.n_merchants, config.txns_per_user_per_day) == (
        SyntheticDefaults.seed,
        SyntheticDefaults.n_users,
        SyntheticDefaults.n_merchants,
        SyntheticDefaults.txns_per_user_per_day,
    )


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_merchants must be >= 104"):
        GeneratorConfig(n_merchants=10)
    with pytest.raises(ValueError, match="fraud_pattern 'phishing'"):
        DriftScenario(start_date="2024-01-01", fraud_pattern="phishing")
    with pytest.raises(ValueError, match="not a date"):
        GeneratorConfig(start="January")


# --- Writing ---


def test_write_day_overwrites_cleanly_and_leaves_no_temp_files(tmp_path):
    config = GeneratorConfig(days=3, **SMALL)
    path = write_day(config, "2024-01-02", tmp_path)
    assert path == tmp_path / "transactions" / "date=2024-01-02"
    first = pd.read_parquet(path / "part-0.parquet")
    (path / "part-7.parquet").write_bytes(b"stale part from an older run")
    write_day(config, "2024-01-02", tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["part-0.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(path / "part-0.parquet"), first)
    assert list((tmp_path / "_staging").iterdir()) == []


def test_a_failed_write_keeps_the_previous_partition(tmp_path):
    config = GeneratorConfig(days=3, **SMALL)
    path = write_day(config, "2024-01-02", tmp_path)
    before = pd.read_parquet(path / "part-0.parquet")

    def frames_then_crash():
        yield generate_day(config, "2024-01-03")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_partition(frames_then_crash(), tmp_path, date(2024, 1, 2))
    assert sorted(p.name for p in path.iterdir()) == ["part-0.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(path / "part-0.parquet"), before)
    assert list((tmp_path / "_staging").iterdir()) == []


def test_large_days_are_written_in_chunks(tmp_path):
    config = GeneratorConfig(days=2, n_users=5000, n_merchants=200, chunk_rows=1000)
    path = write_day(config, "2024-01-01", tmp_path)
    parts = sorted(path.iterdir())
    assert len(parts) == 4  # ~3000 rows * 1.05 / 1000 -> 4 chunks
    assert max(pq.read_metadata(p).num_rows for p in parts) < 1200
    written = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    pd.testing.assert_frame_equal(written, generate_day(config, "2024-01-01"))
    assert written["transaction_id"].is_unique


def test_write_range_includes_both_ends(tmp_path):
    config = GeneratorConfig(days=5, **SMALL)
    paths = write_range(config, tmp_path, "2024-01-02", "2024-01-04")
    assert [p.name for p in paths] == ["date=2024-01-02", "date=2024-01-03", "date=2024-01-04"]
    with pytest.raises(ValueError, match="before start"):
        write_range(config, tmp_path, "2024-01-04", "2024-01-02")


# --- File source ---


def test_csv_and_parquet_round_trip(tmp_path):
    config = GeneratorConfig(days=2, **SMALL)
    events = _concat_days(config)
    events.to_csv(tmp_path / "events.csv", index=False)
    pd.testing.assert_frame_equal(load_events(tmp_path / "events.csv"), events)
    folder = tmp_path / "pq"
    folder.mkdir()
    events.iloc[:100].to_parquet(folder / "a.parquet")
    events.iloc[100:].to_parquet(folder / "b.parquet")
    pd.testing.assert_frame_equal(load_events(folder), events)


def test_file_source_coerces_types_and_fills_optional_columns(tmp_path):
    (tmp_path / "mine.csv").write_text(
        "transaction_id,user_id,merchant_id,merchant_category,amount,country,device,channel,event_timestamp\n"
        "a1,7,3,grocery,12.5,FR,ios,online,2024-03-01T10:00:00+02:00\n"
        "a2,8,4,fuel,40,DE,pos_terminal,pos,2024-03-01 23:30:00\n"
    )
    events = load_events(tmp_path / "mine.csv")
    assert events["event_timestamp"].tolist() == [
        pd.Timestamp("2024-03-01T08:00:00Z"),  # converted to UTC
        pd.Timestamp("2024-03-01T23:30:00Z"),  # no zone: taken as UTC
    ]
    assert events["created_timestamp"].equals(events["event_timestamp"])
    assert events["is_fraud"].isna().all() and events["label_timestamp"].isna().all()
    assert str(events["user_id"].dtype) == "int64" and events["amount"].tolist() == [12.5, 40.0]


@pytest.mark.parametrize(
    "column, bad_value, message",
    [
        ("amount", "abc", r"column 'amount' has 1 value\(s\) that are not numbers, e.g. \['abc'\]"),
        ("user_id", "1.5", r"column 'user_id' has 1 value\(s\) that are not whole numbers, e.g. \['1.5'\]"),
        ("event_timestamp", "yesterday", r"column 'event_timestamp' .* e.g. \['yesterday'\]"),
        ("is_fraud", "maybe", r"column 'is_fraud' .* not 0, 1 or empty, e.g. \['maybe'\]"),
    ],
)
def test_file_source_names_uncastable_values(tmp_path, column, bad_value, message):
    events = generate_day(GeneratorConfig(days=1, **SMALL), "2024-01-01").head(5).astype(object)
    events.loc[2, column] = bad_value
    events.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(EventsFormatError, match=message):
        load_events(tmp_path / "bad.csv")


def test_file_source_names_missing_columns(tmp_path):
    pd.DataFrame({"transaction_id": ["x"], "user_id": [1], "amount": [3.0]}).to_parquet(
        tmp_path / "few.parquet"
    )
    with pytest.raises(
        EventsFormatError, match=r"missing required column\(s\) \['merchant_id', 'merchant_category'"
    ):
        load_events(tmp_path / "few.parquet")
    with pytest.raises(FileNotFoundError, match="No events at"):
        load_events(tmp_path / "nothing_here")


def test_import_events_writes_daily_partitions_idempotently(tmp_path):
    config = GeneratorConfig(days=3, **SMALL)
    events = _concat_days(config)
    events.to_parquet(tmp_path / "events.parquet")
    raw = tmp_path / "raw"
    paths = import_events(tmp_path / "events.parquet", raw)
    assert [p.name for p in paths] == ["date=2024-01-01", "date=2024-01-02", "date=2024-01-03"]
    import_events(tmp_path / "events.parquet", raw)  # again: same result, no duplicates
    for day in config.dates():
        written = pd.read_parquet(raw / "transactions" / f"date={day}" / "part-0.parquet")
        pd.testing.assert_frame_equal(written, generate_day(config, day))
