"""Redis streams -> the prediction log's Parquet files (layout and schema: `prediction_log`).

Two streams, one file format, one way to stay exact across crashes:
- `drain_prediction_log`: the API's log stream (`<project>:predictions`, written only for the
  log) -> `source=api/`. Entries are trimmed (XTRIM MINID, exact) once they are on disk.
- `drain_stream_predictions`: the stream worker's output stream (`<project>:stream:predictions`)
  -> `source=stream/`. That stream is the product downstream applications consume, so it is
  never trimmed here: the drain reads it with a consumer group of its own (`LOG_GROUP`,
  XREADGROUP then XACK), which also shows how far behind the log is (`XINFO GROUPS`: lag).

Files are `date=YYYY-MM-DD/part-<first id>_<last id>.parquet` (the UTC day of the stream id,
i.e. when the entry was logged), each written to a temp file and renamed, in id order. So the
files always hold a prefix of the stream, and the newest id in a file name (`written_watermark`)
says where it ends: an entry at or below it is on disk already and is skipped, not written
twice. A crash after a file is written and before the trim / the XACK therefore loses nothing
(the entries are still in the stream / pending in the group) and duplicates nothing (the re-run
skips them, then trims / acknowledges them). One drain at a time per stream (a Redis lock).

An entry that cannot be read (not JSON, a field of the wrong type) is kept as a row with its
stream id and the raw entry in `flags` ({"unparsed_entry": ..., "error": ...}), never dropped.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import redis

from ml_platform.atomic_files import write_parquet_atomic
from ml_platform.serving.prediction_log import (
    ENTRY_FIELD,
    LOG_COLUMNS,
    SOURCE_COLUMN,
    day_dir,
    legacy_table,
    log_table,
    source_dir,
)
from ml_platform.serving.stream.streams import PREDICTION_FIELD, as_text, input_column_names

LOG_GROUP = "prediction-log"  # the drain's consumer group on the stream worker's output stream
LOG_CONSUMER = "drain"  # its one consumer (one drain at a time: the lock)
_INT = {"user_id", "merchant_id", "model_version"}
_FLOAT = {"amount", "probability", "threshold", "latency_ms", "selection_probability"}
_TIME = {"predicted_at", "event_timestamp"}

Entry = tuple[Any, Any]  # (stream id, fields) as redis-py returns them


def _sid(value: bytes | str) -> tuple[int, int]:
    text = value.decode() if isinstance(value, bytes) else value
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def written_watermark(out_dir: str | Path) -> tuple[int, int]:
    """The newest stream id in a file name under `out_dir` (a source's folder; (0, 0) if none)."""
    best = (0, 0)
    for path in Path(out_dir).glob("date=*/part-*_*.parquet"):
        try:
            last = _sid(path.stem.split("_", 1)[1])
        except (IndexError, ValueError):
            continue
        best = max(best, last)
    return best


# --------------------------------------------------------------------------- entries -> rows


def _field(fields: Any, name: str) -> Any:
    if not fields:
        return None
    return fields.get(name.encode(), fields.get(name))


def api_record(fields: Any) -> dict[str, Any]:
    """An API log entry's fields -> its record (the JSON object `prediction_entry` wrote)."""
    return orjson.loads(_field(fields, ENTRY_FIELD))


class StreamRecords:
    """Stream worker output entries -> log records (`parse` for `entries_table`).

    The output's JSON (`serving.stream.emit`) names the transaction by `event_id`: the event's
    `transaction_id` (a transaction's event id is its transaction id). Its time is `scored_at`;
    its latency is from the input entry's id (when the event entered the input stream) to
    `scored_at`: time queued in the input stream included, at the input id's millisecond
    precision (and across the Redis and worker clocks). Its `features` array is named by its model
    version's entry in `<stream>:input_columns` (read once, again for a version not seen yet);
    an array no entry names is kept in `flags` (`unnamed_features`)."""

    def __init__(self, client: redis.Redis, stream: str):
        self.client, self.stream = client, stream
        self.names = input_column_names(client, stream)
        self._looked_again: set[int] = set()

    def __call__(self, fields: Any) -> dict[str, Any]:
        record = orjson.loads(_field(fields, PREDICTION_FIELD))
        if not isinstance(record, dict):
            raise TypeError(f"not a JSON object: {type(record).__name__}")
        record.setdefault("transaction_id", record.get("event_id"))
        scored_at = record.get("predicted_at") or record.get("scored_at")
        record["predicted_at"] = scored_at
        input_id = record.get("input_id")
        if record.get("latency_ms") is None and scored_at and input_id:
            scored_ms = _as_utc(scored_at).timestamp() * 1000.0
            record["latency_ms"] = round(scored_ms - _sid(str(input_id))[0], 3)
        flags = {k: record[k] for k in ("consumer", "input_id") if record.get(k) is not None}
        values = record.get("features")
        if isinstance(values, list):
            names = self._names(record.get("model_version"))
            if names is not None and len(names) == len(values):
                record["features"] = dict(zip(names, values))
            else:
                record["features"] = None
                flags["unnamed_features"] = values
        record["flags"] = flags
        return record

    def _names(self, version: Any) -> list[str] | None:
        if not isinstance(version, int):
            return None
        if version not in self.names and version not in self._looked_again:  # published since?
            self._looked_again.add(version)
            self.names = input_column_names(self.client, self.stream)
        return self.names.get(version)


def _as_utc(value: Any) -> datetime:
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    """A record's LOG_SCHEMA values, typed; a value of the wrong kind is a ValueError naming it."""
    row = {}
    for name in LOG_COLUMNS:
        value = record.get(name)
        if value is None or name == SOURCE_COLUMN:
            row[name] = None
            continue
        try:
            if name in _TIME:
                value = _as_utc(value)
            elif name == "flags":
                value = value if isinstance(value, str) else orjson.dumps(value).decode()
            elif name in _INT:
                value = int(value)
            elif name in _FLOAT:
                value = float(value)
            else:
                value = str(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"field {name!r}: {value!r} is not a valid value ({exc})") from None
        row[name] = value
    return row


def entries_table(entries: Sequence[Entry], source: str, parse: Callable[[Any], dict]) -> pa.Table:
    """Stream entries -> a log table (rows in entry order; features as FEATURE_PREFIX columns,
    the union of the entries' inputs in first-seen order)."""
    columns: dict[str, list] = {name: [] for name in LOG_COLUMNS}
    features: list[dict] = []
    for sid, fields in entries:
        try:
            record = parse(fields)
            if not isinstance(record, dict):
                raise TypeError(f"not a JSON object: {type(record).__name__}")
            row = _row(record)
            inputs = record.get("features") or {}
            if not isinstance(inputs, dict):
                raise TypeError(f"features is not a JSON object: {type(inputs).__name__}")
        except (TypeError, ValueError, KeyError, AttributeError) as exc:  # (JSONDecodeError: a ValueError)
            raw = {as_text(k): as_text(v) for k, v in fields.items()} if fields else None
            flags = {"unparsed_entry": raw, "error": f"{type(exc).__name__}: {exc}"[:500]}
            row, inputs = {"flags": orjson.dumps(flags).decode()}, {}
        row["stream_id"] = as_text(sid)
        for name in LOG_COLUMNS:
            columns[name].append(row.get(name))
        features.append(inputs)
    names = list(dict.fromkeys(name for inputs in features for name in inputs))
    values = {name: [inputs.get(name) for inputs in features] for name in names}
    return log_table({**columns, SOURCE_COLUMN: source}, values, len(entries))


def migrate_legacy_layout(log_dir: str | Path) -> list[str]:
    """Move the first layout's API files (`<log dir>/date=D/part-*.parquet`) to `source=api/date=D/`
    under the same name, rewritten in the current schema (the old file is deleted once the new one
    is in place; a crash in between leaves both, and the next run rewrites and deletes again).
    Returns the new paths. The drain of the API log runs it first; the reader reads old files
    that are still there as api rows too."""
    log_dir = Path(log_dir)
    moved = []
    for old in sorted(log_dir.glob("date=*/part-*_*.parquet")):
        new = day_dir(log_dir, "api", old.parent.name.removeprefix("date=")) / old.name
        write_parquet_atomic(new, legacy_table(pq.read_table(old)))
        old.unlink()
        with contextlib.suppress(OSError):
            old.parent.rmdir()
        moved.append(str(new))
    return moved


# --------------------------------------------------------------------------- writing


def _write_days(table: pa.Table, sids: list[Any], log_dir: Path, source: str) -> list[str]:
    """Write `table` (rows in stream id order) as one file per UTC day of the stream id."""
    days = [datetime.fromtimestamp(_sid(sid)[0] / 1000, UTC).date() for sid in sids]
    files, start = [], 0
    while start < len(days):
        stop = start
        while stop < len(days) and days[stop] == days[start]:
            stop += 1
        path = (
            day_dir(log_dir, source, days[start])
            / f"part-{as_text(sids[start])}_{as_text(sids[stop - 1])}.parquet"
        )
        write_parquet_atomic(path, table.slice(start, stop - start))
        files.append(str(path))
        start = stop
    return files


@contextlib.contextmanager
def _drain_lock(client: redis.Redis, stream: str, timeout_s: float) -> Iterator[None]:
    key, token = f"{stream}:drain-lock", uuid.uuid4().hex
    if not client.set(key, token, nx=True, px=int(timeout_s * 1000)):
        raise RuntimeError(
            f"another drain of {stream!r} is running (lock {key!r}); wait for it, or delete the key "
            f"if that process died (it expires after {timeout_s:.0f} s)"
        )
    try:
        yield
    finally:  # release the lock only if it is still ours
        client.eval(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            1,
            key,
            token,
        )


class _Progress:
    def __init__(self, source: str, stream: str, log_dir: Path):
        self.source, self.stream, self.log_dir = source, stream, log_dir
        self.started = time.perf_counter()
        self.rows = self.skipped = 0
        self.files: list[str] = []
        self.first_id: str | None = None
        self.last_id: str | None = None
        self.watermark = written_watermark(source_dir(log_dir, source))

    def write(self, entries: Sequence[Entry], parse: Callable[[Any], dict]) -> None:
        """Write the entries above the watermark (in id order); skip the others."""
        fresh = [(sid, f) for sid, f in entries if _sid(sid) > self.watermark]
        self.skipped += len(entries) - len(fresh)
        if not fresh:
            return
        table = entries_table(fresh, self.source, parse)
        self.files += _write_days(table, [sid for sid, _ in fresh], self.log_dir, self.source)
        self.rows += len(fresh)
        self.first_id = self.first_id or as_text(fresh[0][0])
        self.last_id = as_text(fresh[-1][0])
        self.watermark = _sid(fresh[-1][0])

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "source": self.source,
            "stream": self.stream,
            "rows": self.rows,
            "files": self.files,
            "skipped": self.skipped,
            "first_id": self.first_id,
            "last_id": self.last_id,
            **extra,
            "seconds": round(time.perf_counter() - self.started, 3),
        }


