"""The Redis streams and keys of a project's stream worker, and the producer/consumer helpers
around them: publish events (`publish_events`, `publish_payloads`), read the predictions back
(`read_predictions`), name a consumer.

The stream names are the same on one node and on Redis Cluster (producers, the prediction log's
drain and the CLI name them without knowing which it is). On a cluster only the worker's `done`
keys differ: they carry the hash tag of the output stream's slot (`redis_cluster.slot_tag`), so
the emit script that sets them and appends the outputs touches one slot; the dead letters' guard
keys carry the dead-letter stream's (docs/streaming.md, "Redis Cluster")."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import pandas as pd
import redis

from ml_platform.featurestore.redis_cluster import slot_tag
from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.events import EVENT_FIELD, TRANSACTION, event_payloads

PREDICTION_FIELD = "prediction"  # the output entry's field holding the prediction as JSON


@dataclass(frozen=True)
class StreamNames:
    input: str
    output: str
    dead_letter: str
    done_prefix: str
    seeded: str
    input_columns: str  # hash: model version -> the names of its outputs' `features` array
    # a dead letter's guard key is this + the input entry id: on a cluster, where the emit is split
    # by slot, it makes a replayed dead letter count once (one node: unused, the emit is one script)
    dead_done_prefix: str = ""


def input_columns_key(output_stream: str) -> str:
    """The hash naming the `features` array of an output stream's predictions, per model version."""
    return f"{output_stream}:input_columns"


def stream_names(project: str, config: StreamConfig | None = None, *, cluster: bool = False) -> StreamNames:
    """The keys a project's stream worker uses (config overrides the stream names). `cluster`: the
    worker's keys on Redis Cluster (the same streams; `done` keys in the output stream's slot)."""
    config = config or StreamConfig()
    base = f"{project}:stream:"
    output = config.output_stream or base + "predictions"
    dead_letter = config.dead_letter_stream or base + "dead_letter"
    input_stream = config.input_stream or base + "transactions"
    done, dead_done = base + "done:", base + "done:dead:"
    if cluster:
        if any(c in project for c in "{}"):
            raise ValueError(f"project {project!r} must not contain '{{' or '}}' on Redis Cluster (hash tags)")
        fields = (
            ("StreamConfig.output_stream", output),
            ("StreamConfig.dead_letter_stream", dead_letter),
            ("StreamConfig.input_stream", input_stream),
        )
        tags = []
        for name, key in fields:
            try:
                tags.append(slot_tag(key))
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        done, dead_done = f"{base}done:{{{tags[0]}}}:", f"{base}done:{{{tags[1]}}}:dead:"
    return StreamNames(
        input=input_stream,
        output=output,
        dead_letter=dead_letter,
        done_prefix=done,
        seeded=base + "seeded",
        input_columns=input_columns_key(output),
        dead_done_prefix=dead_done,
    )


def default_consumer_name() -> str:
    """A name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


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
    """Every prediction in an output stream (oldest first), as dicts with `entry_id`; the
    `features` array named (a dict, by `input_columns_key`'s names of its model version)."""
    out = []
    last = "-"
    field = PREDICTION_FIELD.encode()
    names = input_column_names(client, stream)
    while True:
        entries = client.xrange(stream, min=last, max="+", count=5000)
        if last != "-":
            entries = entries[1:]
        if not entries:
            break
        for entry_id, fields in entries:
            body = orjson.loads(fields[field])
            body["entry_id"] = entry_id.decode()
            inputs = body.get("features")
            if isinstance(inputs, list) and body.get("model_version") in names:
                body["features"] = dict(zip(names[body["model_version"]], inputs))
            out.append(body)
        last = entries[-1][0]
        if count is not None and len(out) >= count:
            break
    return out


def input_column_names(client: redis.Redis, output_stream: str) -> dict[int, list[str]]:
    """{model version: the names of its predictions' `features` array} of an output stream."""
    recorded = client.hgetall(input_columns_key(output_stream))
    return {int(as_text(version)): orjson.loads(names) for version, names in recorded.items()}


def as_text(value: Any) -> str:
    """A Redis reply value (bytes, or str from a decoding client) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
