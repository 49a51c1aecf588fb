"""The label feed: labels arrive later than the events and separately from them.

In production a fraud label is a chargeback 1-30 days after the transaction, and a legit label is
"no dispute once the maturity period has passed". The feed is its own daily partition, keyed by
the day the labels *arrived*: raw/labels/date=YYYY-MM-DD/labels.parquet with the label event
contract's columns (transaction_id, merchant_id, is_fraud, label_timestamp, and user_id when
known). Monitoring joins it to the prediction log by transaction id; a label for a transaction
that was never predicted is counted, not dropped silently.

Arrived labels are also merged into the raw events' label columns (`merge_into_raw`, with their
arrival times), so that the raw table holds every label known so far: the label-based features
and training read it point in time, and a day ingested at its end learns its chargebacks later.

Two sources write the feed: the synthetic generator (`synthetic_label_arrivals`: the day's arrivals,
recomputed from the generator's events of the days they can belong to, since each generated day
is a pure function of (config, date)), and the user's own files (`import_label_files`: Parquet
or CSV with the contract's columns, split by the day each label arrived).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa

from ml_platform import features as fr
from ml_platform.atomic_files import write_parquet_atomic
from ml_platform.membership import is_in
from ml_platform.sources.files import EventsFormatError, _event_files, _read_file, _to_int, _to_label, _to_utc
from ml_platform.sources.raw_events import (  # the feed's layout is the raw layout's; re-exported
    LABEL_COLUMNS,
    LABELS_ARROW_SCHEMA,
    labels_partition,
    labels_root,
    parse_date,
)
from ml_platform.transactions import LABEL_EVENT, LABEL_EVENT_OPTIONAL

_REQUIRED = tuple(f.name for f in LABEL_EVENT.fields)
_INTEGER = tuple(
    name for name in LABEL_COLUMNS if pa.types.is_integer(LABELS_ARROW_SCHEMA.field(name).type) and name != fr.LABEL
)


def empty_labels() -> pd.DataFrame:
    return LABELS_ARROW_SCHEMA.empty_table().to_pandas()


# --------------------------------------------------------------------------- synthetic


def synthetic_label_arrivals(config, day: date | str, first_event_day: date | str | None = None) -> pd.DataFrame:
    """The labels the synthetic world delivers on `day`: every generated transaction whose label
    arrives within that UTC day, from events of the days a label can come from (the longest
    chargeback delay or the legit maturity period back). `first_event_day`: events before it do not
    exist in this deployment (their labels are not delivered)."""
    from ml_platform.sources.generator import MAX_CHARGEBACK_DELAY_DAYS, generate_day

    day = parse_date(day, "day")
    lookback = max(MAX_CHARGEBACK_DELAY_DAYS, config.label_maturity_days) + 1
    first = day - timedelta(days=lookback)
    if first_event_day is not None:
        first = max(first, parse_date(first_event_day, "first_event_day"))
    # Every label known: the arrival time decides which day delivers it, not the config's as_of.
    omniscient = dataclasses.replace(config, as_of=datetime(2200, 1, 1, tzinfo=UTC))
    lo = pd.Timestamp(day, tz="UTC")
    hi = lo + pd.Timedelta(days=1)
    frames = []
    for i in range((day - first).days + 1):
        events = generate_day(omniscient, first + timedelta(days=i))
        arrived = events[(events[fr.LABEL_TS] >= lo) & (events[fr.LABEL_TS] < hi)]
        if len(arrived):
            frames.append(arrived[list(LABEL_COLUMNS)])
    if not frames:
        return empty_labels()
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values([fr.LABEL_TS, "transaction_id"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- user files


def coerce_labels(frame: pd.DataFrame, source: str = "labels") -> pd.DataFrame:
    """`frame` as the feed's columns and types; EventsFormatError names the column and examples."""
    missing = [c for c in _REQUIRED if c not in frame.columns]
    if missing:
        raise EventsFormatError(
            f"{source}: missing required label column(s) {missing}; found {list(frame.columns)}. "
            f"A label file needs {list(_REQUIRED)} (optional: {[f.name for f in LABEL_EVENT_OPTIONAL]})"
        )
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame(index=frame.index)
    ids = frame["transaction_id"]
    out["transaction_id"] = ids.astype("str").where(ids.notna()).astype("str")
    for column in _INTEGER:
        if column in frame.columns:
            out[column] = _to_int(frame[column], column, source).astype("Int64")
        else:
            out[column] = pd.array([pd.NA] * len(frame), dtype="Int64")
    out[fr.LABEL] = _to_label(frame[fr.LABEL], fr.LABEL, source)
    out[fr.LABEL_TS] = _to_utc(frame[fr.LABEL_TS], fr.LABEL_TS, source)
    for column, what in (("transaction_id", "a transaction id"), (fr.LABEL, "a label"), (fr.LABEL_TS, "a time")):
        empty = out[column].isna()
        if empty.any():
            rows = [int(i) for i in out.index[empty][:3]]
            raise EventsFormatError(f"{source}: {int(empty.sum())} label row(s) have no {column} ({what}), e.g. rows {rows}")
    return out[list(LABEL_COLUMNS)]


