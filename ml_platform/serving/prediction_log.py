"""The prediction log: one dataset of every prediction the platform makes (HTTP API, stream
worker, batch scoring), read by monitoring and label joining. This module defines it once: the
layout, the schema, each source's rows (batch scoring's here, the drained streams' in
`prediction_log_drain`), the atomic file writes; the API's entry and writer
(`prediction_log_writer`) are re-exported.

Layout: `<log dir>/source=<api|stream|batch>/date=YYYY-MM-DD/<file>.parquet`
(`settings.predictions_log_dir` = `data/predictions_log`). Every file holds `LOG_SCHEMA`'s columns,
`source` included (a file names its own source), then the model's inputs as typed columns, one
per input column: `feature.<column>` (float64 for numeric inputs, string for categorical ones,
null for a missing value). Typed columns, not a JSON text column: batch scoring writes days of
millions of rows (a JSON object of 32 inputs is ~1.5 KB a row: DuckDB's to_json took 5 µs a row
to build it, and monitoring would parse it back), while typed columns are built column-wise and
read by DuckDB or pyarrow as they are. Files of different
model versions may hold different inputs: readers union them by name (`prediction_log_reader`).

Who writes what:
- api: the HTTP API hands a JSON entry per prediction (`prediction_entry`) to a
  `PredictionLogWriter`, which XADDs it to `<project>:predictions` off the request path;
  `prediction_log_drain.drain_prediction_log` moves entries to `source=api/` and trims the stream.
- stream: the stream worker's output stream (`<project>:stream:predictions`, the product its
  consumers read) is copied to `source=stream/` by `drain_stream_predictions`, which reads it
  with a consumer group of its own and never trims it.
- batch: `batch.score_partition` writes each scored day as one file (`BATCH_FILE`), replaced
  atomically when the day is scored again.

`date=` is the UTC day an entry was logged (api, stream: the time of its Redis stream id) or the
scored day (batch: the transactions' day). Every row carries `event_timestamp`, so a reader
selects by the transaction's day with it (a replayed or late event is logged on a later day).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ml_platform.serving.prediction_log_writer import (  # the API's side, re-exported
    DEFAULT_MAXLEN,
    ENTRY_FIELD,
    PredictionLogWriter,
    prediction_entry,
    prediction_stream_key,
)
from ml_platform.sources.raw_events import TRANSACTIONS_ARROW_SCHEMA, parse_date

SOURCES = ("api", "stream", "batch")  # the paths that predict; each has its own folder of the log
SOURCE_COLUMN = "source"
ROLE_COLUMN = "role"
LIVE, SHADOW = "live", "shadow"  # the roles of a prediction (null in files written before roles: live)
FEATURE_PREFIX = "feature."  # a model input's column in the log: "feature.amount", "feature.txn_count_1h"
BATCH_FILE = "predictions.parquet"  # batch scoring's one file per day
# assemble_features + the scikit-learn Pipeline: how batch scoring (and a bare LoadedModel) scores
REFERENCE_SCORER = "reference+sklearn"
DECISIONS = ("fraud", "legit")  # the decision's encoding everywhere (a boolean decision maps to it)

REQUEST_FIELDS = ("transaction_id", "user_id", "merchant_id", "merchant_category", "amount", "country",
                  "device", "channel", "event_timestamp")  # fmt: skip
# One prediction, as a row of the log (its model inputs follow as FEATURE_PREFIX columns).
LOG_SCHEMA = pa.schema(
    [
        (SOURCE_COLUMN, pa.string()),  # one of SOURCES
        ("prediction_id", pa.string()),  # api: a UUID; stream: "stream-<transaction id>"; batch: "batch-<id>"
        ("stream_id", pa.string()),  # the Redis stream entry id (api, stream); null for batch
        ("predicted_at", pa.timestamp("us", tz="UTC")),
        # the transaction as requested, typed as in the raw events' contract
        *[(f.name, f.type) for f in TRANSACTIONS_ARROW_SCHEMA if f.name in REQUEST_FIELDS],
        ("model_name", pa.string()),
        ("model_version", pa.int64()),
        ("probability", pa.float64()),  # the score
        ("decision", pa.string()),  # "fraud" / "legit" (null: not scored)
        ("threshold", pa.float64()),
        ("scorer", pa.string()),  # how the model was run ("compiled+treelite", "reference+sklearn", ...)
        ("latency_ms", pa.float64()),  # see docs/serving.md "The prediction log" (per source)
        ("flags", pa.string()),  # JSON object: api: unknown_entity ...; stream: consumer, input_id
        # experiments (`ml_platform.experiments`); null in a prediction made outside one
        # ROLE_COLUMN: "live" (answered the caller) or "shadow" (scored beside it); null = live
        (ROLE_COLUMN, pa.string()),
        ("experiment", pa.string()),  # the experiment that routed the prediction
        ("arm", pa.string()),  # the arm (model version) it chose ...
        ("selection_probability", pa.float64()),  # ... with this probability, at decision time
    ]
)
LOG_COLUMNS = tuple(LOG_SCHEMA.names)
_NULL_TYPE = pa.null()
STALE_TEMP_S = 86400.0

__all__ = [
    "BATCH_FILE",
    "DECISIONS",
    "DEFAULT_MAXLEN",
    "ENTRY_FIELD",
    "FEATURE_PREFIX",
    "LIVE",
    "LOG_COLUMNS",
    "LOG_SCHEMA",
    "REFERENCE_SCORER",
    "REQUEST_FIELDS",
    "ROLE_COLUMN",
    "SHADOW",
    "SOURCES",
    "SOURCE_COLUMN",
    "DayFileWriter",
    "PredictionLogWriter",
    "batch_log_rows",
    "batch_log_schema",
    "check_source",
    "day_dir",
    "feature_array",
    "feature_column",
    "legacy_table",
    "log_table",
    "prediction_entry",
    "prediction_stream_key",
    "source_dir",
]


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return source


def source_dir(log_dir: str | os.PathLike, source: str) -> Path:
    """`<log dir>/source=<source>`."""
    return Path(log_dir) / f"source={check_source(source)}"


def day_dir(log_dir: str | os.PathLike, source: str, day: date | str) -> Path:
    """`<log dir>/source=<source>/date=YYYY-MM-DD`."""
    return source_dir(log_dir, source) / f"date={parse_date(day, 'day of the prediction log').isoformat()}"


def feature_column(name: str) -> str:
    return FEATURE_PREFIX + name


# --------------------------------------------------------------------------- tables


def feature_array(values: Any) -> pa.Array:
    """One model input as a log column: numbers as float64, strings as string, NaN/None as null
    (a column of nulls only stays of null type, which readers promote to the other files' type)."""
    try:
        array = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed kinds (numbers and text): keep them as text
        array = pa.array([None if v is None else str(v) for v in values], type=pa.string())
    kind = array.type
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_floating(kind):
        return array.cast(pa.float64())
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or kind == _NULL_TYPE:
        return array.cast(pa.string()) if kind != _NULL_TYPE else array
    return pa.array([None if v is None else str(v) for v in array.to_pylist()], type=pa.string())


def log_table(columns: Mapping[str, Any], features: Mapping[str, Any], n: int) -> pa.Table:
    """A log table of `n` rows: LOG_SCHEMA's columns from `columns` (arrays, lists or one value
    for every row; an absent column is null), then one FEATURE_PREFIX column per `features`
    entry (values as `feature_array` takes them, or a ready pa.Array), in their order."""
    unknown = [name for name in columns if name not in LOG_COLUMNS]
    if unknown:
        raise ValueError(f"not prediction log columns: {unknown}; the log has {list(LOG_COLUMNS)}")
    arrays: list[pa.Array] = []
    for field in LOG_SCHEMA:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
        elif isinstance(value, (pa.Array, pa.ChunkedArray)):
            arrays.append(value.cast(field.type))
        elif isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "__array__"):
            arrays.append(pa.array(value, type=field.type, from_pandas=True))
        else:
            arrays.append(pa.repeat(pa.scalar(value, field.type), n))
    names = list(LOG_COLUMNS)
    for name, values in features.items():
        arrays.append(values if isinstance(values, pa.Array) else feature_array(values))
        names.append(feature_column(name))
    bad = [(name, len(a)) for name, a in zip(names, arrays) if len(a) != n]
    if bad:
        raise ValueError(f"prediction log columns of the wrong length (expected {n} rows): {bad}")
    return pa.Table.from_arrays(arrays, names=names)


