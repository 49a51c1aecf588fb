"""The stream worker: one consumer of the group that reads transaction and label events, folds
them into the windowed features, scores them with the champion and writes the predictions.

Per batch (XREADGROUP of up to `batch_size` entries, or XAUTOCLAIM of a dead worker's entries):
  1. parse and validate every entry (`events.parse_event`); a malformed one goes to the
     dead-letter stream with the reason and its raw payload, and is acknowledged: the worker
     never stops on bad input;
  2. skip events already decided (a per-event `done` key, see 5.);
  3. fold the events into the per-entity buffers (`StreamingUpdater`) and take, for each event,
     its features as of just before it (`features.feature_lookup_time`); views the stream does
     not update are read from the online store (`scoring_plan.ScoringPlan`);
  4. score the batch with the model (one call of its scoring path; during an experiment, each
     arm's events with its own version, `arms.py`), then write the entities' new
     latest values into the online store (`RedisOnlineStore.update_entities`);
  5. the emit script (`emit.py`): decisions, outputs, dead letters, then XACK, atomically (on a
     Redis Cluster split by slot, outputs and dead letters before the XACK: docs/streaming.md).
Steps 4 (online write) and 5 run in the sink thread (`sink.BatchSink`) while the next batch is
read and folded: one batch in flight (`_InFlight`).

Why this module is over 400 lines: the loop, the pipelining (one batch folded while the previous
one is scored and written) and the isolation of a failing event all act on the same in-flight
state and the same consumer's pending list; split apart, each piece would need the others' state.
Everything that does not touch that state lives next door (events, emit, scoring_plan, sink, stats).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import redis

from ml_platform import features as fr
from ml_platform.featurestore.online import OnlineStoreError, RedisOnlineStore
from ml_platform.featurestore.redis_cluster import is_cluster_client
from ml_platform.featurestore.streaming import EVENT_ID, PendingFold, StreamingUpdater
from ml_platform.serving.scoring import LoadedModel
from ml_platform.serving.stream.arms import arm_items
from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.emit import Emitter, logged_features, prediction_items, publish_input_columns
from ml_platform.serving.stream.events import EVENT_FIELD, TRANSACTION, MalformedEvent, parse_event
from ml_platform.serving.stream.scoring_plan import ScoringPlan
from ml_platform.serving.stream.seeding import empty_feature_table
from ml_platform.serving.stream.sink import BatchSink, SinkError
from ml_platform.serving.stream.stats import PhaseClock, WorkerStats
from ml_platform.serving.stream.streams import as_text, default_consumer_name, stream_names

_log = logging.getLogger(__name__)

# Infrastructure trouble: keep the entries pending and retry after a pause (never dead-letter).
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, OnlineStoreError, SinkError)


class StreamWorker:
    """One consumer of the group: reads, scores, updates features, writes predictions.

    `model_source.current()` gives the model to score with (a `champion.ChampionWatcher`; any
    object whose `current()` returns a ScoringPath or LoadedModel, e.g. a stand-in in tests); no
    batch is read while it gives None.
    `online` must hold every view the model reads that the stream does not update itself.
    """

    def __init__(
        self,
        client: redis.Redis,
        online: RedisOnlineStore,
        updater: StreamingUpdater,
        model_source,
        project: str,
        config: StreamConfig | None = None,
        router=None,  # an experiments.router.ExperimentRouter: the active experiment's arms score
    ) -> None:
        self.client = client
        self.router = router
        self.online = online
        self.updater = updater
        self.model_source = model_source
        self.config = config or StreamConfig()
        self.names = stream_names(project, self.config, cluster=is_cluster_client(client))
        self.consumer = self.config.consumer or default_consumer_name()
        self.stats = WorkerStats(fold_seconds=updater.phase_seconds)
        self._emit = Emitter(client, self.names, self.config, self.consumer)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._own_pending = True  # first read this consumer's own unacknowledged entries
        self._plans: dict[int, ScoringPlan] = {}
        self._input_columns: set[tuple[int, tuple[str, ...]]] = set()  # published (version, names)
        self._stats_lock = threading.Lock()
        self._sink = BatchSink(self._write, self.consumer) if self.config.pipeline else None
        self._inflight: _InFlight | None = None  # read and folded, not yet scored (pipelined)
        # Views folded by transaction events (looked up from the buffers) and by label events.
        self.transaction_views = [
            n for n, cv in updater.compiled.items() if cv.timestamp_field == fr.EVENT_TS
        ]
        self.label_views = [n for n, cv in updater.compiled.items() if cv.timestamp_field == fr.LABEL_TS]

    # ---- setup

    def ensure_group(self) -> None:
        """Create the consumer group (reading the stream from its beginning) if it does not exist."""
        try:
            self.client.xgroup_create(self.names.input, self.config.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def ensure_online_views(self) -> None:
        """Views the stream updates get an empty online version if never materialized (so
        update_entities has somewhere to write); views it only reads must be materialized."""
        for name in [*self.transaction_views, *self.label_views]:
            if not self.online.metadata(name):
                view = self.updater.compiled[name].view
                self.online.write_view(view, empty_feature_table(view), mode="full")
                _log.info("created an empty online version of %s", name)

    # ---- the loop

    def run(
        self,
        stop: threading.Event | None = None,
        *,
        max_entries: int | None = None,
        until_idle: bool = False,
    ) -> WorkerStats:
        """Process batches until `stop` is set, `max_entries` entries were handled, or (with
        `until_idle`) a read finds nothing new and nothing is left to claim."""
        stop = stop or threading.Event()
        self.ensure_group()
        backoff = 0.5
        while True:
            if stop.is_set() or (
                max_entries is not None and self.stats.entries + self.in_flight >= max_entries
            ):
                try:
                    self.flush()
                    break
                except RETRYABLE as exc:
                    self._own_pending = True
                    _log.warning("stream worker %s: writing the last batch failed: %s", self.consumer, exc)
                    if stop.is_set():
                        break
                    continue
            try:
                handled = self.step()
                if handled == 0:
                    self.flush()
                backoff = 0.5
            except RETRYABLE as exc:
                self.stats.retries += 1
                self._own_pending = True
                self._inflight = None  # its entries stay pending: read again
                _log.warning("stream worker %s: %s; retrying in %.1f s", self.consumer, exc, backoff)
                stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if handled == 0 and until_idle and not self._claimable():
                break
        return self.stats

    def close(self) -> None:
        """Finish the batch being written and stop the sink and fold-script threads."""
        try:
            if self._sink is not None:
                try:
                    self._sink.wait()
                finally:
                    self._sink.close()
        finally:
            self.updater.close()

    def step(self) -> int:
        """One batch: this consumer's own pending entries first, then stale entries of other
        consumers (every `claim_interval_s`), else new entries. Returns entries handled."""
        model = self._model()
        if model is None:
            time.sleep(min(1.0, self.config.block_ms / 1000))  # no champion yet: leave events queued
            return 0
        entries = []
        began = time.perf_counter()
        if self._own_pending:
            self.flush()  # a batch still being written is pending too: let it finish first
            reply = self.client.xreadgroup(
                self.config.group, self.consumer, {self.names.input: "0"}, count=self.config.batch_size
            )
            entries = reply[0][1] if reply else []
            if not entries:
                self._own_pending = False
        if not entries and time.monotonic() >= self._next_claim:
            entries = self.claim_stale()
            if len(entries) < self.config.batch_size:
                self._next_claim = time.monotonic() + self.config.claim_interval_s
        fresh = False
        if not entries and not self._own_pending:
            reply = self.client.xreadgroup(
                self.config.group,
                self.consumer,
                {self.names.input: ">"},
                count=self.config.batch_size,
                # with a batch in flight, finish it rather than wait for new entries
                block=None if self._inflight is not None else (self.config.block_ms or None),
            )
            entries = reply[0][1] if reply else []
            fresh = True
        if not entries:
            self._drain()
            return 0
        self.stats.phase_seconds["read"] = (
            self.stats.phase_seconds.get("read", 0.0) + time.perf_counter() - began
        )
        if fresh and self.config.pipeline:
            self._pipelined(entries, model)
        else:
            self._drain()
            self.process(entries, model)
        return len(entries)

    def _pipelined(self, entries, model: LoadedModel | None) -> None:
        """Overlap Redis with Python: this batch's fold script runs in Redis while the previous
        batch is evaluated, scored and handed to the sink (one batch in flight). Any failure
        drops the overlap: a failed batch goes through `process` (isolating a bad event), and a
        batch whose fold was already sent stays pending and is read again (`_own_pending`)."""
        previous, self._inflight = self._inflight, None
        try:
            current = self._prepare(entries, model)
            if previous is not None and previous.fold is not None:
                previous.fold.collect()  # its reply, before this batch's fold reads the cache
        except RETRYABLE:
            raise
        except Exception:  # noqa: BLE001 - isolate the failing event, both batches synchronously
            if previous is not None:
                self.process(previous.entries, previous.model)
            self.process(entries, model)
            return
        try:
            self._fold_submit(current)
        except RETRYABLE:
            raise
        except Exception:  # noqa: BLE001
            if previous is not None:
                self._complete_or_isolate(previous)
            self.process(entries, model)
            return
        self._inflight = current
        if previous is not None:
            try:
                self._complete(previous)
            except RETRYABLE:
                self._inflight = None
                raise
            except Exception:  # noqa: BLE001 - this batch is re-read from the pending list
                self._inflight = None
                self._own_pending = True
                self.process(previous.entries, previous.model)

    def _complete_or_isolate(self, batch: _InFlight) -> None:
        try:
            self._complete(batch)
        except RETRYABLE:
            raise
        except Exception:  # noqa: BLE001
            self.process(batch.entries, batch.model)

    def _drain(self) -> None:
        """Finish the batch in flight (if any)."""
        batch, self._inflight = self._inflight, None
        if batch is not None:
            self._complete_or_isolate(batch)

    @property
    def in_flight(self) -> int:
        """Entries read and folded but not yet scored (the pipelined batch)."""
        return len(self._inflight.entries) if self._inflight is not None else 0

    def claim_stale(self) -> list:
        """XAUTOCLAIM entries idle longer than `claim_idle_ms` (their worker died); an entry
        delivered more than `max_deliveries` times goes to the dead-letter stream instead."""
        reply = self.client.xautoclaim(
            self.names.input,
            self.config.group,
            self.consumer,
            min_idle_time=self.config.claim_idle_ms,
            start_id=self._claim_cursor,
            count=self.config.batch_size,
        )
        cursor, entries = reply[0], reply[1]
        self._claim_cursor = cursor if cursor not in (b"0-0", "0-0") else "0-0"
        entries = [(i, f) for i, f in entries if f is not None]
        if not entries:
            return []
        self.stats.claimed += len(entries)
        pending = self.client.xpending_range(
            self.names.input,
            self.config.group,
            min=entries[0][0],
            max=entries[-1][0],
            count=len(entries) * 2 + 10,
            consumername=self.consumer,
        )
        deliveries = {p["message_id"]: p["times_delivered"] for p in pending}
        poison = [(i, f) for i, f in entries if deliveries.get(i, 0) > self.config.max_deliveries]
        if poison:
            dead = [
                (
                    i,
                    f"delivered {deliveries[i]} times without being acknowledged (it keeps failing)",
                    f.get(EVENT_FIELD.encode(), b""),
                )
                for i, f in poison
            ]
            self._finish([], [], dead, [])
            ids = {i for i, _ in poison}
            entries = [(i, f) for i, f in entries if i not in ids]
        return entries

    def _claimable(self) -> bool:
        """Whether some entry of the group is pending long enough to be claimed."""
        summary = self.client.xpending(self.names.input, self.config.group)
        if not summary or not summary.get("pending"):
            return False
        oldest = self.client.xpending_range(
            self.names.input, self.config.group, min="-", max="+", count=1, idle=self.config.claim_idle_ms
        )
        return bool(oldest)

    def _model(self) -> LoadedModel | None:
        model = self.model_source.current() if self.model_source is not None else None
        self.stats.model_version = model.version if model is not None else None
        return model

    # ---- one batch

    def process(
        self, entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]], model: LoadedModel | None
    ) -> None:
        """Process entries; a failing batch is split until the failing event is isolated and
        dead-lettered (infrastructure errors are raised instead: the entries stay pending)."""
        try:
            self._process(entries, model)
        except RETRYABLE:
            raise
        except Exception as exc:  # noqa: BLE001 - isolate the failing event (below); never stop
            if len(entries) == 1:
                entry_id, fields = entries[0]
                reason = f"processing failed: {type(exc).__name__}: {exc}"[:1000]
                _log.exception("dead-lettering entry %s", entry_id)
                self._finish([], [], [(entry_id, reason, fields.get(EVENT_FIELD.encode(), b""))], [])
                self.stats.entries += 1
                return
            half = len(entries) // 2
            self.process(entries[:half], model)
            self.process(entries[half:], model)

    def _process(self, entries, model: LoadedModel | None) -> None:
        """One batch, start to finish (the path of claimed, own-pending and isolated entries)."""
        batch = self._prepare(entries, model)
        self._fold_submit(batch)
        self._complete(batch)

    def _prepare(self, entries, model: LoadedModel | None) -> _InFlight:
        """Parse and validate (malformed entries become dead letters), drop events already
        decided (replays). Touches no feature state."""
        clock = PhaseClock(self.stats.phase_seconds)
        field_name = EVENT_FIELD.encode()
        transactions: list[tuple[bytes, dict]] = []
        labels: list[tuple[bytes, dict]] = []
        dead: list[tuple[bytes, str, bytes]] = []
        acks: list[bytes] = []
        seen: set[tuple[str, str]] = set()
        for entry_id, fields in entries:
            if not fields:  # deleted from the stream while pending: nothing to process
                acks.append(entry_id)
                continue
            payload = fields.get(field_name)
            try:
                event = parse_event(payload)
            except MalformedEvent as exc:
                raw = (
                    payload
                    if payload is not None
                    else orjson.dumps({as_text(k): as_text(v) for k, v in fields.items()})
                )
                dead.append((entry_id, str(exc), raw))
                continue
            ident = (event["kind"], event[EVENT_ID])
            if ident in seen:  # the same event twice in one batch: decide it once
                acks.append(entry_id)
                with self._stats_lock:
                    self.stats.duplicates += 1
                continue
            seen.add(ident)
            (transactions if event["kind"] == TRANSACTION else labels).append((entry_id, event))

        clock.lap("parse")
        # Already decided (a replay): acknowledge only.
        done_keys: list[str] = []  # the transactions' done keys (`_done_key`), kept for the emit
        if transactions or labels:
            prefix = self.names.done_prefix
            done_keys = [prefix + e[EVENT_ID] for _, e in transactions]
            flags = [
                value is not None
                for value in self.client.mget(done_keys + [self._done_key(e) for _, e in labels])
            ]
            fresh_tx, fresh_keys, fresh_lb = [], [], []
            for item, key, done in zip(transactions, done_keys, flags):
                if done:
                    acks.append(item[0])
                else:
                    fresh_tx.append(item)
                    fresh_keys.append(key)
            for item, done in zip(labels, flags[len(transactions) :]):
                (acks.append(item[0]) if done else fresh_lb.append(item))
            with self._stats_lock:
                self.stats.duplicates += len(transactions) + len(labels) - len(fresh_tx) - len(fresh_lb)
            transactions, done_keys, labels = fresh_tx, fresh_keys, fresh_lb
        clock.lap("dedup")
        return _InFlight(entries, model, transactions, done_keys, labels, dead, acks)

    def _fold_submit(self, batch: _InFlight) -> None:
        """Fold the batch's labels (they produce no prediction) and send its transactions' fold
        script without waiting for it (`StreamingUpdater.submit`)."""
        clock = PhaseClock(self.stats.phase_seconds)
        if batch.labels:
            events = [e for _, e in batch.labels]
            folded = self.updater.fold(events, self.label_views)
            for name in self.label_views:
                batch.latest_rows[name] = folded.latest[name]
            batch.label_done = [(entry_id, self._done_key(event)) for entry_id, event in batch.labels]
        if batch.transactions:
            batch.fold = self.updater.submit([e for _, e in batch.transactions], self.transaction_views)
        clock.lap("fold")

    def _complete(self, batch: _InFlight) -> None:
        """Features (waiting for the fold script if it is still running), scores, outputs; then
        the writes, in the sink thread when pipelined."""
        clock = PhaseClock(self.stats.phase_seconds)
        transactions, done_keys, model = batch.transactions, batch.done_keys, batch.model
        latest_rows, label_done, dead, acks = batch.latest_rows, batch.label_done, batch.dead, batch.acks
        predictions: list[tuple[bytes, str, str, str, str]] = []
        if transactions:
            events = [e for _, e in transactions]
            folded = batch.fold.result()
            for name in self.transaction_views:
                latest_rows[name] = folded.latest[name]
            clock.lap("fold")
            event_us = np.fromiter([e[fr.EVENT_TS] for e in events], np.int64, len(events))
            active = self.router.active if self.router is not None else None
            if active is None:
                predictions = self.items(model, transactions, done_keys, events, event_us, folded)
            else:  # an experiment: each arm's events scored by its version (`arms.py`)
                predictions = arm_items(self, active, transactions, done_keys, events, event_us, folded)
            clock.lap("score")  # scoring and the prediction items
        job = (latest_rows, predictions, label_done, dead, acks)
        if self._sink is not None:
            # The writes run in the sink thread while this thread reads and folds the next batch
            # (the GIL is released while they wait on Redis). One job in flight at a time, so
            # batches are written in order; a failed job is raised here before the next goes.
            self._sink.submit(job)
            clock.lap("handoff")
        else:
            self._write(job, clock)
        self.stats.entries += len(batch.entries)
        self.stats.batches += 1
        self.stats.labels += len(label_done)

    def items(self, model, transactions, done_keys, events, event_us, folded, experiment=None) -> list:
        """Score events with `model` and build their prediction items (`experiment`: the
        (name, arm, selection probabilities) an experiment's arm adds to each prediction)."""
        plan = self._plan(model)
        scores, looked_up = plan.score(model, events, event_us, folded, self.online)
        features = None
        if self.config.include_features:
            features = logged_features(model, plan.request_columns, events, event_us, looked_up)
            schema = (int(model.version), tuple(features))
            if schema not in self._input_columns:  # the names of the features array, once per version
                publish_input_columns(self.client, self.names.output, *schema)
                self._input_columns.add(schema)
        return prediction_items(transactions, done_keys, event_us, scores, features, model, self.consumer,
                                experiment=experiment)  # fmt: skip

    def _write(self, job, clock: PhaseClock | None = None) -> None:
        """A batch's writes: the new feature values into the online store first (so they are
        durable before any output), then the atomic emit (decisions, outputs, dead letters, acks)."""
        latest_rows, predictions, label_done, dead, acks = job
        clock = clock or PhaseClock(self.stats.phase_seconds)
        for name, table in latest_rows.items():
            if table.num_rows:
                self.online.update_entities(name, table)
        clock.lap("online")
        self._finish(predictions, label_done, dead, acks)
        clock.lap("emit")

    def flush(self) -> None:
        """Finish the batch in flight and wait for the batch being written (if any); raises its error."""
        self._drain()
        if self._sink is not None:
            self._sink.wait()

    def _finish(self, predictions, label_done, dead, acks) -> None:
        """The emit script: decisions + predictions + dead letters + acknowledgements, atomically."""
        written, dupes, dead_count = self._emit(predictions, label_done, dead, acks)
        with self._stats_lock:
            self.stats.predictions += written
            self.stats.duplicates += dupes
            self.stats.dead_letters += dead_count

    def _done_key(self, event: Mapping[str, Any]) -> str:
        kind = "" if event["kind"] == TRANSACTION else "label:"
        return f"{self.names.done_prefix}{kind}{event[EVENT_ID]}"

    # ---- scoring

    def _plan(self, model) -> ScoringPlan:
        plan = self._plans.get(model.version)
        if plan is None:
            plan = self._plans[model.version] = ScoringPlan.of(model, self.transaction_views, self.online)
        return plan


@dataclass
class _InFlight:
    """A batch between reading and writing: parsed events, its fold (once submitted), the writes
    gathered so far."""

    entries: Sequence[tuple[bytes, Mapping[bytes, bytes]]]
    model: LoadedModel | None
    transactions: list[tuple[bytes, dict]]
    done_keys: list[str]
    labels: list[tuple[bytes, dict]]
    dead: list[tuple[bytes, str, bytes]]
    acks: list[bytes]
    fold: PendingFold | None = None
    latest_rows: dict[str, pa.Table] = field(default_factory=dict)
    label_done: list[tuple[bytes, str]] = field(default_factory=list)
