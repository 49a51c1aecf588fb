"""Streaming prediction on Redis Streams: a consumer-group worker that scores transaction events
with the champion model and keeps the windowed features up to date (`ml-platform stream`).

Per batch (XREADGROUP of up to `batch_size` entries, or XAUTOCLAIM of a dead worker's entries):
  1. parse and validate every entry; a malformed one goes to the dead-letter stream with the
     reason and its raw payload, and is acknowledged: the worker never stops on bad input;
  2. skip events already decided (a per-event `done` key, see 5.);
  3. fold the events into the per-entity buffers (`StreamingUpdater`) and take, for each event,
     its features as of just before it (`features.feature_lookup_time`): the aggregates at the
     entity's previous event, never including the event itself. Several events of one entity in
     one batch see each other in event-time order, exactly. Views the stream does not update
     (user_profile, merchant_fraud_stats) are read from the online store as the HTTP API reads
     them, with each view's TTL applied at the event time;
  4. score the batch with the champion (one call of its scoring path per batch), then write the
     entities' new latest values into the online store (`RedisOnlineStore.update_entities`), so
     the HTTP API sees them;
  5. one Lua script: per event `SET done:<event id> <decision> NX EX <ttl>` and, only if it was
     set, XADD the prediction to the output stream; then XACK the batch. So the output is written
     before the acknowledgement (at-least-once), and a replayed event (a crash between 3 and 5, a
     claim of a slow worker's entry, a re-published event) never yields a second or a different
     decision; its fold is a no-op (a buffer record is a function of the event).
Steps 4 (online write) and 5 run in a writer thread while the next batch is read and folded.

Label events (`{"kind": "label", "transaction_id", "merchant_id", "is_fraud", "label_timestamp"}`)
fold into the views whose source time is the label time (merchant_fraud_stats) and update their
online values; they produce no prediction. Without a label stream, the offline materialization
keeps that view fresh.

The champion is polled every `model_poll_s` in a background thread and swapped when the alias
moves; a batch is scored by one model, named in each prediction (`model_version`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import redis

from ml_platform import features as fr
from ml_platform.featurestore.definitions import FeatureView, parse_feature_ref
from ml_platform.featurestore.online import OnlineStoreError, RedisOnlineStore
from ml_platform.featurestore.streaming import (
    EVENT_ID,
    LOOKUP_OFFSET_US,
    PendingFold,
    StreamingUpdater,
    events_from_frame,
    from_us,
    to_us,
)
from ml_platform.serving.fast_scorer import EVENT_US
from ml_platform.serving.scoring import LoadedModel, assemble_features

_log = logging.getLogger(__name__)

EVENT_FIELD = "event"  # the input entry's field holding the event as JSON
EVENT_TIME = "event_time"  # a parsed transaction's event time as a datetime (the scorer's input)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PREDICTION_FIELD = "prediction"  # the output entry's field holding the prediction as JSON
TRANSACTION = "transaction"
LABEL = "label"
TRANSACTION_STRING_FIELDS = ("merchant_category", "country", "device", "channel")
MAX_ID_LENGTH = 200


class SinkError(RuntimeError):
    """Writing a batch (online update or emit) failed in the sink thread; its entries stay pending."""


# Infrastructure trouble: keep the entries pending and retry after a pause (never dead-letter).
RETRYABLE = (redis.ConnectionError, redis.TimeoutError, OnlineStoreError, SinkError)

# KEYS[1] input stream, KEYS[2] output stream, KEYS[3] dead-letter stream.
# ARGV[1] group, ARGV[2] done-key TTL (s), ARGV[3] output MAXLEN (0 = unbounded), ARGV[4] consumer;
# ARGV[5..8]: four blobs of length-prefixed (u32) strings, one item after the other:
#   predictions: entry id, done key, event id, prediction JSON, decision summary
#                (SET done key to the summary NX, XADD the JSON only if it was set, XACK)
#   labels:      entry id, done key                              (SET NX, XACK)
#   dead:        entry id, reason, payload                       (XADD dead letter, XACK)
#   acks:        entry id                                        (XACK)
# (Packed blobs, not thousands of arguments: argument packing was the client's main cost.)
# Returns {predictions written, duplicates, dead letters}.
_EMIT_LUA = """
local group, ttl, maxlen, consumer = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local written, dupes, dead = 0, 0, 0
local function items(blob, n)
  local pos = 1
  return function()
    if pos > #blob then return nil end
    local out = {}
    for f = 1, n do
      local len
      len, pos = struct.unpack('<I4', blob, pos)
      out[f] = string.sub(blob, pos, pos + len - 1)
      pos = pos + len
    end
    return out
  end
