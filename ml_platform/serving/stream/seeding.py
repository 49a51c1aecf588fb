"""A cold start of the stream state: fold the recent raw history into the buffers once per
project (`seed_once`, `seed_from_raw`), and give views the stream updates an empty online version
(`empty_feature_table`)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import redis

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online import ARROW_TYPE, EVENT_TIMESTAMP
from ml_platform.featurestore.streaming import StreamingUpdater, events_from_frame
from ml_platform.serving.stream.streams import StreamNames, as_text, default_consumer_name


def empty_feature_table(view: FeatureView) -> pa.Table:
    """A zero-row table with the view's online columns (join keys, event_timestamp, features)."""
    fields = [pa.field(k, pa.int64()) for k in view.join_keys]
    fields.append(pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")))
    fields += [pa.field(f.name, ARROW_TYPE[f.dtype]) for f in view.schema]
    return pa.schema(fields).empty_table()


def seed_from_raw(updater: StreamingUpdater, raw_dir, *, batch_size: int = 5000) -> int:
    """Fold the raw events of the last windows (each view's longest window + slack before the
    newest event) into the buffers, so a fresh stream state starts with the history the offline
    store saw. Idempotent: events already in a buffer are not counted twice. Returns rows read."""
    from ml_platform.sources.raw_events import all_partition_days, read_days

    days = all_partition_days(raw_dir)
    if not days:
        return 0
    longest = max(cv.max_window_us for cv in updater.compiled.values()) + updater.trim_slack_us
    # Labels arrive up to ~30 days after their event: read that much further back.
    first = days[-1] - timedelta(microseconds=longest) - timedelta(days=31)
    chosen = [d for d in days if d >= first]
    frame = read_days(raw_dir, chosen)
    views = [cv.view for cv in updater.compiled.values()]
    events = events_from_frame(frame, views)
    for field_name in {cv.timestamp_field for cv in updater.compiled.values()}:
        keep = max(cv.max_window_us for cv in updater.compiled.values() if cv.timestamp_field == field_name)
        stamps = [e[field_name] for e in events if e.get(field_name) is not None]
        if not stamps:
            continue
        cutoff = max(stamps) - keep - updater.trim_slack_us
        for e in events:
            if e.get(field_name) is not None and e[field_name] < cutoff:
                e[field_name] = None
    return updater.seed(events, batch_size=batch_size)


def seed_once(
    client: redis.Redis, updater: StreamingUpdater, names: StreamNames, raw_dir, wait_s: float = 600
) -> dict:
    """Seed the shared state once per project: the first worker seeds (under a lock), the others
    wait for it. Returns the seeding record."""
    record = client.hgetall(names.seeded)
    if record:
        return {as_text(k): as_text(v) for k, v in record.items()}
    lock = names.seeded + ":lock"
    if client.set(lock, default_consumer_name(), nx=True, ex=int(wait_s)):
        try:
            started = time.perf_counter()
            rows = seed_from_raw(updater, raw_dir)
            record = {
                "rows": str(rows),
                "seconds": f"{time.perf_counter() - started:.3f}",
                "at": datetime.now(UTC).isoformat(),
            }
            client.hset(names.seeded, mapping=record)
            return record
        finally:
            client.delete(lock)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        record = client.hgetall(names.seeded)
        if record:
            return {as_text(k): as_text(v) for k, v in record.items()}
        time.sleep(0.5)
    raise TimeoutError(
        f"another worker has been seeding the stream state for over {wait_s} s ({lock}); check it"
    )
