"""The label feed: the labels that arrive each day, from the generator or the user's files."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pandas as pd
import pytest

from ml_platform.sources.files import EventsFormatError
from ml_platform.sources.generator import MAX_CHARGEBACK_DELAY_DAYS, GeneratorConfig, generate_day
from ml_platform.sources.labels import (
    LABEL_COLUMNS,
    import_label_files,
    label_days,
    read_labels,
    synthetic_label_arrivals,
    write_labels,
)

CONFIG = GeneratorConfig(seed=5, n_users=300, n_merchants=120, start=dt.date(2025, 3, 1), days=60, fraud_rate=0.03)
FIRST = dt.date(2025, 3, 1)


def _all_events(days: int) -> pd.DataFrame:
    """Every generated event of the first `days` days with its label, whenever it arrives."""
    omniscient = dataclasses.replace(CONFIG, as_of=dt.datetime(2100, 1, 1, tzinfo=dt.UTC))
    return pd.concat([generate_day(omniscient, FIRST + dt.timedelta(days=i)) for i in range(days)], ignore_index=True)


def test_a_day_delivers_exactly_the_labels_that_arrive_within_it():
    day = FIRST + dt.timedelta(days=20)
    got = synthetic_label_arrivals(CONFIG, day, first_event_day=FIRST)
    events = _all_events(21)
    arrives = events["label_timestamp"].dt.date == day
    expected = events[arrives]
    assert list(got.columns) == list(LABEL_COLUMNS)
    assert sorted(got["transaction_id"]) == sorted(expected["transaction_id"])
    merged = got.merge(expected, on="transaction_id", suffixes=("", "_raw"))
    assert (merged["is_fraud"] == merged["is_fraud_raw"]).all()
    assert (merged["label_timestamp"] == merged["label_timestamp_raw"]).all()
    # Late and separate: both chargebacks (frauds, days after) and matured legit labels arrive.
    assert got["is_fraud"].sum() > 0 and (got["is_fraud"] == 0).sum() > 0
    assert (got["label_timestamp"].dt.date == day).all()


def test_labels_before_the_first_event_day_are_not_delivered():
    day = FIRST + dt.timedelta(days=3)
    late_start = FIRST + dt.timedelta(days=2)
    got = synthetic_label_arrivals(CONFIG, day, first_event_day=late_start)
    event_days = pd.to_datetime(got["transaction_id"].str[:8], format="%Y%m%d").dt.date
    assert (event_days >= late_start).all()
    assert len(synthetic_label_arrivals(CONFIG, day, first_event_day=FIRST)) > len(got)


def test_every_label_arrives_within_the_longest_delay():
    events = _all_events(2)
    delay = (events["label_timestamp"] - events["event_timestamp"]).dt.total_seconds() / 86400
    assert delay.max() <= MAX_CHARGEBACK_DELAY_DAYS + 1e-6


def test_write_and_read_back_with_the_latest_label_winning(tmp_path):
    t = pd.Timestamp("2025-04-02T10:00:00Z")
    first = pd.DataFrame({"transaction_id": ["a", "b"], "merchant_id": [1, 2], "is_fraud": [0, 0],
                          "label_timestamp": [t, t], "user_id": [7, None]})
    later = pd.DataFrame({"transaction_id": ["b"], "merchant_id": [2], "is_fraud": [1],
                          "label_timestamp": [t + pd.Timedelta(days=3)], "user_id": [8]})
    write_labels(first.astype({"user_id": "Int64"}), tmp_path, dt.date(2025, 4, 2))
    write_labels(later, tmp_path, dt.date(2025, 4, 5))
    write_labels(first.iloc[0:0].astype({"user_id": "Int64"}), tmp_path, dt.date(2025, 4, 6))  # none arrived
    assert label_days(tmp_path) == [dt.date(2025, 4, 2), dt.date(2025, 4, 5), dt.date(2025, 4, 6)]
    until_3 = read_labels(tmp_path, until=dt.date(2025, 4, 3))
    assert dict(zip(until_3["transaction_id"], until_3["is_fraud"], strict=True)) == {"a": 0, "b": 0}
    everything = read_labels(tmp_path)
    assert dict(zip(everything["transaction_id"], everything["is_fraud"], strict=True)) == {"a": 0, "b": 1}
    assert read_labels(tmp_path, since=dt.date(2025, 4, 6)).empty


def test_a_label_written_to_the_wrong_day_is_refused(tmp_path):
    frame = pd.DataFrame({"transaction_id": ["a"], "merchant_id": [1], "is_fraud": [1],
                          "label_timestamp": [pd.Timestamp("2025-04-03T00:00:01Z")], "user_id": [1]})
    with pytest.raises(ValueError, match=r"labels for 2025-04-02: 1 label\(s\) arrived on another day"):
        write_labels(frame, tmp_path, dt.date(2025, 4, 2))


def test_user_label_files_are_split_by_arrival_day(tmp_path):
    src = tmp_path / "labels.csv"
    src.write_text(
        "transaction_id,merchant_id,is_fraud,label_timestamp\n"
        "t1,3,true,2025-05-01T08:00:00Z\n"
        "t2,4,0,2025-05-01T23:59:59Z\n"
        "t3,4,1,2025-05-03T01:00:00+02:00\n"
    )
    raw = tmp_path / "raw"
    paths = import_label_files(src, raw, days=[dt.date(2025, 5, 1), dt.date(2025, 5, 2), dt.date(2025, 5, 2)])
    assert len(paths) == 2 and label_days(raw) == [dt.date(2025, 5, 1), dt.date(2025, 5, 2)]
    got = read_labels(raw)
    assert list(got["transaction_id"]) == ["t1", "t2", "t3"]
    assert list(got["is_fraud"]) == [1, 0, 1]
    # t3 arrived 2025-05-02 23:00 UTC: it belongs to the 2nd (the file's +02:00 is converted).
    assert read_labels(raw, since=dt.date(2025, 5, 2))["transaction_id"].tolist() == ["t3"]
    assert got["user_id"].isna().all()


def test_bad_label_files_name_the_column_and_value(tmp_path):
    src = tmp_path / "bad.csv"
    src.write_text("transaction_id,merchant_id,is_fraud,label_timestamp\nt1,3,maybe,2025-05-01T08:00:00Z\n")
    with pytest.raises(EventsFormatError, match=r"column 'is_fraud' has 1 value\(s\) that are not 0, 1 or empty, e.g. \['maybe'\]"):
        import_label_files(src, tmp_path / "raw")
    src.write_text("transaction_id,is_fraud,label_timestamp\nt1,1,2025-05-01T08:00:00Z\n")
    with pytest.raises(EventsFormatError, match=r"missing required label column\(s\) \['merchant_id'\]"):
        import_label_files(src, tmp_path / "raw")
    src.write_text("transaction_id,merchant_id,is_fraud,label_timestamp\nt1,3,,2025-05-01T08:00:00Z\n")
    with pytest.raises(EventsFormatError, match=r"1 label row\(s\) have no is_fraud"):
        import_label_files(src, tmp_path / "raw")


def test_known_labels_are_the_raw_events_labels_plus_the_feeds_arrivals(tmp_path):
    from ml_platform.sources.generator import write_day
    from ml_platform.sources.labels import read_known_labels
    from ml_platform.sources.raw_events import read_days

    config = dataclasses.replace(CONFIG, n_users=3000, fraud_rate=0.05)
    day = FIRST + dt.timedelta(days=3)
    # The raw day as written 10 days later (an import, say): it carries the labels known by then.
    written = dataclasses.replace(config, as_of=dt.datetime.combine(day + dt.timedelta(days=10), dt.time(), dt.UTC))
    write_day(written, day, tmp_path)
    raw = read_days(tmp_path, [day])
    carried = raw[raw["is_fraud"].notna()]
    assert len(carried) > 100
    # The first day after the write on which a chargeback for that day's transactions arrives.
    for offset in range(11, 32):
        later = day + dt.timedelta(days=offset)
        arrivals = synthetic_label_arrivals(config, later, first_event_day=day)
        arrivals = arrivals[arrivals["transaction_id"].isin(raw["transaction_id"])]
        if len(arrivals):
            break
    assert len(arrivals) > 0 and not arrivals["transaction_id"].isin(carried["transaction_id"]).any()
    write_labels(arrivals, tmp_path, later)
    known = read_known_labels(tmp_path, until=later)
    assert set(known["transaction_id"]) == set(carried["transaction_id"]) | set(arrivals["transaction_id"])
    assert known["transaction_id"].is_unique
    # As known at an earlier day: only the carried labels that had arrived by its end.
    cut = day + dt.timedelta(days=7)
    early = read_known_labels(tmp_path, until=cut)
    assert set(early["transaction_id"]) == set(
        carried.loc[carried["label_timestamp"] < pd.Timestamp(cut + dt.timedelta(days=1), tz="UTC"), "transaction_id"]
    )


def test_training_sees_labels_that_arrived_after_the_day_was_ingested(tmp_path):
    """A day ingested at its end carries almost no labels; the chargebacks and matured legit labels
    that the feed delivers later are what a retrain learns from (labelled_events joins both)."""
    from ml_platform.sources.generator import write_day
    from ml_platform.sources.raw_events import labelled_events, latest_label_time

    config = dataclasses.replace(CONFIG, n_users=2000, fraud_rate=0.05)
    day = FIRST + dt.timedelta(days=3)
    end_of_day = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)
    write_day(dataclasses.replace(config, as_of=end_of_day), day, tmp_path)
    assert labelled_events(tmp_path, end_of_day + dt.timedelta(days=30)).empty  # nothing carried
    arrivals = {}
    for offset in range(1, 12):
        arrival_day = day + dt.timedelta(days=offset)
        frame = synthetic_label_arrivals(config, arrival_day, first_event_day=day)
        write_labels(frame, tmp_path, arrival_day)
        arrivals[arrival_day] = frame
    cut = dt.datetime.combine(day + dt.timedelta(days=9), dt.time(12), dt.UTC)
    got = labelled_events(tmp_path, cut)
    every = pd.concat(arrivals.values(), ignore_index=True)
    ingested = every["transaction_id"].str.startswith(f"{day:%Y%m%d}-")  # only `day` was ingested
    expected = every[ingested & (every["label_timestamp"] <= pd.Timestamp(cut))]
    assert sorted(got["transaction_id"]) == sorted(expected["transaction_id"])
    merged = got.merge(expected, on="transaction_id", suffixes=("", "_feed"))
    assert (merged["is_fraud"] == merged["is_fraud_feed"]).all()
    assert got["is_fraud"].sum() > 0 and (got["is_fraud"] == 0).sum() > 0  # chargebacks and legit labels
    assert latest_label_time(tmp_path) == every["label_timestamp"].max()


def test_arrived_labels_are_merged_into_the_raw_events_with_their_arrival_times(tmp_path):
    from ml_platform.sources.generator import write_day
    from ml_platform.sources.labels import merge_into_raw
    from ml_platform.sources.raw_events import read_days

    config = dataclasses.replace(CONFIG, n_users=2000, fraud_rate=0.05)
    day = FIRST + dt.timedelta(days=3)
    write_day(dataclasses.replace(config, as_of=dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)),
              day, tmp_path)
    assert read_days(tmp_path, [day])["is_fraud"].notna().sum() == 0  # ingested at its end: no label yet
    arrival = day + dt.timedelta(days=7)  # the day's legit labels mature
    arrived = synthetic_label_arrivals(config, arrival, first_event_day=day)
    assert merge_into_raw(tmp_path, arrived) == [day]
    after = read_days(tmp_path, [day])
    truth = generate_day(dataclasses.replace(config, as_of=dt.datetime(2100, 1, 1, tzinfo=dt.UTC)), day)
    merged = after.merge(truth, on="transaction_id", suffixes=("", "_true"))
    known = merged["is_fraud"].notna()
    assert known.sum() == arrived["transaction_id"].isin(after["transaction_id"]).sum() > 0
    assert (merged.loc[known, "is_fraud"] == merged.loc[known, "is_fraud_true"]).all()
    assert (merged.loc[known, "label_timestamp"] == merged.loc[known, "label_timestamp_true"]).all()
    assert (merged.loc[known, "label_timestamp"].dt.date == arrival).all()
    # The events themselves are untouched, and merging again changes nothing.
    assert (after["amount"].to_numpy() == truth.set_index("transaction_id").loc[after["transaction_id"], "amount"]).all()
    assert merge_into_raw(tmp_path, arrived) == []
