"""The prediction log: API entries, the stream worker's outputs and a batch day in one dataset
(`source=<api|stream|batch>/date=D/`), read back as one frame; drains that never duplicate or lose
an entry across re-runs and crashes; the first layout's files still read (and migrated).

Real Redis (the conftest `client`), every key under this module's own prefix, deleted after.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from ml_platform import features as fr
from ml_platform.featurestore.streaming import EVENT_ID
from ml_platform.serving import prediction_log_drain
from ml_platform.serving.batch import read_predictions, score_partition
from ml_platform.serving.prediction_log import (
    BATCH_FILE,
    FEATURE_PREFIX,
    LOG_COLUMNS,
    SOURCES,
    day_dir,
    prediction_entry,
    prediction_stream_key,
)
from ml_platform.serving.prediction_log_drain import (
    LOG_GROUP,
    drain_prediction_log,
    drain_stream_predictions,
)
from ml_platform.serving.prediction_log_reader import logged_days, model_input_frame, read_prediction_log
from ml_platform.serving.scoring import LoadedModel, assemble_features, load_champion
from ml_platform.serving.stream.config import StreamConfig
from ml_platform.serving.stream.emit import Emitter, prediction_items, publish_input_columns
from ml_platform.serving.stream.events import EVENT_FIELD
from ml_platform.serving.stream.streams import PREDICTION_FIELD, stream_names

try:
    from fixtures_platform import (  # tiny_platform: a fixture
        delete_project_keys,
        tiny_platform,
        unique_project,
    )
except ImportError:  # ml_platform_tests imported as a package
    from ml_platform_tests.fixtures_platform import (
        delete_project_keys,
        tiny_platform,  # noqa: F401
        unique_project,
    )

DAY_MS = 1_893_542_400_000  # 2030-01-02T00:00:00Z: the API entries' stream ids are on that day
API_DAY = date(2030, 1, 2)


@pytest.fixture()
def project(client):
    name = unique_project("test_predlog")
    yield name
    delete_project_keys(client, name)


# --------------------------------------------------------------------------- writing the sources


def _api_entries(client, project: str) -> list[dict]:
    """Two API predictions with hand-written values, logged at 2030-01-02 10:00 UTC."""
    rows = [
        {"prediction_id": "api-1", "transaction_id": "t-api-1", "user_id": 11, "merchant_id": 21,
         "category": "grocery", "amount": 12.5, "country": "DE", "probability": 0.8, "decision": "fraud",
         "latency": 1.25, "features": {"amount": 12.5, "txn_count_1h": 3.0, "home_country": "FR", "is_foreign": 1.0}},
        {"prediction_id": "api-2", "transaction_id": "t-api-2", "user_id": 12, "merchant_id": 22,
         "category": "travel", "amount": 99.0, "country": "FR", "probability": 0.1, "decision": "legit",
         "latency": 2.5,
         "features": {"amount": 99.0, "txn_count_1h": None, "home_country": None, "is_foreign": float("nan")}},
    ]  # fmt: skip
    stream = prediction_stream_key(project)
    for i, row in enumerate(rows):
        entry = prediction_entry(
            prediction_id=row["prediction_id"],
            transaction={
                "transaction_id": row["transaction_id"],
                "user_id": row["user_id"],
                "merchant_id": row["merchant_id"],
                "merchant_category": row["category"],
                "amount": row["amount"],
                "country": row["country"],
                "device": "ios",
                "channel": "pos",
                "event_timestamp": datetime(2030, 1, 2, 9, 59, i, tzinfo=UTC),
            },
            model_name="fraud_detector",
            model_version=2,
            probability=row["probability"],
            decision=row["decision"],
            threshold=0.5,
            scorer="compiled+treelite",
            latency_ms=row["latency"],
            flags={"unknown_entity": i == 1},
            features=row["features"],
            predicted_at=datetime(2030, 1, 2, 10, 0, i, tzinfo=UTC),
        )
        client.xadd(stream, {"json": entry}, id=f"{DAY_MS + 36_000_000 + i}-0")
    return rows


_STREAM_EVENTS = [
    {EVENT_ID: "t-stream-1", "transaction_id": "t-stream-1", "user_id": 31, "merchant_id": 41, "amount": 7.25,
     "merchant_category": "travel", "country": "FR", "device": "android", "channel": "online"},
    {EVENT_ID: "t-stream-2", "transaction_id": "t-stream-2", "user_id": 32, "merchant_id": 42, "amount": 500.0,
     "merchant_category": "electronics", "country": "US", "device": "desktop", "channel": "online"},
]  # fmt: skip
_STREAM_TIMES = [
    datetime(2030, 1, 3, 8, 0, 0, 500_000, tzinfo=UTC),
    datetime(2030, 1, 3, 8, 0, 1, tzinfo=UTC),
]


def _stream_outputs(client, project: str) -> tuple[int, list[bytes]]:
    """Two outputs written by the worker's own emit (prediction JSON + emit script) for input
    entries that entered the input stream 5 s ago. Returns (input id ms, output ids)."""
    names = stream_names(project)
    config = StreamConfig()
    input_ms = int(datetime.now(UTC).timestamp() * 1000) - 5000
    payloads = [json.dumps({k: v for k, v in e.items() if k != EVENT_ID}) for e in _STREAM_EVENTS]
    ids = [client.xadd(names.input, {EVENT_FIELD: p}, id=f"{input_ms}-{i}") for i, p in enumerate(payloads)]
    client.xgroup_create(names.input, config.group, id="0")
    client.xreadgroup(config.group, "w1", {names.input: ">"}, count=10)
    model = SimpleNamespace(
        version=3,
        name="compiled+treelite",
        contract=SimpleNamespace(decision_threshold=0.5, model_name="fraud_detector"),
    )
    event_us = np.array([int(t.timestamp() * 1_000_000) for t in _STREAM_TIMES], dtype=np.int64)
    features = {"txn_count_1h": np.array([1.0, np.nan]), "home_country": ["FR", None]}
    items = prediction_items(
        list(zip(ids, _STREAM_EVENTS)),
        [names.done_prefix + e[EVENT_ID] for e in _STREAM_EVENTS],
        event_us,
        np.array([0.25, 0.75]),
        features,
        model,
        "w1",
    )
    publish_input_columns(client, names.output, 3, list(features))  # as the worker does, once per version
    assert Emitter(client, names, config, "w1")(items, [], [], []) == (2, 0, 0)
    return input_ms, [sid for sid, _ in client.xrange(names.output)]


# --------------------------------------------------------------------------- one frame, three sources


def test_api_stream_and_batch_predictions_read_back_as_one_frame(client, project, tiny_platform, tmp_path):
    log_dir = tmp_path / "log"
    api_rows = _api_entries(client, project)
    input_ms, output_ids = _stream_outputs(client, project)
    output = stream_names(project).output

    # on the wire: the inputs as an array, named once per model version
    wire = orjson.loads(client.xrange(output)[0][1][PREDICTION_FIELD.encode()])
    assert wire["features"] == [1.0, "FR"] and wire["amount"] == 7.25 and wire["channel"] == "online"
    assert orjson.loads(client.hget(f"{output}:input_columns", "3")) == ["txn_count_1h", "home_country"]

    api = drain_prediction_log(client, prediction_stream_key(project), log_dir)
    assert (api["rows"], api["skipped"], api["source"]) == (2, 0, "api") and client.xlen(
        prediction_stream_key(project)
    ) == 0
    assert api["files"] == [
        str(
            day_dir(log_dir, "api", API_DAY) / f"part-{DAY_MS + 36_000_000}-0_{DAY_MS + 36_000_001}-0.parquet"
        )
    ]
    started = datetime.now(UTC)
    stream = drain_stream_predictions(client, output, log_dir)
    assert (stream["rows"], stream["acknowledged"], stream["lag"], stream["group"]) == (2, 2, 0, LOG_GROUP)
    assert client.xlen(output) == 2  # the product stream is not trimmed ...
    assert client.xpending(output, LOG_GROUP)["pending"] == 0  # ... only acknowledged by the log's group

    champion = load_champion(tiny_platform.registry)
    day = pd.to_datetime(tiny_platform.events[fr.EVENT_TS], utc=True).dt.date.max()
    db = tmp_path / "predictions.duckdb"
    batch = score_partition(tiny_platform.store, champion, day, db, chunk_rows=64, log_dir=log_dir)
    assert batch["log_path"] == str(day_dir(log_dir, "batch", day) / BATCH_FILE)

    frame = read_prediction_log(log_dir)
    assert list(frame.columns[: len(LOG_COLUMNS) + 1]) == [*LOG_COLUMNS, "date"]
    assert (
        frame["source"].tolist() == ["api"] * 2 + ["stream"] * 2 + ["batch"] * batch["rows"]
    )  # SOURCES' order
    assert logged_days(log_dir) == {"api": [API_DAY], "stream": [started.date()], "batch": [day]}

    # api: every value as logged
    a = frame[frame["source"] == "api"].set_index("prediction_id")
    for row in api_rows:
        got = a.loc[row["prediction_id"]]
        assert (got["transaction_id"], got["user_id"], got["merchant_id"]) == (
            row["transaction_id"],
            row["user_id"],
            row["merchant_id"],
        )
        assert (got["merchant_category"], got["amount"], got["country"]) == (
            row["category"],
            row["amount"],
            row["country"],
        )
        assert (got["probability"], got["decision"], got["threshold"], got["latency_ms"]) == (
            row["probability"],
            row["decision"],
            0.5,
            row["latency"],
        )
        assert (got["model_name"], got["model_version"], got["scorer"]) == (
            "fraud_detector",
            2,
            "compiled+treelite",
        )
        assert got["date"] == API_DAY and got["predicted_at"].date() == API_DAY
    assert a.loc["api-1", "event_timestamp"] == pd.Timestamp("2030-01-02T09:59:00Z")
    assert a.loc["api-1", "feature.amount"] == 12.5 and a.loc["api-1", "feature.txn_count_1h"] == 3.0
    assert a.loc["api-1", "feature.home_country"] == "FR" and a.loc["api-1", "feature.is_foreign"] == 1.0
    assert pd.isna(a.loc["api-2", "feature.txn_count_1h"]) and pd.isna(a.loc["api-2", "feature.home_country"])
    assert pd.isna(a.loc["api-2", "feature.is_foreign"])  # NaN in the entry: null in the log
    assert json.loads(a.loc["api-2", "flags"]) == {"unknown_entity": True}
    assert a["stream_id"].tolist() == [f"{DAY_MS + 36_000_000}-0", f"{DAY_MS + 36_000_001}-0"]

    # stream: the worker's JSON mapped to the log's columns
    s = frame[frame["source"] == "stream"].set_index("transaction_id")
    one, two = s.loc["t-stream-1"], s.loc["t-stream-2"]
    assert one["prediction_id"] == "stream-t-stream-1" and one["stream_id"] == output_ids[0].decode()
    assert (one["user_id"], one["merchant_id"], one["amount"], one["merchant_category"]) == (
        31,
        41,
        7.25,
        "travel",
    )
    assert (one["country"], one["device"], one["channel"]) == ("FR", "android", "online")
    assert (one["probability"], one["decision"], two["probability"], two["decision"]) == (
        0.25,
        "legit",
        0.75,
        "fraud",
    )
    assert (one["threshold"], one["model_name"], one["model_version"], one["scorer"]) == (
        0.5,
        "fraud_detector",
        3,
        "compiled+treelite",
    )
    assert one["event_timestamp"] == pd.Timestamp("2030-01-03T08:00:00.5Z")
    assert started - timedelta(seconds=30) < one["predicted_at"] <= started
    # latency: from the input entry's id (5 s before the emit) to the prediction
    expected = (one["predicted_at"] - pd.Timestamp(input_ms, unit="ms", tz="UTC")).total_seconds() * 1000
    assert one["latency_ms"] == pytest.approx(expected, abs=1e-3) and 5000 <= one["latency_ms"] < 35_000
    assert json.loads(one["flags"]) == {"consumer": "w1", "input_id": f"{input_ms}-0"}
    assert one["feature.txn_count_1h"] == 1.0 and one["feature.home_country"] == "FR"
    assert pd.isna(two["feature.txn_count_1h"]) and pd.isna(two["feature.home_country"])

    # batch: the published predictions, the decision as text, the inputs the model read
    b = frame[frame["source"] == "batch"].set_index("transaction_id")
    published = read_predictions(db, day).set_index("transaction_id")
    assert b.index.is_unique and sorted(b.index) == sorted(published.index)
    assert (b["probability"] == published.loc[b.index, "score"]).all()
    assert (b["decision"] == np.where(published.loc[b.index, "decision"], "fraud", "legit")).all()
    assert (b["prediction_id"] == "batch-" + b.index.to_series()).all() and b["stream_id"].isna().all()
    assert (b["model_version"] == 2).all() and (b["threshold"] == champion.contract.decision_threshold).all()
    assert (b["predicted_at"] == published["scored_at"].iloc[0]).all() and (b["date"] == day).all()
    assert (
        (b["latency_ms"] > 0).all() and b["flags"].isna().all() and (b["scorer"] == batch["scorer"]).all()
    )
    # how the day was scored: the compiled trees with this machine's compiler, else the reference path
    assert batch["scorer"] in ("compiled+native", "reference+sklearn")
    raw = tiny_platform.events.set_index("transaction_id").loc[b.index]
    assert (b["amount"] == raw["amount"]).all() and (b["feature.amount"] == raw["amount"]).all()
    assert (b["merchant_category"] == raw["merchant_category"]).all() and (
        b["feature.device"] == raw["device"]
    ).all()
    hours = pd.to_datetime(raw[fr.EVENT_TS], utc=True).dt.hour
    assert (b["feature.hour_of_day"] == hours).all()  # hand-computed from the event time
    assert (b["event_timestamp"] == pd.to_datetime(raw[fr.EVENT_TS], utc=True)).all()
    # Every input is what the training set's path gives for these events: the offline
    # point-in-time lookup (features as of just before each event) + assemble_features + model_input.
    events = raw.reset_index()
    lookup = events[["transaction_id", "user_id", "merchant_id"]].copy()
    lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    looked_up = tiny_platform.store.get_historical_features(lookup, list(champion.contract.feature_refs))
    expected = champion.contract.model_input(
        assemble_features(events, looked_up[list(champion.contract.feature_columns)])
    )
    inputs = model_input_frame(b, champion.contract.input_columns)  # plain input names, the contract's order
    assert list(inputs.columns) == list(champion.contract.input_columns) == list(expected.columns)
    for column in champion.contract.input_columns:
        got, want = inputs[column].to_numpy(), expected[column].to_numpy()
        if column in champion.contract.categorical_features:
            assert [None if pd.isna(v) else v for v in got] == [None if pd.isna(v) else v for v in want], (
                column
            )
        else:
            np.testing.assert_allclose(got.astype(float), want.astype(float), rtol=0, atol=0, err_msg=column)
    assert (expected["txn_count_24h"].fillna(0) > 0).mean() > 0.3  # really looked up: many have history

    # Re-runs add nothing: both drains find nothing new, a re-scored day replaces its file.
    assert drain_prediction_log(client, prediction_stream_key(project), log_dir)["rows"] == 0
    assert drain_stream_predictions(client, output, log_dir)["rows"] == 0
    model, contract = tiny_platform.registry.load_model(1)
    again = score_partition(tiny_platform.store, LoadedModel(1, model, contract), day, db, log_dir=log_dir)
    after = read_prediction_log(log_dir)
    assert len(after) == len(frame) and after["prediction_id"].is_unique
    rescored = after[after["source"] == "batch"]
    assert (rescored["model_version"] == 1).all() and len(rescored) == again["rows"] == batch["rows"]
    assert list((log_dir / "source=batch" / f"date={day}").iterdir()) == [
        day_dir(log_dir, "batch", day) / BATCH_FILE
    ]
    # v1 reads fewer inputs (no merchant views): its file holds its own inputs, v2's are gone
    assert (
        "feature.merchant_txn_count_24h" in frame.columns
        and "feature.merchant_txn_count_24h" not in after.columns
    )
    inputs = {c.removeprefix(FEATURE_PREFIX) for c in after.columns if c.startswith(FEATURE_PREFIX)}
    assert set(contract.input_columns) <= inputs

    # Selections: by source and by day folder
    assert set(read_prediction_log(log_dir, sources=["stream", "api"])["source"]) == {"api", "stream"}
    assert read_prediction_log(log_dir, start=API_DAY, end=API_DAY)["prediction_id"].tolist() == [
        "api-1",
        "api-2",
    ]
    compact = read_prediction_log(log_dir, sources=["api"], expand_features=False)
    assert not any(c.startswith(FEATURE_PREFIX) for c in compact.columns)
    assert json.loads(compact["features"].iloc[0]) == {
        "amount": 12.5,
        "txn_count_1h": 3.0,
        "home_country": "FR",
        "is_foreign": 1.0,
    }
    bare = read_prediction_log(log_dir, sources=["api"], with_features=False)
    assert list(bare.columns) == [*LOG_COLUMNS, "date"]  # no inputs read at all
    assert bare["prediction_id"].tolist() == compact["prediction_id"].tolist()
    with pytest.raises(ValueError, match=r"source must be one of .*'kafka'"):
        read_prediction_log(log_dir, sources=["kafka"])


# --------------------------------------------------------------------------- crashes


class _Crashing:
    """A Redis client whose `method` fails (the process dying at that point of the drain)."""

    def __init__(self, real: redis.Redis, method: str):
        self._real, self._method = real, method

    def __getattr__(self, name):
        if name == self._method:

            def crash(*args, **kwargs):
                raise redis.ConnectionError(f"simulated crash in {name}")

            return crash
        return getattr(self._real, name)


def test_a_crash_between_the_file_and_the_trim_or_ack_loses_and_duplicates_nothing(client, project, tmp_path):
    log_dir = tmp_path / "log"
    _api_entries(client, project)
    stream = prediction_stream_key(project)
    with pytest.raises(redis.ConnectionError, match="xtrim"):
        drain_prediction_log(_Crashing(client, "xtrim"), stream, log_dir)
    assert len(read_prediction_log(log_dir)) == 2 and client.xlen(stream) == 2  # on disk, not trimmed
    again = drain_prediction_log(client, stream, log_dir)  # the lock was released by the crash
    assert (again["rows"], again["skipped"]) == (0, 2) and client.xlen(stream) == 0
    assert read_prediction_log(log_dir)["prediction_id"].tolist() == ["api-1", "api-2"]

    output = stream_names(project).output
    _stream_outputs(client, project)
    with pytest.raises(redis.ConnectionError, match="xack"):
        drain_stream_predictions(_Crashing(client, "xack"), output, log_dir)
    assert len(read_prediction_log(log_dir, sources=["stream"])) == 2
    assert client.xpending(output, LOG_GROUP)["pending"] == 2  # written, not acknowledged
    again = drain_stream_predictions(client, output, log_dir)
    assert (again["rows"], again["skipped"], again["acknowledged"]) == (0, 2, 2)
    assert client.xpending(output, LOG_GROUP)["pending"] == 0
    assert read_prediction_log(log_dir, sources=["stream"])["transaction_id"].tolist() == [
        "t-stream-1",
        "t-stream-2",
    ]


def test_a_crash_before_the_file_is_written_loses_nothing(client, project, tmp_path, monkeypatch):
    log_dir = tmp_path / "log"
    output = stream_names(project).output
    _stream_outputs(client, project)

    def disk_full(path, table):
        raise OSError("simulated: no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(prediction_log_drain, "write_parquet_atomic", disk_full)
        with pytest.raises(OSError, match="no space"):
            drain_stream_predictions(client, output, log_dir)
    assert read_prediction_log(log_dir).empty and client.xpending(output, LOG_GROUP)["pending"] == 2
    # A new output arrives meanwhile: the re-run writes the pending ones, then the new one, once each.
    client.xadd(
        output,
        {"event_id": "t-late", PREDICTION_FIELD: orjson.dumps({"event_id": "t-late", "probability": 0.5})},
    )
    again = drain_stream_predictions(client, output, log_dir)
    assert (again["rows"], again["skipped"], again["acknowledged"]) == (3, 0, 3)
    assert read_prediction_log(log_dir)["transaction_id"].tolist() == ["t-stream-1", "t-stream-2", "t-late"]


def test_malformed_entries_are_kept_as_rows(client, project, tmp_path):
    log_dir = tmp_path / "log"
    output = stream_names(project).output
    sid = client.xadd(output, {"event_id": "x", PREDICTION_FIELD: "not json {"})
    bad_type = client.xadd(
        output, {"event_id": "y", PREDICTION_FIELD: orjson.dumps({"event_id": "y", "amount": "a lot"})}
    )
    unnamed = client.xadd(
        output,
        {
            "event_id": "z",
            PREDICTION_FIELD: orjson.dumps({"event_id": "z", "model_version": 9, "features": [1.5]}),
        },
    )  # no names recorded for v9: the values are kept, unnamed
    client.xadd(prediction_stream_key(project), {"json": "[1, 2]"})
    assert drain_stream_predictions(client, output, log_dir)["rows"] == 3
    assert drain_prediction_log(client, prediction_stream_key(project), log_dir)["rows"] == 1
    frame = read_prediction_log(log_dir)
    assert frame["source"].tolist() == ["api", "stream", "stream", "stream"]
    rows = frame[frame["source"] == "stream"].set_index("stream_id")  # (two streams' ids may coincide)
    flags = json.loads(rows.loc[sid.decode(), "flags"])
    assert (
        flags["unparsed_entry"] == {"event_id": "x", "prediction": "not json {"}
        and "JSONDecodeError" in flags["error"]
    )
    assert (
        "field 'amount': 'a lot' is not a valid value"
        in json.loads(rows.loc[bad_type.decode(), "flags"])["error"]
    )
    assert (
        rows.loc[unnamed.decode(), "transaction_id"] == "z"
        and rows.loc[unnamed.decode(), "model_version"] == 9
    )
    assert json.loads(rows.loc[unnamed.decode(), "flags"]) == {"unnamed_features": [1.5]}
    assert rows.drop(index=unnamed.decode())["transaction_id"].isna().all()


# --------------------------------------------------------------------------- the first layout, empty logs


_OLD_SCHEMA = pa.schema(
    [
        ("prediction_id", pa.string()),
        ("stream_id", pa.string()),
        ("predicted_at", pa.timestamp("us", tz="UTC")),
        ("transaction_id", pa.string()),
        ("user_id", pa.int64()),
        ("merchant_id", pa.int64()),
        ("merchant_category", pa.string()),
        ("amount", pa.float64()),
        ("country", pa.string()),
        ("device", pa.string()),
        ("channel", pa.string()),
        ("event_timestamp", pa.timestamp("us", tz="UTC")),
        ("model_name", pa.string()),
        ("model_version", pa.int64()),
        ("probability", pa.float64()),
        ("decision", pa.string()),
        ("threshold", pa.float64()),
        ("scorer", pa.string()),
        ("latency_ms", pa.float64()),
        ("flags", pa.string()),
        ("features", pa.string()),
    ]
)  # fmt: skip  (the drain's schema before the sources: no `source`, the inputs as JSON text)
OLD_DAY_MS = 1_893_456_000_000  # 2030-01-01


def _old_file(log_dir) -> None:
    rows = [
        {"prediction_id": "old-1", "stream_id": f"{OLD_DAY_MS}-0", "predicted_at": datetime(2030, 1, 1, tzinfo=UTC),
         "transaction_id": "t-old-1", "user_id": 1, "merchant_id": 2, "merchant_category": "grocery", "amount": 5.0,
         "country": "DE", "device": "ios", "channel": "pos", "event_timestamp": datetime(2030, 1, 1, tzinfo=UTC),
         "model_name": "fraud_detector", "model_version": 1, "probability": 0.2, "decision": "legit",
         "threshold": 0.5, "scorer": "sklearn", "latency_ms": 3.0, "flags": '{"unknown_entity":false}',
         "features": '{"amount":5.0,"txn_count_1h":2.0,"home_country":"DE"}'},
        {"stream_id": f"{OLD_DAY_MS}-1", "features": '{"unparsed_entry":"garbage"}'},
    ]  # fmt: skip
    folder = log_dir / "date=2030-01-01"
    folder.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=_OLD_SCHEMA), folder / f"part-{OLD_DAY_MS}-0_{OLD_DAY_MS}-1.parquet"
    )


def test_files_of_the_first_layout_are_read_and_migrated(client, project, tmp_path):
    log_dir = tmp_path / "log"
    _old_file(log_dir)
    before = read_prediction_log(log_dir)  # not migrated yet: read as api rows
    assert before["source"].tolist() == ["api", "api"] and before["prediction_id"].iloc[0] == "old-1"
    assert (before["feature.amount"].iloc[0], before["feature.txn_count_1h"].iloc[0]) == (5.0, 2.0)
    assert before["feature.home_country"].iloc[0] == "DE"
    assert json.loads(before["flags"].iloc[1]) == {"unparsed_entry": "garbage"}
    assert logged_days(log_dir)["api"] == [date(2030, 1, 1)]

    stream = prediction_stream_key(project)
    client.xadd(stream, {"json": b"{}"}, id=f"{OLD_DAY_MS}-1")  # already in the old file: skipped
    client.xadd(stream, {"json": orjson.dumps({"prediction_id": "new-1"})}, id=f"{OLD_DAY_MS + 1000}-0")
    result = drain_prediction_log(client, stream, log_dir)
    assert (result["migrated"], result["rows"], result["skipped"]) == (1, 1, 1)
    assert not (log_dir / "date=2030-01-01").exists()
    moved = pq.read_table(
        day_dir(log_dir, "api", "2030-01-01") / f"part-{OLD_DAY_MS}-0_{OLD_DAY_MS}-1.parquet"
    )
    assert moved.column("source").to_pylist() == ["api", "api"]  # self-describing now
    after = read_prediction_log(log_dir)
    assert after["prediction_id"].fillna("-").tolist() == ["old-1", "-", "new-1"]
    pd.testing.assert_frame_equal(after.iloc[:2].reset_index(drop=True), before, check_like=False)

    # A migration that died between writing the new file and deleting the old one: read once,
    # and the next drain finishes it.
    _old_file(log_dir)
    assert read_prediction_log(log_dir)["prediction_id"].fillna("-").tolist() == ["old-1", "-", "new-1"]
    assert (
        drain_prediction_log(client, stream, log_dir)["migrated"] == 1
        and not (log_dir / "date=2030-01-01").exists()
    )
    assert len(read_prediction_log(log_dir)) == 3


def test_an_empty_log_reads_as_an_empty_frame_with_the_columns(client, project, tmp_path):
    frame = read_prediction_log(tmp_path / "nothing here")
    assert frame.empty and list(frame.columns) == [*LOG_COLUMNS, "date"]
    assert (
        str(frame["predicted_at"].dtype) == "datetime64[us, UTC]"
        and str(frame["probability"].dtype) == "float64"
    )
    assert str(frame["model_version"].dtype) == "Int64"
    assert list(read_prediction_log(tmp_path, expand_features=False).columns) == [
        *LOG_COLUMNS,
        "date",
        "features",
    ]
    assert logged_days(tmp_path / "nothing here") == {s: [] for s in SOURCES}
    with pytest.raises(ValueError, match="start: 'soon' is not a date"):
        read_prediction_log(tmp_path, start="soon")
    # A drain of a stream that does not exist creates nothing.
    missing = stream_names(project).output
    assert drain_stream_predictions(client, missing, tmp_path)["rows"] == 0 and not client.exists(missing)