end
local acks = {}
for it in items(ARGV[5], 5) do
  if redis.call('SET', it[2], it[5], 'NX', 'EX', ttl) then
    if maxlen > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event_id', it[3], 'prediction', it[4])
    else
      redis.call('XADD', KEYS[2], '*', 'event_id', it[3], 'prediction', it[4])
    end
    written = written + 1
  else
    dupes = dupes + 1
  end
  acks[#acks + 1] = it[1]
end
for it in items(ARGV[6], 2) do
  if not redis.call('SET', it[2], '1', 'NX', 'EX', ttl) then dupes = dupes + 1 end
  acks[#acks + 1] = it[1]
end
for it in items(ARGV[7], 3) do
  redis.call('XADD', KEYS[3], '*', 'input_id', it[1], 'reason', it[2], 'payload', it[3], 'consumer', consumer)
  acks[#acks + 1] = it[1]
  dead = dead + 1
end
for it in items(ARGV[8], 1) do
  acks[#acks + 1] = it[1]
end
-- acknowledged last, after every output and dead letter of the batch is written
for s = 1, #acks, 500 do
  redis.call('XACK', KEYS[1], group, unpack(acks, s, math.min(s + 499, #acks)))
end
return {written, dupes, dead}
"""


def _pack(items: Iterable[Sequence[Any]]) -> bytes:
    """Items of strings/bytes as one blob of u32-length-prefixed fields (the emit script's input)."""
    values = [
        v.encode() if type(v) is str else v if isinstance(v, bytes) else str(v).encode()
        for item in items
        for v in item
    ]
    if not values:
        return b""
    # Field after field: its length (u32, little-endian; the headers made in one numpy call), its bytes.
    parts: list[bytes] = [b""] * (2 * len(values))
    parts[0::2] = np.fromiter(map(len, values), dtype="<u4", count=len(values)).view("V4").tolist()
    parts[1::2] = values
    return b"".join(parts)


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StreamConfig:
    """Where the worker reads and writes, and how it batches, claims and deduplicates.

    Stream names default to `<project>:stream:transactions` (input), `:predictions` (output) and
    `:dead_letter`. `claim_idle_ms`: a pending entry idle this long belongs to a dead worker and is
    claimed (XAUTOCLAIM); `max_deliveries`: an entry claimed more often than this is dead-lettered
    (it keeps killing workers). `done_ttl_s`: how long an event id is remembered (replays within it
    are recognised). `seed_history`: on a cold start (no stream state yet) fold the raw events of
    the last windows into the buffers first, so aggregates include history.
    """

    input_stream: str | None = None
    output_stream: str | None = None
    dead_letter_stream: str | None = None
    group: str = "scorers"
    consumer: str | None = None
    batch_size: int = 1000
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    claim_interval_s: float = 5.0
    max_deliveries: int = 10
    model_poll_s: float = 3.0
    done_ttl_s: int = 86400
    output_maxlen: int = 0
    seed_history: bool = True
    trim_slack: timedelta = timedelta(days=1)
    score: bool = True  # False: features only (the benchmark's no-model baseline)
    scorer: str = "auto"  # fast_scorer.build_scoring_path: "auto" (treelite if it agrees), "sklearn"
    include_features: bool = False  # add the looked-up feature values to each prediction
    pipeline: bool = True  # write batch N (online update + emit) while batch N+1 is read and folded

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10_000:
            raise ValueError(f"StreamConfig.batch_size must be in [1, 10000], got {self.batch_size}")
        if self.claim_idle_ms < 0 or self.block_ms < 0:
            raise ValueError("StreamConfig.claim_idle_ms and block_ms must be >= 0")
        if self.done_ttl_s <= 0:
            raise ValueError(f"StreamConfig.done_ttl_s must be > 0, got {self.done_ttl_s}")


@dataclass(frozen=True)
class StreamNames:
    input: str
    output: str
    dead_letter: str
    done_prefix: str
    seeded: str


def stream_names(project: str, config: StreamConfig | None = None) -> StreamNames:
    """The keys a project's stream worker uses (config overrides the stream names)."""
    config = config or StreamConfig()
    base = f"{project}:stream:"
    return StreamNames(
        input=config.input_stream or base + "transactions",
        output=config.output_stream or base + "predictions",
        dead_letter=config.dead_letter_stream or base + "dead_letter",
        done_prefix=base + "done:",
        seeded=base + "seeded",
    )


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


# --------------------------------------------------------------------------- events


class MalformedEvent(ValueError):
    """An input entry that can never be processed; the message is the dead-letter reason."""


def _require_int(obj: Mapping, name: str) -> int:
    if name not in obj:
        raise MalformedEvent(f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedEvent(f"field {name!r} must be an integer, got {value!r}")
    if not -(2**63) <= value < 2**63:
        raise MalformedEvent(f"field {name!r} is out of the 64-bit range: {value!r}")
    return value


def _require_str(obj: Mapping, name: str, max_length: int = MAX_ID_LENGTH) -> str:
    if name not in obj:
        raise MalformedEvent(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str) or not value.strip():
        raise MalformedEvent(f"field {name!r} must be a non-empty string, got {value!r}")
    if len(value) > max_length:
        raise MalformedEvent(f"field {name!r} is longer than {max_length} characters")
    return value


def _require_timestamp(obj: Mapping, name: str) -> int:
    if name not in obj:
        raise MalformedEvent(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise MalformedEvent(
            f"field {name!r} must be an ISO-8601 string such as '2024-01-31T12:00:00+00:00', got {value!r}"
        )
    try:
        return to_us(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise MalformedEvent(f"field {name!r} is not an ISO-8601 timestamp: {value!r}") from None


_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


def _valid_transaction(obj: dict) -> dict[str, Any] | None:
    """The common case in one pass: a well-formed transaction as an event dict, else None (the
    caller's field-by-field checks then find and name the problem)."""
    try:
        tid, uid, mid, amount = obj["transaction_id"], obj["user_id"], obj["merchant_id"], obj["amount"]
        category, country, device, channel = (
            obj["merchant_category"],
            obj["country"],
            obj["device"],
            obj["channel"],
        )
        stamp = obj[fr.EVENT_TS]
    except KeyError:
        return None
    if not (
        type(tid) is str
        and 0 < len(tid) <= MAX_ID_LENGTH
        and not tid.isspace()
        and type(uid) is int
        and _I64_MIN <= uid <= _I64_MAX
        and type(mid) is int
        and _I64_MIN <= mid <= _I64_MAX
        and (type(amount) is float or type(amount) is int)
        and 0 < amount < math.inf
        and type(category) is str
        and type(country) is str
        and type(device) is str
        and type(channel) is str
        and category.strip()
        and country.strip()
        and device.strip()
        and channel.strip()
        and max(len(category), len(country), len(device), len(channel)) <= MAX_ID_LENGTH
        and type(stamp) is str
    ):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    return {
        "kind": TRANSACTION,
        EVENT_ID: tid,
        "transaction_id": tid,
        "user_id": uid,
        "merchant_id": mid,
        "amount": float(amount),
        "merchant_category": category,
        "country": country,
        "device": device,
        "channel": channel,
        fr.EVENT_TS: (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds,
        EVENT_TIME: when,
    }


_JSON_DECODER = json.JSONDecoder()  # what json.loads decodes with, given default arguments


def _loads(payload: bytes | str) -> Any:
    """`json.loads(payload)`, without its encoding detection for the usual payload: bytes starting
    with '{' and a non-NUL byte, which json.loads decodes as UTF-8 (`json.detect_encoding`)."""
    if type(payload) is bytes and payload[:1] == b"{" and payload[1:2] != b"\x00":
        return _JSON_DECODER.decode(payload.decode("utf-8", "surrogatepass"))
    return json.loads(payload)


def parse_event(payload: bytes | str | None) -> dict[str, Any]:
    """A validated event from an entry's JSON payload, or MalformedEvent naming the problem.

    Transaction (default `kind`): transaction_id, user_id, merchant_id (integers), amount (> 0),
    merchant_category, country, device, channel (strings), event_timestamp (ISO-8601; no offset
    means UTC). Label: kind="label", transaction_id, merchant_id, is_fraud (0/1), label_timestamp.
    Returned dicts carry `event_id` and times as int µs (the updater's event shape)."""
    if payload is None:
        raise MalformedEvent(f"entry has no {EVENT_FIELD!r} field holding the event JSON")
    try:
        obj = _loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedEvent(f"payload must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind", TRANSACTION)
    if kind == TRANSACTION:
        fast = _valid_transaction(obj)
        if fast is not None:
            return fast
        # Something is wrong: the field-by-field checks below name it.
        event: dict[str, Any] = {"kind": TRANSACTION}
        event[EVENT_ID] = event["transaction_id"] = _require_str(obj, "transaction_id")
        event["user_id"] = _require_int(obj, "user_id")
        event["merchant_id"] = _require_int(obj, "merchant_id")
        if "amount" not in obj:
            raise MalformedEvent("missing field 'amount'")
        amount = obj["amount"]
        if (
            isinstance(amount, bool)
            or not isinstance(amount, (int, float))
            or not math.isfinite(amount)
            or amount <= 0
        ):
            raise MalformedEvent(f"field 'amount' must be a positive number, got {amount!r}")
        event["amount"] = float(amount)
        for name in TRANSACTION_STRING_FIELDS:
            event[name] = _require_str(obj, name)
        event[fr.EVENT_TS] = _require_timestamp(obj, fr.EVENT_TS)
        event[EVENT_TIME] = from_us(event[fr.EVENT_TS])
        return event
    if kind == LABEL:
        event = {"kind": LABEL}
        event[EVENT_ID] = event["transaction_id"] = _require_str(obj, "transaction_id")
        event["merchant_id"] = _require_int(obj, "merchant_id")
        if "user_id" in obj:
            event["user_id"] = _require_int(obj, "user_id")
        label = obj.get(fr.LABEL)
        if isinstance(label, bool) or label not in (0, 1):
            raise MalformedEvent(f"field {fr.LABEL!r} must be 0 or 1, got {label!r}")
        event[fr.LABEL] = float(label)
        event[fr.LABEL_TS] = _require_timestamp(obj, fr.LABEL_TS)
        return event
    raise MalformedEvent(f"field 'kind' must be {TRANSACTION!r} or {LABEL!r}, got {kind!r}")


def event_payloads(frame: pd.DataFrame, kind: str = TRANSACTION) -> list[str]:
    """The JSON payloads of `frame`'s rows (raw transaction columns) as the worker reads them."""
    if kind == TRANSACTION:
        columns = [
            "transaction_id",
            "user_id",
            "merchant_id",
            "amount",
            *TRANSACTION_STRING_FIELDS,
            fr.EVENT_TS,
        ]
    elif kind == LABEL:
        columns = ["transaction_id", "user_id", "merchant_id", fr.LABEL, fr.LABEL_TS]
    else:
        raise ValueError(f"kind must be {TRANSACTION!r} or {LABEL!r}, got {kind!r}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"events frame lacks columns {missing}; it has {list(frame.columns)}")
    ts_col = fr.EVENT_TS if kind == TRANSACTION else fr.LABEL_TS
    stamps = pd.to_datetime(frame[ts_col], utc=True)
    if stamps.isna().any():
        raise ValueError(f"{int(stamps.isna().sum())} rows have no {ts_col}; drop them before publishing")
    iso = [t.isoformat() for t in stamps]
    data = {c: frame[c].astype(object).tolist() for c in columns if c != ts_col}
    out = []
    for i, t in enumerate(iso):
        obj: dict[str, Any] = {"kind": kind} if kind == LABEL else {}
        for c, values in data.items():
            v = values[i]
            obj[c] = (
                int(v)
                if c in ("user_id", "merchant_id", fr.LABEL)
                else (float(v) if c == "amount" else str(v))
            )
        obj[ts_col] = t
        out.append(json.dumps(obj, separators=(",", ":")))
    return out


def publish_events(
    client: redis.Redis,
    stream: str,
    frame: pd.DataFrame,
    *,
    kind: str = TRANSACTION,
    chunk: int = 2000,
    maxlen: int | None = None,
) -> list[bytes]:
    """XADD one entry per row of `frame` (raw transaction columns) to `stream`, pipelined, in the
    frame's order; kind="label" publishes label events. Returns the entry ids."""
    payloads = event_payloads(frame, kind)
    return publish_payloads(client, stream, payloads, chunk=chunk, maxlen=maxlen)


def publish_payloads(
    client: redis.Redis,
    stream: str,
    payloads: Iterable[str | bytes],
    *,
    chunk: int = 2000,
    maxlen: int | None = None,
) -> list[bytes]:
    """XADD raw payloads (e.g. malformed ones in tests) as `{"event": payload}` entries."""
    ids: list[bytes] = []
    pipe = client.pipeline(transaction=False)
    pending = 0
    for payload in payloads:
        pipe.xadd(stream, {EVENT_FIELD: payload}, maxlen=maxlen, approximate=True)
        pending += 1
        if pending >= chunk:
            ids += pipe.execute()
            pending = 0
    if pending:
        ids += pipe.execute()
    return ids


def read_predictions(client: redis.Redis, stream: str, count: int | None = None) -> list[dict[str, Any]]:
    """Every prediction in an output stream (oldest first), as dicts with `entry_id`."""
    out = []
    last = "-"
    while True:
        entries = client.xrange(stream, min=last, max="+", count=5000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            break
        for entry_id, fields in entries:
            body = json.loads(fields[PREDICTION_FIELD.encode()])
            body["entry_id"] = entry_id.decode()
            out.append(body)
        last = entries[-1][0]
        if count is not None and len(out) >= count:
            break
    return out


# --------------------------------------------------------------------------- models


class ChampionWatcher:
    """The model the `champion` alias points at, polled every `poll_s` seconds in a background
    thread and swapped when the alias moves (the previous model keeps serving while the new one
    loads; a failed load keeps the old one and is retried at the next poll)."""

    def __init__(
        self,
        registry,
        alias: str = "champion",
        poll_s: float = 3.0,
        loader: Callable[[Any, int], LoadedModel] | None = None,
    ) -> None:
        self.registry = registry
        self.alias = alias
        self.poll_s = float(poll_s)
        self.loader = loader or load_version
        self._model: LoadedModel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None

    def current(self) -> LoadedModel | None:
        return self._model

    def check_now(self) -> LoadedModel | None:
        """Poll the alias once; load and swap if it moved. Returns the model serving now."""
        try:
            version = int(self.registry.get_version(self.alias).version)
        except LookupError as exc:
            self.last_error = str(exc)
            return self._model
        if self._model is None or self._model.version != version:
            try:
                model = self.loader(self.registry, version)
            except Exception as exc:  # noqa: BLE001 - keep serving the old model; retried at the next poll
                self.last_error = f"loading v{version} failed: {exc}"
                _log.exception("loading %s v%s failed", self.alias, version)
                return self._model
            previous = self._model
            self._model = model
            self.last_error = None
            _log.info("model %s -> v%s", "none" if previous is None else f"v{previous.version}", version)
        return self._model

    def start(self) -> ChampionWatcher:
        self.check_now()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="champion-watcher", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check_now()
            except Exception:  # noqa: BLE001 - the registry may be briefly unreachable; try again later
                _log.exception("polling the %s alias failed", self.alias)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class FixedModel:
    """A model source that always serves one LoadedModel (benchmarks, tests)."""

    def __init__(self, model: LoadedModel | None):
        self.model = model

    def current(self) -> LoadedModel | None:
        return self.model


def load_version(registry, version: int, scorer: str = "auto"):
    """A registered version ready to score a batch: the fast scoring path (compiled request
    features + treelite) where it passes its parity check against scikit-learn, else the
    reference path (`ml_platform.serving.fast_scorer.build_scoring_path`)."""
    from ml_platform.serving.fast_scorer import build_scoring_path

    model, contract = registry.load_model(int(version))
    loaded = LoadedModel(version=int(version), model=model, contract=contract, loaded_at=time.time())
    return build_scoring_path(loaded, scorer=scorer)


# --------------------------------------------------------------------------- the worker


@dataclass
class WorkerStats:
    entries: int = 0
    predictions: int = 0
    labels: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    claimed: int = 0
    batches: int = 0
    retries: int = 0
    model_version: int | None = None
    started: float = field(default_factory=time.monotonic)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # the fold's parts (pack, script wait, cache, evaluate): the updater's own clock
    fold_seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "entries": self.entries,
            "predictions": self.predictions,
            "labels": self.labels,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "claimed": self.claimed,
            "batches": self.batches,
            "retries": self.retries,
            "model_version": self.model_version,
            "seconds": round(seconds, 3),
            "entries_per_s": round(self.entries / seconds, 1) if seconds > 0 else 0.0,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "fold_seconds": {k: round(v, 3) for k, v in self.fold_seconds.items()},
        }


class _PhaseClock:
    """Adds the time since the previous lap to `totals[phase]` (where a worker's time goes)."""

    def __init__(self, totals: dict[str, float]):
        self.totals = totals
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


class StreamWorker:
    """One consumer of the group: reads, scores, updates features, writes predictions.

    `model_source.current()` gives the LoadedModel to score with (ChampionWatcher, FixedModel).
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
    ) -> None:
        self.client = client
        self.online = online
        self.updater = updater
        self.model_source = model_source
        self.config = config or StreamConfig()
        self.names = stream_names(project, self.config)
        self.consumer = self.config.consumer or default_consumer_name()
        self.stats = WorkerStats(fold_seconds=updater.phase_seconds)
        self._emit = client.register_script(_EMIT_LUA)
        self._claim_cursor = "0-0"
        self._next_claim = 0.0
        self._own_pending = True  # first read this consumer's own unacknowledged entries
        self._plans: dict[int, _ScoringPlan] = {}
        self._stats_lock = threading.Lock()
        self._sink = _Sink(self._write, self.consumer) if self.config.pipeline else None
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
        if self.config.score and model is None:
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
        clock = _PhaseClock(self.stats.phase_seconds)
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
                    else json.dumps({_text(k): _text(v) for k, v in fields.items()})
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
        clock = _PhaseClock(self.stats.phase_seconds)
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
        clock = _PhaseClock(self.stats.phase_seconds)
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
            looked_up: dict[str, Any] = {}
            if self.config.score:
                scores, looked_up = self._score(events, event_us, folded, model)
            else:
                scores = np.full(len(events), np.nan)
            clock.lap("score")
            predictions = self._predictions(transactions, done_keys, event_us, scores, looked_up, model)
            clock.lap("output")
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

    def _write(self, job, clock: _PhaseClock | None = None) -> None:
        """A batch's writes: the new feature values into the online store first (so they are
        durable before any output), then the atomic emit (decisions, outputs, dead letters, acks)."""
        latest_rows, predictions, label_done, dead, acks = job
        clock = clock or _PhaseClock(self.stats.phase_seconds)
        for name, table in latest_rows.items():
            if table.num_rows:
                self.online.update_entities(name, table)
        clock.lap("online")
        self._finish(predictions, label_done, dead, acks)
        clock.lap("emit")

    def _predictions(
        self,
        transactions: list[tuple[bytes, dict]],
        done_keys: list[str],
        event_us: np.ndarray,
        scores: np.ndarray,
        looked_up: Mapping[str, Any],
        model: LoadedModel | None,
    ) -> list[tuple[bytes, str, str, str, str]]:
        """The emit script's prediction items: (entry id, done key, event id, prediction JSON,
        decision summary). The JSON comes from a template (json.dumps of a dict per event cost more
        than the model); strings that could need escaping are quoted as json.dumps quotes them.
        What can be is computed for the whole batch first (times, probabilities, decisions)."""
        scored_at = datetime.now(UTC).isoformat()
        threshold = model.contract.decision_threshold if model is not None else None
        version = "null" if model is None else int(model.version)
        fixed = (
            f',"threshold":{_json_number(threshold)},"model_version":{version},'
            f'"scored_at":"{scored_at}","consumer":{_quote(self.consumer)},"input_id":"'
        )
        # (decision in the JSON, decision in the done key's summary "v<version> <probability> <decision>")
        unknown = ("null", "null")
        if threshold is None:
            decisions = [unknown] * len(scores)
        else:
            fraud, legit = ('"fraud"', "fraud"), ('"legit"', "legit")
            decisions = [fraud if flag else legit for flag in (scores >= threshold).tolist()]
        probabilities = list(map(repr, scores.tolist()))
        for i in np.flatnonzero(np.isnan(scores)).tolist():  # not scored
            probabilities[i], decisions[i] = "null", unknown
        tag = f"v{model.version if model is not None else 0} "
        ids = [entry_id for entry_id, _ in transactions]
        try:  # stream entry ids ("<ms>-<seq>") as text, decoded in one call
            input_ids = b"\n".join(ids).decode().split("\n")
        except TypeError:  # str ids (a client decoding its responses)
            input_ids = [_text(entry_id) for entry_id in ids]
        features: list[list] = []
        names: list[str] = []
        if self.config.include_features:
            names = list(looked_up)
            features = [_json_column(values) for values in looked_up.values()]
        out = []
        for i, ((entry_id, event), done_key, stamp, probability, (decision, word), input_id) in enumerate(
            zip(transactions, done_keys, _utc_iso_column(event_us), probabilities, decisions, input_ids)
        ):
            event_id = event[EVENT_ID]
            quoted = _quote(event_id)
            body = (
                f'{{"prediction_id":"stream-{quoted[1:]},"event_id":{quoted},"user_id":{event["user_id"]},'
                f'"merchant_id":{event["merchant_id"]},"event_timestamp":"{stamp}+00:00",'
                f'"probability":{probability},"decision":{decision}{fixed}{input_id}"'
            )
            if features:
                body += ',"features":' + json.dumps(dict(zip(names, [column[i] for column in features])))
            out.append((entry_id, done_key, event_id, body + "}", f"{tag}{probability} {word}"))
        return out

    def flush(self) -> None:
        """Finish the batch in flight and wait for the batch being written (if any); raises its error."""
        self._drain()
        if self._sink is not None:
            self._sink.wait()

    def _finish(self, predictions, label_done, dead, acks) -> None:
        """The Lua emit: decisions + predictions + dead letters + acknowledgements, atomically."""
        args = [
            self.config.group,
            self.config.done_ttl_s,
            self.config.output_maxlen,
            self.consumer,
            _pack(predictions),
            _pack(label_done),
            _pack(dead),
            _pack((a,) for a in acks),
        ]
        written, dupes, dead_count = self._emit(
            keys=[self.names.input, self.names.output, self.names.dead_letter], args=args
        )
        with self._stats_lock:
            self.stats.predictions += int(written)
            self.stats.duplicates += int(dupes)
            self.stats.dead_letters += int(dead_count)

    def _done_key(self, event: Mapping[str, Any]) -> str:
        kind = "" if event["kind"] == TRANSACTION else "label:"
        return f"{self.names.done_prefix}{kind}{event[EVENT_ID]}"

    # ---- scoring

    def _plan(self, model) -> _ScoringPlan:
        plan = self._plans.get(model.version)
        if plan is None:
            plan = self._plans[model.version] = _ScoringPlan.of(model, self.transaction_views, self.online)
        return plan

    def _score(
        self, events: list[dict], event_us: np.ndarray, folded, model
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Fraud probabilities for the batch and the looked-up features the model saw (feature ->
        the fold's float64 array, NaN for null, or the online store's list, None for null).
        `event_us`: the events' times (int64 µs since the epoch).

        One call of the model's scoring path on the batch's columns (a fast_scorer.ScoringPath's
        `score_columns`) or, for a bare LoadedModel, assemble_features + predict_proba."""
        plan = self._plan(model)
        looked_up: dict[str, Any] = {
            feature: folded.before[view][feature] for view, feature in plan.stream_refs
        }
        if plan.online_refs:
            looked_up.update(self._online_features(plan, events, event_us))
        n = len(events)
        if hasattr(model, "score_columns"):
            request: dict[str, Any] = {
                "amount": np.fromiter([e["amount"] for e in events], np.float64, n),
                EVENT_US: event_us,
            }
            for column in plan.request_columns:
                request[column] = [e.get(column) for e in events]
            return model.score_columns(request, looked_up), looked_up
        tx = pd.DataFrame({c: [e[c] for e in events] for c in plan.transaction_columns})
        tx[fr.EVENT_TS] = pd.to_datetime(event_us, unit="us", utc=True)
        frame = assemble_features(tx, looked_up)
        return np.asarray(model.predict_proba(frame), dtype=np.float64), looked_up

    def _online_features(
        self, plan: _ScoringPlan, events: list[dict], event_us: np.ndarray
    ) -> dict[str, list]:
        """The online store's values of the views the stream does not update, as of each event:
        a value older than the view's TTL at the event time is null (the offline join's rule).
        The events themselves are the entity rows (they hold the join keys)."""
        # now=0: no wall-clock TTL filter here; the TTL is applied per event time below.
        answer = self.online.read(plan.online_refs, events, include_event_timestamps=True, now=0.0)
        out: dict[str, list] = {}
        for view, features, ttl_us in plan.online_views:
            stale = None
            if ttl_us is not None:  # (unknown entities are null already: no event timestamp, no value)
                span = ttl_us + LOOKUP_OFFSET_US
                # A value at least this new is within the TTL at every event of the batch: only
                # older ones are compared with their own event's time.
                bound = from_us(int(event_us.max()) - span)
                span_td = timedelta(microseconds=span)
                stale = [
                    ts is not None and ts < bound and ts < e[EVENT_TIME] - span_td
                    for ts, e in zip(answer[f"{view}__event_timestamp"], events)
                ]
                if not any(stale):
                    stale = None
            for feature in features:
                values = answer[feature]
                out[feature] = values if stale is None else [None if s else v for v, s in zip(values, stale)]
        return out


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


class _Sink:
    """One background thread that runs the worker's write jobs, one at a time, in order."""

    def __init__(self, write: Callable, name: str):
        self._write = write
        self._jobs: list = []
        self._cond = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"stream-sink-{name}", daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        """Wait for the previous job (raising its error), then hand this one over."""
        self.wait()
        with self._cond:
            self._jobs.append(job)
            self._busy = True
            self._cond.notify_all()

    def wait(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise SinkError(f"writing a batch failed: {type(error).__name__}: {error}") from error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed and not self._jobs:
                    return
                job = self._jobs.pop(0)
            try:
                self._write(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the worker thread by wait()
                with self._cond:
                    self._error = exc
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)


@dataclass(frozen=True)
class _ScoringPlan:
    """Which of a model's feature refs come from the stream buffers and which from the online store."""

    stream_refs: tuple[tuple[str, str], ...]
    online_refs: tuple[str, ...]
    online_views: tuple[tuple[str, tuple[str, ...], int | None], ...]
    request_columns: tuple[str, ...]  # the request's columns other than amount and time (score_columns)
    transaction_columns: tuple[str, ...]  # the columns of the transactions frame (bare LoadedModel)

    @classmethod
    def of(cls, model, stream_views: Sequence[str], online: RedisOnlineStore) -> _ScoringPlan:
        stream, online_refs = [], []
        by_view: dict[str, list[str]] = {}
        for ref in model.contract.feature_refs:
            view, feature = parse_feature_ref(ref)
            if view in stream_views:
                stream.append((view, feature))
            else:
                online_refs.append(ref)
                by_view.setdefault(view, []).append(feature)
        views = []
        for view, feats in by_view.items():
            definition = online.views.get(view)
            if definition is None:
                raise ValueError(
                    f"model v{model.version} reads feature view {view!r}, which the online store does not define"
                )
            if not online.metadata(view):
                raise OnlineStoreError(
                    f"feature view {view!r} (read by model v{model.version}) is not in the online store of project "
                    f"{online.project!r}; materialize it (FeatureStore.materialize / `ml-platform materialize`) first"
                )
            ttl = definition.ttl
            ttl_us = None if not ttl else (ttl.days * 86400 + ttl.seconds) * 1_000_000 + ttl.microseconds
            views.append((view, tuple(feats), ttl_us))
        request = [
            c for c in (*model.contract.request_columns, "country") if c not in ("amount", fr.EVENT_TS)
        ]
        columns = [
            "transaction_id",
            "user_id",
            "merchant_id",
            *[c for c in fr.REQUEST_COLUMNS if c != fr.EVENT_TS],
        ]
        return cls(
            tuple(stream),
            tuple(online_refs),
            tuple(views),
            tuple(dict.fromkeys(request)),
            tuple(dict.fromkeys(columns)),
        )


# json.dumps of a string (default arguments), without json.dumps' per-call overhead.
_quote = json.encoder.encode_basestring_ascii


def _json_number(value: float | None) -> str:
    return "null" if value is None or math.isnan(value) else repr(float(value))


def _json_value(value: Any) -> Any:
    """A feature value for JSON: NaN -> None, numpy scalars -> Python."""
    if value is None or isinstance(value, str):
        return value
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and math.isnan(value) else value


def _utc_iso_column(event_us: np.ndarray) -> list[str]:
    """`datetime.isoformat()` of each time (int64 µs since the epoch) in UTC, without its
    "+00:00" suffix ('2026-11-26T10:00:00.123456', or '2026-11-26T10:00:00' on a whole second),
    formatted by numpy for the whole batch."""
    stamps = event_us.astype("datetime64[us]")
    text = np.datetime_as_string(stamps, unit="us")
    whole = event_us % 1_000_000 == 0
    if whole.any():  # isoformat leaves out a zero fraction
        text = text.astype(object)
        text[whole] = np.datetime_as_string(stamps[whole], unit="s")
    return text.tolist()


def _json_column(values: Sequence | np.ndarray) -> list:
    """A looked-up feature column as JSON-ready values: `_json_value` of each value."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return [None if math.isnan(v) else v for v in values.tolist()]
    return [_json_value(v) for v in values]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def empty_feature_table(view: FeatureView) -> pa.Table:
    """A zero-row table with the view's online columns (join keys, event_timestamp, features)."""
    from ml_platform.featurestore.online import _ARROW_TYPE

    fields = [pa.field(k, pa.int64()) for k in view.join_keys]
    fields.append(pa.field("event_timestamp", pa.timestamp("us", tz="UTC")))
    fields += [pa.field(f.name, _ARROW_TYPE[f.dtype]) for f in view.schema]
    return pa.schema(fields).empty_table()


# --------------------------------------------------------------------------- cold start


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
        return {_text(k): _text(v) for k, v in record.items()}
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
            return {_text(k): _text(v) for k, v in record.items()}
        time.sleep(0.5)
    raise TimeoutError(
        f"another worker has been seeding the stream state for over {wait_s} s ({lock}); check it"
    )


# --------------------------------------------------------------------------- entry point


def build_worker(
    settings, config: StreamConfig | None = None, *, client: redis.Redis | None = None, model_source=None
) -> StreamWorker:
    """A worker wired from settings: Redis, online store, updater, champion watcher (not started)."""
    from ml_platform.featurestore.redis_server import redis_client

    config = config or StreamConfig()
    client = client or redis_client(settings)
    # Larger write batches than the API's store: one upsert script per view and batch.
    online = RedisOnlineStore(client, project=settings.project, views=fr.FEATURE_VIEWS, batch_size=1000)
    updater = StreamingUpdater(client, settings.project, fr.FEATURE_VIEWS, trim_slack=config.trim_slack)
    if model_source is None and config.score:
        from ml_platform.registry import ModelRegistry

        model_source = ChampionWatcher(
            ModelRegistry(settings.mlflow_tracking_uri, settings.model_name),
            poll_s=config.model_poll_s,
            loader=lambda registry, version: load_version(registry, version, config.scorer),
        )
    return StreamWorker(client, online, updater, model_source, settings.project, config)


def run_worker(
    settings,
    config: StreamConfig | None = None,
    *,
    stop: threading.Event | None = None,
    max_entries: int | None = None,
    until_idle: bool = False,
    log_every_s: float = 10.0,
) -> dict[str, Any]:
    """`ml-platform stream`: run one worker until SIGINT/SIGTERM (or `stop`, `max_entries`,
    `until_idle`); finishes the batch in hand before exiting. Returns the worker's stats."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # one OpenMP thread: much faster predict on a small shared machine
    config = config or StreamConfig()
    worker = build_worker(settings, config)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    worker.ensure_group()
    worker.ensure_online_views()
    if config.seed_history:
        record = seed_once(worker.client, worker.updater, worker.names, settings.raw_dir)
        _log.info("stream state seeded: %s", record)
    watcher = worker.model_source if isinstance(worker.model_source, ChampionWatcher) else None
    if watcher is not None:
        watcher.start()
    reporter_stop = threading.Event()

    def report() -> None:
        while not reporter_stop.wait(log_every_s):
            _log.info("stream worker %s: %s", worker.consumer, worker.stats.as_dict())

    reporter = threading.Thread(target=report, name="stream-stats", daemon=True)
    reporter.start()
    try:
        worker.run(stop, max_entries=max_entries, until_idle=until_idle)
    finally:
        worker.close()
        reporter_stop.set()
        if watcher is not None:
            watcher.stop()
    _log.info("stream worker %s stopped: %s", worker.consumer, worker.stats.as_dict())
    return worker.stats.as_dict()