def load_label_files(path: str | Path) -> pd.DataFrame:
    """A Parquet/CSV file, or every such file under a directory, as feed-typed labels."""
    frames = [coerce_labels(_read_file(f), source=str(f)) for f in _event_files(Path(path))]
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def import_label_files(path: str | Path, raw_dir: str | Path, days: Iterable[date] | None = None) -> list[Path]:
    """Write the labels under `path` into the feed, one partition per arrival day (only `days`, if
    given: a day with no label in the files is written empty, so the feed says "none arrived")."""
    labels = load_label_files(path)
    by_day = {d: part for d, part in labels.groupby(labels[fr.LABEL_TS].dt.date, sort=True)}
    wanted = sorted(set(days)) if days is not None else sorted(by_day)
    return [write_labels(by_day.get(d, empty_labels()), raw_dir, d) for d in wanted]


# --------------------------------------------------------------------------- writing / reading


def write_labels(frame: pd.DataFrame, raw_dir: str | Path, day: date | str) -> Path:
    """Replace the feed partition of `day` with `frame` (temp file, then rename); an empty frame
    writes an empty partition ("no label arrived that day", distinct from "not ingested yet")."""
    day = parse_date(day, "day")
    outside = frame[fr.LABEL_TS].notna() & (frame[fr.LABEL_TS].dt.date != day)
    if outside.any():
        example = frame.loc[outside, fr.LABEL_TS].iloc[0]
        raise ValueError(f"labels for {day}: {int(outside.sum())} label(s) arrived on another day, e.g. {example}")
    frame = frame[list(LABEL_COLUMNS)].astype({fr.LABEL_TS: "datetime64[us, UTC]"})
    table = pa.Table.from_pandas(frame, schema=LABELS_ARROW_SCHEMA, preserve_index=False)
    return write_parquet_atomic(labels_partition(raw_dir, day) / "labels.parquet", table)


def label_days(raw_dir: str | Path) -> list[date]:
    """The arrival days the feed holds (ingested, possibly empty)."""
    root = labels_root(raw_dir)
    return sorted(
        date.fromisoformat(d.name.split("=", 1)[1]) for d in root.glob("date=*") if (d / "labels.parquet").exists()
    )


def read_labels(raw_dir: str | Path, *, until: date | str | None = None, since: date | str | None = None) -> pd.DataFrame:
    """Every label that arrived on the feed's days in [since, until] (both included; None: open),
    one row per transaction: when a transaction was labelled twice (a legit label, then a late
    chargeback), the latest arrival wins."""
    days = label_days(raw_dir)
    if until is not None:
        days = [d for d in days if d <= parse_date(until, "until")]
    if since is not None:
        days = [d for d in days if d >= parse_date(since, "since")]
    if not days:
        return empty_labels()
    files = ", ".join("'" + str(labels_partition(raw_dir, d) / "labels.parquet").replace("'", "''") + "'" for d in days)
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        table = con.sql(
            f"SELECT {', '.join(LABEL_COLUMNS)} FROM read_parquet([{files}]) "
            f"QUALIFY row_number() OVER (PARTITION BY transaction_id ORDER BY {fr.LABEL_TS} DESC) = 1 "
            f"ORDER BY {fr.LABEL_TS}, transaction_id"
        ).to_arrow_table()
    return table.cast(LABELS_ARROW_SCHEMA).to_pandas()


