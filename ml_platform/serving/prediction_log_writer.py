"""The HTTP API's side of the prediction log: the JSON entry of one prediction
(`prediction_entry`) and the background writer that XADDs entries to `<project>:predictions`
(`PredictionLogWriter`, off the request path; approximate MAXLEN trimming bounds the stream if
nothing drains it). `prediction_log_drain.drain_prediction_log` moves the entries into the log's
Parquet files (`prediction_log`: layout and schema). Everything here is re-exported there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

_log = logging.getLogger(__name__)

DEFAULT_MAXLEN = 1_000_000  # the API's log stream keeps about this many entries if no drain runs
ENTRY_FIELD = "json"  # each API log entry has one field: the prediction as a JSON object


def prediction_stream_key(project: str) -> str:
    """The stream of one project's API predictions (next to its online store keys)."""
    return f"{project}:predictions"


def prediction_entry(
    *,
    prediction_id: str,
    transaction: Mapping[str, Any],
    model_name: str,
    model_version: int,
    probability: float,
    decision: str,
    threshold: float,
    scorer: str,
    latency_ms: float,
    flags: Mapping[str, Any],
    features: Mapping[str, Any],
    predicted_at: datetime | None = None,
    role: str | None = None,
    experiment: str | None = None,
    arm: str | None = None,
    selection_probability: float | None = None,
) -> bytes:
    """One API prediction as its log stream stores it: a JSON object (one field, `ENTRY_FIELD`)
    with the `LOG_SCHEMA` columns; flags and features (the model inputs) as nested objects.
    (One field, not one per column: redis-py packs each argument in Python, and 21 of them per
    prediction cost more CPU than the whole scoring.) orjson writes a NaN feature as null, numpy
    scalars as numbers, ~10x faster than json.dumps. The experiment's fields (role, experiment,
    arm, selection_probability) are written only when set: a plain prediction's entry is as before."""
    ts = transaction["event_timestamp"]
    record = {
        "prediction_id": prediction_id,
        "predicted_at": (predicted_at or datetime.now(UTC)).isoformat(),
        "transaction_id": str(transaction["transaction_id"]),
        "user_id": int(transaction["user_id"]),
        "merchant_id": int(transaction["merchant_id"]),
        "merchant_category": str(transaction["merchant_category"]),
        "amount": float(transaction["amount"]),
        "country": str(transaction["country"]),
        "device": str(transaction["device"]),
        "channel": str(transaction["channel"]),
        "event_timestamp": ts.isoformat() if isinstance(ts, datetime) else str(ts),
        "model_name": model_name,
        "model_version": int(model_version),
        "probability": float(probability),
        "decision": decision,
        "threshold": float(threshold),
        "scorer": scorer,
        "latency_ms": round(float(latency_ms), 3),
        "flags": flags if type(flags) is dict else dict(flags),  # orjson takes dicts, not any Mapping
        "features": features if type(features) is dict else dict(features),
    }
    if role is not None:
        record["role"] = role
    if experiment is not None:
        record["experiment"] = experiment
        record["arm"] = arm
        record["selection_probability"] = selection_probability
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)


class PredictionLogWriter:
    """Appends prediction entries to the stream from a background task, in pipelined batches
    (at most `batch_size` entries, sent at most every `linger_s` seconds while traffic flows).

    `append` never blocks and never fails a request: entries wait in memory (at most
    `max_pending`; beyond that the oldest are dropped and counted) until Redis takes them; while
    Redis is down the task retries with a growing pause, keeping what it holds.
    """

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis
        stream: str,
        *,
        maxlen: int = DEFAULT_MAXLEN,
        max_pending: int = 50_000,
        batch_size: int = 200,
        linger_s: float = 0.05,
    ):
        self.client = client
        self.stream = stream
        self.maxlen = int(maxlen)
        self.max_pending = int(max_pending)
        self.batch_size = int(batch_size)
        self.linger_s = float(linger_s)
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.last_error: str | None = None
        self._pending: deque[bytes] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, entries: Iterable[bytes]) -> None:
        self._pending.extend(entries)
        overflow = len(self._pending) - self.max_pending
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            self.dropped += overflow
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        """The writer task: runs until cancelled (call `close` first to flush)."""
        pause = 0.05
        while True:
            if not self._pending:
                self._idle.set()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                if self.linger_s > 0 and not self._closing:
                    # let a few batches of predictions gather: one pipeline per ~50 ms, not per request
                    await asyncio.sleep(self.linger_s)
                continue
            batch = [self._pending[i] for i in range(min(self.batch_size, len(self._pending)))]
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for entry in batch:
                        pipe.xadd(self.stream, {ENTRY_FIELD: entry}, maxlen=self.maxlen, approximate=True)
                    await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - Redis down: keep the entries, retry later
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                if self._closing:
                    return
                _log.warning("prediction log: XADD failed (%s); %d entries waiting", exc, len(self._pending))
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            pause = 0.05
            for _ in range(len(batch)):
                self._pending.popleft()
            self.written += len(batch)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every appended entry is written (True) or `timeout` passes (False)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 2.0) -> None:
        """Write what is pending (up to `timeout`), then let the task end."""
        self._closing = True
        self._wake.set()
        if not await self.flush(timeout) and self._pending:
            _log.warning("prediction log: %d entries not written at shutdown", len(self._pending))

    def status(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "pending": self.pending,
            "written": self.written,
            "dropped": self.dropped,
            "errors": self.errors,
            "last_error": self.last_error,
        }
