"""Versioned writes: the write path of `RedisOnlineStore` (a mixin, split out to keep each file to
one job; the class itself is in redis_store.py).

A full write (`write_view(mode="full")`) allocates a new version, bulk-loads it (HSET commands of
`batch_size` entities, `pipeline_window` in flight, streamed from Arrow record batches), merges the
stream updates that arrived meanwhile (the overlay), then flips the view's pointer in one Lua
script; a failure deletes the partial version and the previous one keeps serving. Incremental
writes and stream updates (`update_entities`) are newer-event-time-wins upserts into the current
version, atomic per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import redis

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online import scripts
from ml_platform.featurestore.online.codec import EVENT_TIMESTAMP, ValueCodec, ViewSchema
from ml_platform.featurestore.online.entity_keys import entity_fields, entity_fields_from_rows
from ml_platform.featurestore.online.protocol import OnlineStoreError
from ml_platform.featurestore.online.resp import RespChannel, framed_command, to_text


class VersionedWrites:
    """`write_view` / `update_entities` of RedisOnlineStore (which provides the attributes here)."""

    client: redis.Redis
    batch_size: int
    pipeline_window: int
    _channel: RespChannel
    _codecs: dict[tuple[str, str], ValueCodec]
    _recorded: dict[str, ViewSchema]

    if TYPE_CHECKING:  # provided by RedisOnlineStore (declared only for type checkers: no MRO stubs)

        def meta_key(self, view: str) -> str: ...
        def data_key(self, view: str, version: int | str) -> str: ...
        def overlay_key(self, view: str, version: int | str) -> str: ...
        def _definition(self, view: FeatureView | str) -> FeatureView | None: ...
        def _definition_schema(self, definition: FeatureView) -> ViewSchema: ...
        def _current_schema(self, view: str, refresh: bool = False) -> ViewSchema: ...
        def _codec_for(self, schema: ViewSchema) -> ValueCodec: ...
        def _not_materialized(self, view: str) -> OnlineStoreError: ...
        def _retire(self, view: str, version: str, key: str) -> None: ...
        def _count_rows(self, view: str, version: int | str) -> int: ...
        def reap_retired(self, view: str | None = None, *, now: float | None = None) -> list[str]: ...

    def _view_for_write(self, view: FeatureView | str) -> FeatureView:
        definition = self._definition(view)
        if definition is None:
            raise ValueError(
                f"feature view {view!r} is not known to this online store: pass the FeatureView object, "
                f"or construct RedisOnlineStore(..., views=[...]) with it"
            )
        return definition

    def write_view(
        self,
        view: FeatureView | str,
        data: pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch] | Any,
        *,
        mode: str = "full",
        as_of: datetime | None = None,
        timestamp_column: str = EVENT_TIMESTAMP,
        chunk_rows: int = 65_536,
    ) -> dict[str, Any]:
        """Materialize one row per entity (join keys, event timestamp, the view's features).

        mode="full": write a new version, then flip the view's pointer in one atomic step (readers
        see the old snapshot or the new one, never a mix); the old version is then deleted (after
        `retire_grace_seconds`). mode="incremental": upsert the given entities into the current
        version, newer event time wins, each batch in one atomic script. Streams record batches,
        so memory stays bounded by `chunk_rows`. Returns rows, seconds, rows_per_s, version, mode.
        """
        if mode not in ("full", "incremental"):
            raise ValueError(f"mode must be 'full' or 'incremental', got {mode!r}")
        fv = self._view_for_write(view)
        schema = ViewSchema.of(fv)
        codec = ValueCodec(schema)
        started = time.perf_counter()
        self.reap_retired(fv.name)
        batches = record_batches(data, chunk_rows)
        meta = self.meta_key(fv.name)
        if mode == "incremental":
            current = self.client.hmget(meta, ["version", "current_fp"])
            if current[0] is None:
                raise self._not_materialized(fv.name)
            if to_text(current[1]) != codec.fingerprint:
                raise OnlineStoreError(
                    f"feature view {fv.name!r}: its features changed since version {to_text(current[0])} was "
                    f"materialized; run a full materialization instead of an incremental one"
                )
            rows = self._upsert_batches(fv.name, schema, codec, batches, timestamp_column)
            seconds = time.perf_counter() - started
            version = to_text(self.client.hget(meta, "version"))
            record = self._run_record("incremental", rows, seconds, as_of)
            previous = self.client.hget(meta, "as_of")
            if (
                previous is not None
                and "as_of" in record
                and datetime.fromisoformat(record["as_of"]) < datetime.fromisoformat(to_text(previous))
            ):
                record.pop("as_of")  # never move the recorded as_of backwards
            record["rows"] = self._count_rows(fv.name, version)
            self.client.hset(meta, mapping=record)
        else:
            rows, version = self._full_build(
                fv.name, schema, codec, batches, timestamp_column, as_of, started
            )
            seconds = time.perf_counter() - started
        self._recorded[fv.name] = schema
        return {
            "view": fv.name,
            "mode": mode,
            "rows": rows,
            "seconds": seconds,
            "rows_per_s": rows / seconds if seconds > 0 else float("inf"),
            "version": int(version),
        }

    def _run_record(self, mode: str, rows: int, seconds: float, as_of: datetime | None) -> dict[str, str]:
        record = {
            "last_mode": mode,
            "last_rows": str(rows),
            "last_seconds": f"{seconds:.6f}",
            "materialized_at": datetime.now(UTC).isoformat(),
        }
        if as_of is not None:
            if as_of.tzinfo is None:
                as_of = as_of.replace(tzinfo=UTC)
            record["as_of"] = as_of.astimezone(UTC).isoformat()
        elif mode == "full":
            record["as_of"] = ""  # a new snapshot of unknown as_of: do not keep the previous one's
        return record

    def _full_build(self, view, schema, codec, batches, timestamp_column, as_of, started) -> tuple[int, int]:
        meta = self.meta_key(view).encode()
        version = int(self.client.hincrby(meta, "next_version", 1))
        data_key = self.data_key(view, version)
        overlay = self.overlay_key(view, version)
        v = str(version).encode()
        stale = scripts.BEGIN.run(
            self._channel,
            scripts.BEGIN.frame(
                [meta],
                [
                    v,
                    data_key.encode(),
                    overlay.encode(),
                    codec.fingerprint.encode(),
                    schema.to_json().encode(),
                ],
            ),
        )
        stale_keys = [k for k in stale if k]
        if stale_keys:  # an unfinished earlier build (crashed or superseded): it can never be flipped now
            self.client.unlink(*stale_keys)
        try:
            rows = 0

            def commands() -> Iterator[bytes]:
                nonlocal rows
                head = [b"HSET", data_key.encode()]
                for batch in batches:
                    fields = entity_fields(schema.join_keys, batch)
                    values = codec.encode(batch, timestamp_column)
                    for start in range(0, batch.num_rows, self.batch_size):
                        stop = min(start + self.batch_size, batch.num_rows)
                        rows += stop - start
                        yield framed_command(head, fields[start:stop], values[start:stop])

            self._channel.stream(commands(), window=self.pipeline_window)
            # Bulk load done: from now on stream updates go straight into the new version, so the
            # overlay is frozen and can be merged (newer event time wins) before the flip.
            scripts.MERGE_PHASE.run(self._channel, scripts.MERGE_PHASE.frame([meta], [v]))
            self._merge_overlay(overlay, data_key)
            seconds = time.perf_counter() - started
            record = self._run_record("full", rows, seconds, as_of)
            record_args = [x.encode() for kv in record.items() for x in kv]
            old_version, old_key = scripts.FLIP.run(
                self._channel,
                scripts.FLIP.frame([meta], [v, data_key.encode(), codec.fingerprint.encode(), *record_args]),
                retry=False,  # if the connection drops mid-flip, the abort below keeps a flipped version
            )
        except BaseException as exc:
            # Keep the original error if the clean-up fails too; the next full build removes leftovers.
            with contextlib.suppress(redis.RedisError, OSError):
                scripts.ABORT.run(
                    self._channel, scripts.ABORT.frame([meta], [v, data_key.encode(), overlay.encode()])
                )
            if isinstance(exc, redis.ResponseError) and "SUPERSEDED" in str(exc):
                raise self._superseded(view, version, exc) from exc
            raise
        self._codecs[(view, str(version))] = codec
        if old_key:
            self._retire(view, to_text(old_version), to_text(old_key))
        return rows, version

    def _superseded(self, view: str, version: int, exc: Exception) -> OnlineStoreError:
        return OnlineStoreError(
            f"feature view {view!r}: another full materialization started while this one (version "
            f"{version}) was running; this run was discarded and the other one's version is kept"
        )

    def _run_script(self, script, key: str, payload: bytes) -> Any:
        """Run a framed script whose keys share `key`'s slot (one server here)."""
        return script.run(self._channel, payload)

    def _merge_overlay(self, overlay: str, data_key: str) -> None:
        cursor = 0
        while True:
            cursor, pairs = self.client.hscan(overlay, cursor, count=self.batch_size)
            if pairs:
                fields, values = list(pairs.keys()), list(pairs.values())
                self._run_script(
                    scripts.MERGE, data_key, scripts.MERGE.frame([data_key.encode()], pairs=(fields, values))
                )
            if cursor == 0:
                break
        self.client.unlink(overlay)

    def _upsert_batches(self, view, schema: ViewSchema, codec: ValueCodec, batches, timestamp_column) -> int:
        meta = self.meta_key(view).encode()
        fp = codec.fingerprint.encode()
        rows = 0

        def commands() -> Iterator[bytes]:
            nonlocal rows
            for batch in batches:
                fields = entity_fields(schema.join_keys, batch)
                values = codec.encode(batch, timestamp_column)
                for start in range(0, batch.num_rows, self.batch_size):
                    stop = min(start + self.batch_size, batch.num_rows)
                    rows += stop - start
                    yield scripts.UPSERT.frame([meta], [fp], pairs=(fields[start:stop], values[start:stop]))

        scripts.UPSERT.load(self._channel)  # `batches` can be read once: no NOSCRIPT retry mid-stream
        try:
            self._channel.stream(commands(), window=self.pipeline_window)
        except redis.ResponseError as exc:
            raise self._upsert_error(view, exc) from exc
        return rows

    def _upsert_error(self, view: str, exc: Exception) -> Exception:
        text = str(exc)
        if text.startswith("NOT_MATERIALIZED"):
            return self._not_materialized(view)
        if text.startswith("SCHEMA_MISMATCH"):
            self._recorded.pop(view, None)
            return OnlineStoreError(
                f"feature view {view!r}: the values' features differ from the materialized version's; "
                f"run a full materialization of the view (or update the feature view definition)"
            )
        return exc

    def update_entities(
        self, view: FeatureView | str, rows: Sequence[Mapping[str, Any]] | pa.Table
    ) -> dict[str, int]:
        """Write the latest values of a few entities into the current version (the stream worker's
        path): each row needs the join keys, `event_timestamp` and every feature of the view.
        Atomic per call; per entity the newest event time wins, so a replayed or late event never
        overwrites a newer value. While a full materialization is running, the update also goes
        into the new version, so the flip does not lose it. Returns rows sent and written."""
        definition = self._definition(view)
        name = definition.name if definition is not None else str(view)
        schema = self._definition_schema(definition) if definition is not None else self._current_schema(name)
        codec = self._codec_for(schema)
        if isinstance(rows, pa.Table):
            n = rows.num_rows
            fields, values = (entity_fields(schema.join_keys, rows), codec.encode(rows)) if n else ([], [])
        else:
            rows = list(rows)
            n = len(rows)
            required = [k for k, _ in schema.join_keys] + [EVENT_TIMESTAMP] + codec.names
            for i, row in enumerate(rows):
                missing = [c for c in required if c not in row]
                if missing:
                    raise ValueError(
                        f"update of feature view {name!r}: row {i} has no {missing}; every row needs {required}"
                    )
            try:
                fields, values = entity_fields_from_rows(schema.join_keys, rows), codec.encode_rows(rows)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"update of feature view {name!r}: {exc}") from exc
        if n == 0:
            return {"rows": 0, "written": 0}
        try:
            written = self._upsert(name, codec, fields, values)
        except redis.ResponseError as exc:
            raise self._upsert_error(name, exc) from exc
        return {"rows": n, "written": written}

    def _upsert(self, view: str, codec: ValueCodec, fields, values) -> int:
        """Newer-wins upsert of (fields, values), `batch_size` entities per atomic script."""
        meta = self.meta_key(view).encode()
        written = 0
        for start in range(0, len(fields), self.batch_size):
            stop = min(start + self.batch_size, len(fields))
            payload = scripts.UPSERT.frame(
                [meta], [codec.fingerprint.encode()], pairs=(fields[start:stop], values[start:stop])
            )
            written += int(scripts.UPSERT.run(self._channel, payload))
        return written


def record_batches(data: Any, chunk_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of at most `chunk_rows` rows from a Table, RecordBatch, RecordBatchReader,
    an iterable of batches or tables, a pandas DataFrame or a list of dicts."""
    if isinstance(data, pa.Table):
        yield from data.to_batches(max_chunksize=chunk_rows)
        return
    if isinstance(data, pa.RecordBatch):
        data = [data]
    elif isinstance(data, list) and (not data or isinstance(data[0], Mapping)):
        yield from pa.Table.from_pylist(data).to_batches(max_chunksize=chunk_rows)
        return
    elif type(data).__name__ == "DataFrame":
        yield from pa.Table.from_pandas(data, preserve_index=False).to_batches(max_chunksize=chunk_rows)
        return
    for batch in data:
        if isinstance(batch, pa.Table):
            yield from batch.to_batches(max_chunksize=chunk_rows)
            continue
        for start in range(0, batch.num_rows, chunk_rows):
            yield batch.slice(start, chunk_rows)