def legacy_table(table: pa.Table, source: str = "api") -> pa.Table:
    """A file of the first layout (`<log dir>/date=D/`, no `source`, the model inputs as one JSON
    text column `features`) in the current schema."""
    rows = table.to_pylist()
    features = []
    for row in rows:
        text = row.pop("features", None)
        inputs = orjson.loads(text) if text else {}
        if isinstance(inputs, dict) and set(inputs) == {"unparsed_entry"}:  # the old drain's unreadable entry
            row["flags"] = orjson.dumps(inputs).decode()
            inputs = {}
        features.append(inputs if isinstance(inputs, dict) else {"features": text})
    names = list(dict.fromkeys(name for inputs in features for name in inputs))
    columns = {name: [row.get(name) for row in rows] for name in LOG_COLUMNS if name in table.column_names}
    values = {name: [inputs.get(name) for inputs in features] for name in names}
    return log_table({**columns, SOURCE_COLUMN: source}, values, len(rows))


# The day file's columns with min/max statistics: the ones a reader filters on.
STATISTICS_COLUMNS = ("predicted_at", "event_timestamp", "user_id", "merchant_id", "model_version")


class DayFileWriter:
    """One day's file written chunk by chunk, replaced as a whole: chunks are built and written
    to a temp file next to `path` by a background thread, while the caller goes on with its next
    chunk (pyarrow's conversions and Parquet encoding release the GIL, and so does the model's
    scoring in the caller; one chunk in flight bounds the memory); `commit` renames the temp file
    over `path` (the previous file of the day is replaced at once), `discard` deletes it.

    Only the text columns that repeat (categories, countries, ...) are dictionary-encoded: a
    float input or an id has too many distinct values for a dictionary to pay (pyarrow would
    build one per column and row group, then fall back)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path = Path(path)
        self.schema = schema
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        self._writer: pq.ParquetWriter | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="day-file")
        self._pending: Future | None = None
        self._done = False
        cutoff = time.time() - STALE_TEMP_S  # temp files a killed process left (a live run is far shorter)
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                if stale.stat().st_mtime < cutoff:
                    stale.unlink()

    def write_built(self, build: Callable[..., pa.Table], *args: Any) -> None:
        """Append the table `build(*args)` returns, built in the background thread too (`args` must
        not change meanwhile). Waits for the previous chunk first; its error is raised here."""
        if self._done:
            raise RuntimeError(f"{self.path}: write after commit/discard")
        self._wait()
        self._pending = self._pool.submit(self._build_and_write, build, args)

    def _build_and_write(self, build: Callable[..., pa.Table], args: tuple) -> None:
        table = build(*args)
        if not table.schema.equals(self.schema):
            raise ValueError(f"{self.path}: chunk schema {table.schema} is not the file's {self.schema}")
        self._write(table)

    def _write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._tmp.parent.mkdir(parents=True, exist_ok=True)
            unique = ("prediction_id", "transaction_id", "stream_id")  # one value a row: no dictionary
            strings = [f.name for f in self.schema if pa.types.is_string(f.type) and f.name not in unique]
            # min/max statistics only where a reader filters (times, ids, versions): for the text and
            # feature columns they cost ~15% of the encoding and serve no query
            stats = [f.name for f in self.schema if f.name in STATISTICS_COLUMNS]
            self._writer = pq.ParquetWriter(
                self._tmp, self.schema, compression="zstd", use_dictionary=strings, write_statistics=stats
            )
        self._writer.write_table(table)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def commit(self) -> Path:
        """Finish the file and put it in place (an empty day gets a file with no rows)."""
        try:
            self._wait()
            if self._writer is None:
                self._write(self.schema.empty_table())
            self._writer.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self._done = True
        self._pool.shutdown()
        return self.path

    def discard(self) -> None:
        self._done = True
        with contextlib.suppress(Exception):
            self._wait()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
        self._pool.shutdown()
        self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- batch scoring's rows


def batch_log_schema(contract) -> pa.Schema:
    """The day's log file: LOG_SCHEMA, then the contract's inputs (numeric float64, categorical string)."""
    kinds = {
        c: pa.string() if c in contract.categorical_features else pa.float64() for c in contract.input_columns
    }
    return pa.schema([*LOG_SCHEMA, *(pa.field(feature_column(c), t) for c, t in kinds.items())])


def batch_log_rows(
    loaded_model,
    predictions: pa.Table,
    events: pd.DataFrame,
    frame: pd.DataFrame,
    scored_at: datetime,
    latency_ms: float,
) -> pa.Table:
    """A chunk scored by `batch.score_partition` as log rows: `predictions` (its rows of the
    predictions table), the request fields of `events`, the decision as DECISIONS' words, the
    model inputs (`contract.model_input` of `frame`, what the model read) as typed columns,
    `latency_ms` the chunk's scoring time per row; all built column-wise.

    The Spark path logs its batches with it (`spark_batch`: scikit-learn scores, as here); the
    DuckDB path uses `batch_columns.log_rows`, and the benchmark's baseline (serving/batch.py of
    682df2b, run by bench/batch_scoring.py) calls this one too."""
    contract = loaded_model.contract
    ids = predictions.column("transaction_id")
    decision = pc.if_else(predictions.column("decision"), DECISIONS[0], DECISIONS[1])
    request = {
        c: events[c].to_numpy() for c in REQUEST_FIELDS if c in events.columns and c != "event_timestamp"
    }
    columns = {
        SOURCE_COLUMN: "batch",
        "prediction_id": pc.binary_join_element_wise("batch-", ids, ""),
        "predicted_at": scored_at,
        **request,
        "transaction_id": ids,
        "event_timestamp": predictions.column("event_timestamp"),
        "model_name": contract.model_name,
        "model_version": int(loaded_model.version),
        "probability": predictions.column("score"),
        "decision": decision,
        "threshold": float(contract.decision_threshold),
        "scorer": REFERENCE_SCORER,
        "latency_ms": round(latency_ms, 6),
    }
    inputs = contract.model_input(frame)
    categorical = set(contract.categorical_features)
    features = {
        c: pa.array(
            inputs[c].to_numpy(), type=pa.string() if c in categorical else pa.float64(), from_pandas=True
        )
        for c in contract.input_columns
    }
    return log_table(columns, features, len(events))
