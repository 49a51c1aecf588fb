"""A batch's outputs: the prediction JSON of each scored event and the one atomic emit script
(`emit.lua`: per event `SET done:<event id> <decision> NX EX <ttl>`, XADD the prediction only if
it was set, dead letters, then XACK of the whole batch).

On a Redis Cluster whose input, output and dead-letter streams are in different slots (the
default names), the emit is split by slot: the decisions and predictions in one script on the
output stream's slot (the `done` keys carry its hash tag), the dead letters in one on the
dead-letter stream's (each entry guarded, so a replay writes none twice), then XACK, after both.
Exactly one output per event either way; what is atomic: docs/streaming.md, "Redis Cluster".

The prediction JSON is built from a template, not by dumping a dict per event (orjson.dumps of a
dict per event measured 3x slower than the template on 1,000 predictions); every string that
could need escaping is quoted by orjson. Times are formatted by numpy for the whole batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis

from ml_platform.featurestore.redis_cluster import is_cluster_client, slot_tag
from ml_platform.featurestore.streaming import EVENT_ID
from ml_platform.serving.prediction_log import LIVE, REFERENCE_SCORER
from ml_platform.serving.scorer.columns import EVENT_US, model_input_columns
from ml_platform.serving.scoring import LoadedModel
from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.events import TRANSACTION_STRING_FIELDS
from ml_platform.serving.stream.streams import StreamNames, as_text, input_columns_key
from ml_platform.values import is_missing


def _lua(name: str) -> str:
    return (Path(__file__).parent / f"{name}.lua").read_text()


_PARTS = _lua("emit_parts")  # the functions every emit script is made of
EMIT_LUA = _PARTS + _lua("emit")  # one node (and a cluster whose streams share a slot): all at once
EMIT_OUTPUTS_LUA = _PARTS + _lua("emit_outputs")  # cluster: decisions + predictions, the output's slot
EMIT_DEAD_LUA = _PARTS + _lua("emit_dead")  # cluster: guarded dead letters, the dead-letter stream's slot
ACK_CHUNK = 500  # ids per XACK when the acknowledgements are sent apart (cluster)

# (entry id, done key, event id, prediction JSON, decision summary "v<version> <probability> <decision>")
PredictionItem = tuple[bytes, str, str, str, str]


def pack_fields(items: Iterable[Sequence[Any]]) -> bytes:
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


class Emitter:
    """The emit script of one worker: writes a batch's decisions, predictions, dead letters and
    acknowledgements atomically; returns (predictions written, duplicates, dead letters)."""

    def __init__(self, client: redis.Redis, names: StreamNames, config: StreamConfig, consumer: str):
        self._client = client
        self._names = names
        self._config = config
        self._consumer = consumer
        self._keys = [names.input, names.output, names.dead_letter]
        self._head = [config.group, config.done_ttl_s, config.output_maxlen, consumer]
        # On a cluster: one script only if every key it touches is in one slot.
        self.split = is_cluster_client(client) and len(
            {slot_tag(k) for k in (*self._keys, names.done_prefix, names.dead_done_prefix)}
        ) > 1
        if self.split:
            self._outputs = client.register_script(EMIT_OUTPUTS_LUA)
            self._dead = client.register_script(EMIT_DEAD_LUA)
        else:
            self._script = client.register_script(EMIT_LUA)

    def __call__(
        self,
        predictions: Iterable[PredictionItem],
        label_done: Iterable[tuple[bytes, str]],
        dead: Iterable[tuple[bytes, str, bytes]],
        acks: Iterable[bytes],
    ) -> tuple[int, int, int]:
        if self.split:
            return self._split_emit(list(predictions), list(label_done), list(dead), list(acks))
        args = [
            *self._head,
            pack_fields(predictions),
            pack_fields(label_done),
            pack_fields(dead),
            pack_fields((a,) for a in acks),
        ]
        written, dupes, dead_count = self._script(keys=self._keys, args=args)
        return int(written), int(dupes), int(dead_count)

    def _split_emit(self, predictions, label_done, dead, acks) -> tuple[int, int, int]:
        """The cluster emit: outputs (output stream's slot), dead letters (dead-letter stream's),
        then the acknowledgements (input stream's), each step after the one before returned."""
        names, config = self._names, self._config
        written = dupes = dead_count = 0
        if predictions or label_done:
            written, dupes = self._outputs(
                keys=[names.output],
                args=[config.done_ttl_s, config.output_maxlen, pack_fields(predictions), pack_fields(label_done)],
            )
        if dead:
            dead_count = self._dead(
                keys=[names.dead_letter],
                args=[self._consumer, names.dead_done_prefix, config.done_ttl_s, pack_fields(dead)],
            )
        # acknowledged last, after every output and dead letter of the batch is written
        self._ack([p[0] for p in predictions] + [d[0] for d in label_done] + [d[0] for d in dead] + list(acks))
        return int(written), int(dupes), int(dead_count)

    def _ack(self, ids: list[bytes]) -> None:
        for s in range(0, len(ids), ACK_CHUNK):
            self._client.xack(self._names.input, self._config.group, *ids[s : s + ACK_CHUNK])


def prediction_items(
    transactions: Sequence[tuple[bytes, dict]],
    done_keys: Sequence[str],
    event_us: np.ndarray,
    scores: np.ndarray,
    features: Mapping[str, Any] | None,
    model,
    consumer: str,
    experiment: tuple[str, str, np.ndarray] | None = None,
) -> list[PredictionItem]:
    """The emit script's prediction items for a scored batch (`scores` NaN: not scored, a null
    probability and decision). `model` (a LoadedModel/ScoringPath, or None) names the version,
    the decision threshold and the scorer; `features` (column -> values, as `logged_features`
    gives them; None: no features) go into each prediction as an array of values in the columns'
    order (`feature_arrays`; the names: `publish_input_columns`). What can be is computed
    for the whole batch first (times, probabilities, decisions). Each prediction carries what the
    prediction log needs (`prediction_log_drain.StreamRecords`): the transaction's request fields,
    the model's name, version and scorer, the threshold, the decision, the inputs; during an
    experiment (`experiment` = (name, arm, selection probability per event)) its role, experiment,
    arm and selection probability."""
    scored_at = datetime.now(UTC).isoformat()
    threshold = model.contract.decision_threshold if model is not None else None
    version = "null" if model is None else int(model.version)
    model_name = getattr(getattr(model, "contract", None), "model_name", None)
    fixed = (
        f',"threshold":{json_number(threshold)},"model_version":{version},'
        f'"model_name":{json_quote(model_name) if model_name else "null"},"scorer":{json_quote(scorer_name(model))},'
        f'"scored_at":"{scored_at}","consumer":{json_quote(consumer)},"input_id":"'
    )
    # (decision in the JSON, decision in the done key's summary)
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
        input_ids = [as_text(entry_id) for entry_id in ids]
    inputs = feature_arrays(features, len(transactions)) if features is not None else None
    routed = None
    if experiment is not None:
        name, arm, chosen = experiment
        head = f',"role":"{LIVE}","experiment":{json_quote(name)},"arm":{json_quote(arm)},"selection_probability":'
        routed = [head + repr(p) for p in np.asarray(chosen, dtype=float).tolist()]
    # The request's strings (category, country, device, channel) repeat: each field's values are
    # written once per batch, then looked up (their combinations hardly repeat).
    members = []
    for name in TRANSACTION_STRING_FIELDS:
        column = [event.get(name) for _, event in transactions]
        written = {v: f',"{name}":{"null" if v is None else json_quote(str(v))}' for v in set(column)}
        members.append([written[v] for v in column])
    request_members = list(map("".join, zip(*members)))
    out = []
    for i, ((entry_id, event), done_key, stamp, probability, (decision, word), input_id) in enumerate(
        zip(transactions, done_keys, utc_iso_column(event_us), probabilities, decisions, input_ids)
    ):
        event_id = event[EVENT_ID]
        quoted = json_quote(event_id)
        body = (
            f'{{"prediction_id":"stream-{quoted[1:]},"event_id":{quoted},"user_id":{event["user_id"]},'
            f'"merchant_id":{event["merchant_id"]},"amount":{float(event["amount"])!r}{request_members[i]},'
            f'"event_timestamp":"{stamp}+00:00","probability":{probability},"decision":{decision}{fixed}{input_id}"'
        )
        if routed is not None:
            body += routed[i]
        if inputs is not None:
            body += ',"features":' + inputs[i]
        out.append((entry_id, done_key, event_id, body + "}", f"{tag}{probability} {word}"))
    return out


def publish_input_columns(
    client: redis.Redis, output_stream: str, version: int, names: Sequence[str]
) -> None:
    """Record the names of a model version's `features` array (once per version and worker):
    `HSET <output stream>:input_columns <version> '["txn_count_1h", ...]'`. A schema per version
    rather than names in every output: with the names (one JSON object per event) an output was
    1.4 KB instead of 0.85 KB, and building it took 2.5x the array's time (docs/streaming.md)."""
    client.hset(input_columns_key(output_stream), str(int(version)), orjson.dumps(list(names)))


def scorer_name(model) -> str | None:
    """How the model is run: a ScoringPath's name ("compiled+treelite", ...); a bare LoadedModel is
    scored by the reference path (assemble_features + the scikit-learn Pipeline)."""
    if model is None:
        return None
    name = getattr(model, "name", None)
    if isinstance(name, str):
        return name
    return REFERENCE_SCORER if isinstance(model, LoadedModel) else type(model).__name__


def logged_features(
    model,
    plan_columns: Sequence[str],
    events: Sequence[Mapping[str, Any]],
    event_us: np.ndarray,
    looked_up: Mapping[str, Any],
) -> dict[str, Any]:
    """The model's input values for each event of a batch, column by column in the contract's
    order (numeric float64, NaN for null; categorical as given, None for null): what the HTTP API
    logs, computed by the scorer's own column assembly (`scorer.columns.model_input_columns`) from
    the request (`plan_columns`: its string columns, `ScoringPlan.request_columns`) and the
    looked-up values. A model without an input contract (a stand-in) gives its looked-up values."""
    contract = getattr(model, "contract", None)
    if not getattr(contract, "input_columns", None):
        return dict(looked_up)
    n = len(events)
    request: dict[str, Any] = {
        "amount": np.fromiter([e["amount"] for e in events], np.float64, n),
        EVENT_US: event_us,
    }
    for column in plan_columns:
        request[column] = [e.get(column) for e in events]
    numeric, categorical = model_input_columns(contract, request, looked_up)
    return {**numeric, **categorical}


def feature_arrays(features: Mapping[str, Any], n: int) -> list[str]:
    """Each row of `features` (column -> n values) as a JSON array in the columns' order (NaN
    and None are null; the names are published once per model version, `publish_input_columns`).
    Built for the whole batch: the numeric columns as one 2-D array written by ONE orjson call
    and split at the row boundaries, each distinct value of the other columns written once."""
    if n == 0:
        return []
    numeric = [v for v in features.values() if isinstance(v, np.ndarray) and v.dtype.kind in "fiub"]
    other = [v for v in features.values() if not (isinstance(v, np.ndarray) and v.dtype.kind in "fiub")]
    if len(numeric) + len(other) == 0:
        return ["[]"] * n
    kinds = [isinstance(v, np.ndarray) and v.dtype.kind in "fiub" for v in features.values()]
    if kinds != sorted(kinds, reverse=True):  # not numeric first, then text (the contract's order)
        return [
            orjson.dumps(list(row), option=orjson.OPT_SERIALIZE_NUMPY).decode()
            for row in zip(*features.values())
        ]
    parts: list[list[str]] = []
    if numeric:
        matrix = np.column_stack([np.asarray(v, dtype=np.float64) for v in numeric])
        parts.append(orjson.dumps(matrix, option=orjson.OPT_SERIALIZE_NUMPY).decode()[2:-2].split("],["))
    if other:
        columns = []
        for values in other:  # each distinct value written once (categories, countries repeat)
            written = {
                v: "null" if is_missing(v) else orjson.dumps(v, option=orjson.OPT_SERIALIZE_NUMPY).decode()
                for v in set(values)
            }
            columns.append([written[v] for v in values])
        parts.append(list(map(",".join, zip(*columns))))
    if len(parts) == 1:
        return ["[" + row + "]" for row in parts[0]]
    return ["[" + a + "," + b + "]" for a, b in zip(*parts)]


# --------------------------------------------------------------------------- JSON pieces


def json_quote(text: str) -> str:
    """`text` as a JSON string literal (quotes included)."""
    return orjson.dumps(text).decode()


def json_number(value: float | None) -> str:
    """A float as JSON: its repr, or null for None/NaN."""
    return "null" if is_missing(value) else repr(float(value))  # type: ignore[arg-type]


def utc_iso_column(event_us: np.ndarray) -> list[str]:
    """`datetime.isoformat()` of each time (int64 µs since the epoch) in UTC, without its
    "+00:00" suffix ('2026-11-26T10:00:00.123456', or '2026-11-26T10:00:00' on a whole second),
    formatted by numpy for the whole batch (the vectorised form of `timestamps.from_us(us).isoformat()`)."""
    stamps = event_us.astype("datetime64[us]")
    text = np.datetime_as_string(stamps, unit="us")
    whole = event_us % 1_000_000 == 0
    if whole.any():  # isoformat leaves out a zero fraction
        text = text.astype(object)
        text[whole] = np.datetime_as_string(stamps[whole], unit="s")
    return text.tolist()