# --------------------------------------------------------------------------- the drains


def drain_prediction_log(
    client: redis.Redis,
    stream: str,
    log_dir: str | Path,
    *,
    batch_size: int = 50_000,
    lock_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Move the API log stream's entries into `<log_dir>/source=api/` and trim them from the stream.

    `client` is a synchronous redis.Redis. The stream is trimmed (XTRIM MINID, exact) only up to
    what is on disk; entries already on disk are skipped (see the module's docstring). Files of
    the first layout (`<log_dir>/date=D/`) are moved under `source=api/` first.
    Returns {"source", "stream", "rows", "files", "skipped", "first_id", "last_id", "migrated", "seconds"}."""
    log_dir = Path(log_dir)
    with _drain_lock(client, stream, lock_timeout_s):
        migrated = migrate_legacy_layout(log_dir)
        progress = _Progress("api", stream, log_dir)
        start = "-"
        while True:
            entries = client.xrange(stream, min=start, max="+", count=batch_size)
            if not entries:
                break
            progress.write(entries, api_record)
            ms, seq = _sid(entries[-1][0])
            # Everything up to it is on disk now: trim exactly that (MINID keeps ids >= it).
            client.xtrim(stream, minid=f"{ms}-{seq + 1}", approximate=False)
            start = "(" + as_text(entries[-1][0])
            if len(entries) < batch_size:
                break
    return progress.result(migrated=len(migrated))


def undrained_api_log(client: redis.Redis, stream: str, *, since_ms: int = 0, count: int = 200_000) -> pa.Table:
    """The API log entries still in the stream (not drained yet) from `since_ms` on, as a log
    table: with the drained files they are the whole log up to now (a rollout's evidence)."""
    entries = client.xrange(stream, min=f"{int(since_ms)}-0", max="+", count=count)
    return entries_table(entries, "api", api_record)


def drain_stream_predictions(
    client: redis.Redis,
    stream: str,
    log_dir: str | Path,
    *,
    group: str = LOG_GROUP,
    batch_size: int = 50_000,
    lock_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Copy the stream worker's output stream into `<log_dir>/source=stream/`, without trimming it.

    Reads with the consumer group `group` (created at the stream's beginning the first time, so
    the whole retained history is logged): first the entries the group delivered to the drain but
    never acknowledged (a drain that died after writing a file, or before), then new entries;
    each batch is written (entries already on disk skipped), then acknowledged. A stream that
    does not exist yet is left alone (nothing to log, no key created).
    Returns the same keys as `drain_prediction_log`, with "group", "acknowledged" and "lag"
    (entries of the stream the group has not read yet, after the drain; Redis >= 7)."""
    log_dir = Path(log_dir)
    with _drain_lock(client, stream, lock_timeout_s):
        progress = _Progress("stream", stream, log_dir)
        if not client.exists(stream):
            return progress.result(group=group, acknowledged=0, lag=0)
        try:
            client.xgroup_create(stream, group, id="0")
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        acknowledged = 0
        parse = StreamRecords(client, stream)
        cursor = "0"  # this consumer's pending entries first, then ">" (never delivered)
        while True:
            reply = client.xreadgroup(group, LOG_CONSUMER, {stream: cursor}, count=batch_size)
            entries = reply[0][1] if reply else []
            if not entries:
                if cursor == "0":
                    cursor = ">"
                    continue
                break
            # A pending entry deleted from the stream since comes back without fields: ack it only.
            progress.write([(sid, f) for sid, f in entries if f], parse)
            ids = [sid for sid, _ in entries]
            for i in range(0, len(ids), 10_000):
                acknowledged += client.xack(stream, group, *ids[i : i + 10_000])
            if cursor == ">" and len(entries) < batch_size:
                break
        lag = next((g.get("lag") for g in client.xinfo_groups(stream) if as_text(g["name"]) == group), None)
    return progress.result(group=group, acknowledged=acknowledged, lag=lag)
