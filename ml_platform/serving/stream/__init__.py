"""Streaming prediction on Redis Streams: a consumer-group worker that scores transaction events
with the champion model and keeps the windowed features up to date (`ml-platform stream`).

    events.py        the input events: field checks, `parse_event`, `MalformedEvent`, `event_payloads`
    streams.py       stream and key names, `publish_events` / `publish_payloads`, `read_predictions`
    config.py        `StreamConfig`
    worker.py        `StreamWorker`: the read -> fold -> score -> write loop (steps in its docstring)
    scoring_plan.py  which features come from the stream's buffers and which from the online store
    emit.py          the prediction JSON and the atomic emit script (`emit_parts.lua` + `emit.lua`;
                     on a Redis Cluster split by slot: `emit_outputs.lua`, `emit_dead.lua`, XACK)
    sink.py          the writer thread (a batch is written while the next one is read and folded)
    stats.py         `WorkerStats` and the per-phase clock
    seeding.py       cold start: fold the recent raw history into the buffers once per project
    run.py           `build_worker`, `run_worker` (the entry point)

The model comes from `ml_platform.serving.champion` (`ChampionWatcher`, `load_version`): a batch is
scored by one model version, named in each prediction (`model_version`).

Label events (`{"kind": "label", "transaction_id", "merchant_id", "is_fraud", "label_timestamp"}`)
fold into the views whose source time is the label time (merchant_fraud_stats) and update their
online values; they produce no prediction. Without a label stream, the offline materialization
keeps that view fresh.

Delivery is at-least-once with one decision per event: the output is written before the
acknowledgement, and a replayed event (a crash, a claim of a slow worker's entry, a re-published
event) never yields a second or a different decision (`emit.lua`); its fold is a no-op.
"""

from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.events import (
    EVENT_FIELD,
    EVENT_TIME,
    LABEL,
    TRANSACTION,
    MalformedEvent,
    event_payloads,
    parse_event,
)
from ml_platform.serving.stream.run import build_worker, run_worker
from ml_platform.serving.stream.seeding import empty_feature_table, seed_from_raw, seed_once
from ml_platform.serving.stream.sink import SinkError
from ml_platform.serving.stream.stats import WorkerStats
from ml_platform.serving.stream.streams import (
    PREDICTION_FIELD,
    StreamNames,
    default_consumer_name,
    publish_events,
    publish_payloads,
    read_predictions,
    stream_names,
)
from ml_platform.serving.stream.worker import RETRYABLE, StreamWorker

__all__ = [
    "EVENT_FIELD",
    "EVENT_TIME",
    "LABEL",
    "PREDICTION_FIELD",
    "RETRYABLE",
    "TRANSACTION",
    "MalformedEvent",
    "SinkError",
    "StreamConfig",
    "StreamNames",
    "StreamWorker",
    "WorkerStats",
    "build_worker",
    "default_consumer_name",
    "empty_feature_table",
    "event_payloads",
    "parse_event",
    "publish_events",
    "publish_payloads",
    "read_predictions",
    "run_worker",
    "seed_from_raw",
    "seed_once",
    "stream_names",
]