def read_known_labels(raw_dir: str | Path, *, until: date | str, events_since: date | str | None = None) -> pd.DataFrame:
    """Every label known by the end of `until`: the feed's arrivals up to that day, and the labels
    the raw events already carried when they were written (an import or a history generated at
    once holds the labels known then), for events from `events_since` on. One row per
    transaction, the latest label winning (the query `raw_events.known_labels` runs)."""
    from ml_platform.sources import raw_events

    until = parse_date(until, "until")
    days = [d for d in raw_events.all_partition_days(raw_dir) if d <= until]
    if events_since is not None:
        days = [d for d in days if d >= parse_date(events_since, "events_since")]
    end = pd.Timestamp(until + timedelta(days=1), tz="UTC") - pd.Timedelta(microseconds=1)
    return raw_events.known_labels(Path(raw_dir), end.to_pydatetime(), days)


def merge_into_raw(raw_dir: str | Path, labels: pd.DataFrame, *, days: Iterable[date] | None = None) -> list[date]:
    """Write arrived labels into the raw partitions of their transactions (the raw table's label
    columns are "every label known so far"; each label keeps its arrival time, so point-in-time
    reads of the label-based features and training's as-of cut stay exact). Only the partitions of
    `days` (default: every raw day) are searched; a partition is rewritten only if a label is new
    to it or later than the one it holds (atomically, as a whole). Returns the days rewritten."""
    from ml_platform.sources import raw_events

    if labels.empty:
        return []
    wanted = set(days) if days is not None else None
    candidates = [d for d in raw_events.all_partition_days(raw_dir) if wanted is None or d in wanted]
    latest = labels.sort_values(fr.LABEL_TS, kind="stable").drop_duplicates("transaction_id", keep="last")
    if not candidates:
        return []
    # Which days hold a transaction whose label is new or newer: read ids and label times only.
    files = ", ".join("'" + str(raw_events.transactions_partition(raw_dir, d) / "*.parquet").replace("'", "''") + "'"
                      for d in candidates)
    arrived = pa.Table.from_pandas(latest[["transaction_id", fr.LABEL_TS]], preserve_index=False)
    latest_by_id = latest.set_index("transaction_id")
    rewritten = []
    with raw_events.connect() as con:  # one connection for the search and every day's read
        con.register("arrived", arrived)
        stale = con.sql(
            f"SELECT DISTINCT r.date FROM read_parquet([{files}], hive_partitioning = true) r "
            f"JOIN arrived a USING (transaction_id) "
            f"WHERE r.{fr.LABEL_TS} IS NULL OR a.{fr.LABEL_TS} > r.{fr.LABEL_TS} ORDER BY 1"
        ).fetchall()
        for (day,) in stale:
            day = parse_date(day, "date")
            if _merge_day(raw_dir, day, raw_events.read_days(Path(raw_dir), [day], con), latest_by_id):
                rewritten.append(day)
    return rewritten


def _merge_day(raw_dir, day: date, frame: pd.DataFrame, latest: pd.DataFrame) -> bool:
    """Write the labels of `latest` (by transaction id) that are new or newer into the day's
    partition `frame`; whether it was rewritten."""
    from ml_platform.sources import raw_events

    hit = is_in(frame["transaction_id"], latest.index)
    if not hit.any():
        return False
    new = latest.loc[frame.loc[hit, "transaction_id"]]
    old_ts = frame.loc[hit, fr.LABEL_TS]
    newer = old_ts.isna().to_numpy() | (new[fr.LABEL_TS].to_numpy() > old_ts.to_numpy())
    if not newer.any():
        return False
    rows = frame.index[hit][newer]
    frame.loc[rows, fr.LABEL] = new[fr.LABEL].to_numpy()[newer]
    frame.loc[rows, fr.LABEL_TS] = new[fr.LABEL_TS].to_numpy()[newer]
    raw_events.write_partition([frame], raw_dir, day)
    return True
