"""Incremental offline materialization: recompute an aggregated view's table from where its source changed.

A row of the table at time t depends only on its entity's source rows with time in [t - w, t]
(w: the view's longest window). When the source changed only from time T0 on (a new daily
partition, a recent partition rewritten by the label feed), the rows before T0 are what they
were, and the rows from T0 on are the compiled query over the source rows from T0 - w on, kept
from T0 (the rows in [T0 - w, T0) are only context). Peers (equal keys and time) stay together:
the split is by time.

What a table was computed from is recorded in its Parquet metadata (`RECORD_KEY`): per source
file, its size, modification time and inode, and the earliest value of the view's time field in
it, and when the files were listed. The next materialization lists the files again; T0 is the
earliest time of any file added, removed or changed (for a changed file, the earlier of its
recorded and its current earliest time). No file changed: the table stands. A file whose rows all
lack a time changes nothing. A file modified less than `RACY_S` before it was listed counts as
changed next time too (as git treats a "racily clean" file): a rewrite within a file system's
timestamp granularity could keep its size, mtime and inode.

Only where the result is exactly the full query's: a Parquet source, and every sum and mean of the
view fixed point (`Aggregation.decimals`; counts, min and max are exact anyway). A float window
sum's last bits depend on how the engine groups the frame, so a recomputed suffix could differ
from a full run in the last bit. Everything else (a CSV source, float sums, no table, a table
from another definition or without a record, `full=True`) runs the full query.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from ml_platform.featurestore import offline
from ml_platform.featurestore.definitions import FeatureView
from ml_platform.timestamps import span_us

RECORD_KEY = "ml_platform_source_record"  # Parquet key-value metadata: what the table was computed from
RACY_S = 2.0  # a file modified this close to its listing may change again unseen: recompute it next time
FileState = tuple[int, int, int]  # size, mtime in ns, inode


def supports_incremental(view: FeatureView) -> bool:
    """The view's table can be recomputed from a time on with exactly the full query's values."""
    return all(a.exact for a in view.aggregations) and view.source.file_format == "parquet"


def longest_window(view: FeatureView) -> timedelta:
    return max(a.window for a in view.aggregations)


def file_states(files: list[str]) -> dict[str, FileState]:
    """Each file's (size, mtime_ns, inode), read before the files are (a file rewritten while it
    is read then shows as changed next time: recomputed, never missed)."""
    out = {}
    for path in files:
        st = os.stat(path)
        out[path] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


def earliest_times(con, files: list[str], time_column: str) -> dict[str, int | None]:
    """The earliest `time_column` value in each file, in µs since the epoch (None: no row has one)."""
    if not files:
        return {}
    scan = offline.scan_sql(files, file_row_number=True)
    col = offline.quote_identifier(time_column)
    rows = con.execute(
        f"SELECT filename, epoch_us(min(CAST({col} AS TIMESTAMPTZ))) FROM {scan} GROUP BY filename"
    ).fetchall()
    found = {name: (None if us is None else int(us)) for name, us in rows}
    return {path: found.get(path) for path in files}  # a file without rows has no group


def encode_record(states: dict[str, FileState], earliest: dict[str, int | None], listed_ns: int) -> str:
    files = {p: [*states[p], earliest[p]] for p in states}
    return json.dumps({"listed_ns": listed_ns, "files": files}, separators=(",", ":"))


def decode_record(text: str | None) -> dict[str, tuple[FileState, int | None]] | None:
    """The recorded files, or None when there is no (readable) record. A racy file (modified less
    than RACY_S before the listing) is returned with no state, so that it compares as changed."""
    if not text:
        return None
    try:
        doc = json.loads(text)
        racy_from = int(doc["listed_ns"]) - int(RACY_S * 1e9)
        out = {}
        for path, v in doc["files"].items():
            state = (int(v[0]), int(v[1]), int(v[2]))
            out[path] = (state if state[1] < racy_from else (-1, -1, -1), None if v[3] is None else int(v[3]))
        return out
    except (ValueError, KeyError, TypeError, IndexError):
        return None


@dataclass(frozen=True)
class Plan:
    """What a materialization recomputes: `full`, `unchanged` (the table stands, record and all),
    or `incremental` from `since_us` on (None: no row changes, only the record does)."""

    mode: str
    since_us: int | None = None
    changed_files: int = 0


def plan(
    recorded: dict[str, tuple[FileState, int | None]] | None,
    states: dict[str, FileState],
    earliest_now: Callable[[list[str]], dict[str, int | None]],
) -> Plan:
    """Compare the record with the files now. `earliest_now(files)` gives the current earliest time of
    the files asked for (only the added and changed ones are read)."""
    if recorded is None:
        return Plan("full")
    added = [p for p in states if p not in recorded]
    removed = [p for p in recorded if p not in states]
    changed = [p for p in states if p in recorded and recorded[p][0] != states[p]]
    if not (added or removed or changed):
        return Plan("unchanged")
    now = earliest_now(added + changed)
    times = [recorded[p][1] for p in removed + changed] + [now[p] for p in added + changed]
    times = [t for t in times if t is not None]
    return Plan("incremental", min(times) if times else None, len(added) + len(removed) + len(changed))


def prepare(
    con, view: FeatureView, source_path: str, previous: dict[str, str], fingerprint: tuple[str, str]
) -> tuple[Plan, str]:
    """(what to recompute, the record for the new table) of a view that `supports_incremental`.
    `previous`: the current table's key-value metadata ({} when there is none or a full run is
    asked for); it must hold `fingerprint` (key, the view's current value). Each file's earliest
    time is read once: the added and changed ones, or every one when there is no record."""
    listed_ns = time.time_ns()
    files = offline.parquet_files(con, source_path, what=f"feature view {view.name!r} source")
    states = file_states(files)  # before any file is read
    recorded = decode_record(previous.get(RECORD_KEY))
    if previous.get(fingerprint[0]) != fingerprint[1]:
        recorded = None
    earliest: dict[str, int | None] = {}
    for path, (state, first) in (recorded or {}).items():
        if states.get(path) == state:
            earliest[path] = first  # unchanged: its recorded earliest time

    def earliest_now(paths: list[str]) -> dict[str, int | None]:
        earliest.update(earliest_times(con, paths, view.source.timestamp_field))
        return {p: earliest[p] for p in paths}

    step = plan(recorded, states, earliest_now)
    earliest_now([p for p in states if p not in earliest])
    return step, encode_record(states, earliest, listed_ns)


def incremental_sql(
    view: FeatureView, table_path: str, source_scan: str, since_us: int | None, compile_sql: Callable[[str], str]
) -> str:
    """The new table: the old table's rows before `since_us`, and the compiled query (`compile_sql(scan)`)
    over the source rows from `since_us` - the longest window on, kept from `since_us`."""
    old = offline.scan_sql(table_path, what=f"feature view {view.name!r} offline table")
    ts = offline.quote_identifier(offline.FEATURE_TS)
    if since_us is None:
        return f"SELECT * FROM {old}"
    since = f"CAST(make_timestamp({int(since_us)}) AS TIMESTAMPTZ)"  # the offline connection is UTC
    context = f"CAST(make_timestamp({int(since_us - span_us(longest_window(view)))}) AS TIMESTAMPTZ)"
    source_ts = offline.quote_identifier(view.source.timestamp_field)
    recent = f"(SELECT * FROM {source_scan} WHERE CAST({source_ts} AS TIMESTAMPTZ) >= {context})"
    return (
        f"SELECT * FROM {old} WHERE {ts} < {since}\n"
        f"UNION ALL BY NAME\n"
        f"SELECT * FROM (\n{compile_sql(recent)}\n) WHERE {ts} >= {since}"
    )
