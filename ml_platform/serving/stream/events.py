"""The stream's input events: what an entry's JSON payload must hold, and how a payload becomes
the updater's event dict (`parse_event`), or a `MalformedEvent` naming the field and the value.

Every field check of the stream is in this module: the one-pass fast path for a well-formed
transaction (`_valid_transaction`, the common case) and the field-by-field checks that name the
problem when it fails (`_checked_transaction`, `_checked_label`, `_require_*`). The two must
accept exactly the same transactions (a test feeds both the same random payloads).

Decoding: the fast path reads the payload with orjson (4x faster than the standard library on
the usual payload); anything it does not accept as a well-formed transaction is read again with
`json.loads` and checked field by field, so the decision and the dead-letter reason are the
standard library's reading of the payload (orjson refuses NaN, a BOM, lone surrogates, and turns
integers beyond 64 bits into floats: those payloads take the standard path).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pandas as pd

from ml_platform import features as fr
from ml_platform.featurestore.streaming import EVENT_ID
from ml_platform.timestamps import EPOCH, from_us, span_us, to_us

EVENT_FIELD = "event"  # the input entry's field holding the event as JSON
EVENT_TIME = "event_time"  # a parsed transaction's event time as a datetime (the scorer's input)
TRANSACTION = "transaction"
LABEL = "label"
TRANSACTION_STRING_FIELDS = ("merchant_category", "country", "device", "channel")
MAX_ID_LENGTH = 200
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class MalformedEvent(ValueError):
    """An input entry that can never be processed; the message is the dead-letter reason."""


# --------------------------------------------------------------------------- field checks


def _require_int(obj: Mapping, name: str) -> int:
    if name not in obj:
        raise MalformedEvent(f"missing field {name!r}")
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedEvent(f"field {name!r} must be an integer, got {value!r}")
    if not _I64_MIN <= value <= _I64_MAX:
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


def _require_amount(obj: Mapping) -> float:
    if "amount" not in obj:
        raise MalformedEvent("missing field 'amount'")
    amount = obj["amount"]
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not _finite(amount) or amount <= 0:
        raise MalformedEvent(f"field 'amount' must be a positive number, got {amount!r}")
    return float(amount)


def _finite(number: float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an integer beyond the float range (json.loads reads any length)
        return False


def _require_timestamp(obj: Mapping, name: str) -> int:
    if name not in obj:
        raise MalformedEvent(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, str):
        raise MalformedEvent(
            f"field {name!r} must be an ISO-8601 string such as '2024-01-31T12:00:00+00:00', got {value!r}"
        )
    try:
        return to_us(datetime.fromisoformat(value))  # type: ignore[return-value]
    except (ValueError, OverflowError):
        raise MalformedEvent(f"field {name!r} is not an ISO-8601 timestamp: {value!r}") from None


def _valid_transaction(obj: dict) -> dict[str, Any] | None:
    """The common case in one pass: a well-formed transaction as an event dict, else None (the
    caller's field-by-field checks then find and name the problem). Same rules as
    `_checked_transaction`."""
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
        fr.EVENT_TS: span_us(when - EPOCH),
        EVENT_TIME: when,
    }


def _checked_transaction(obj: Mapping) -> dict[str, Any]:
    """A transaction checked field by field: the event dict, or MalformedEvent naming the first
    field that is wrong."""
    event: dict[str, Any] = {"kind": TRANSACTION}
    event[EVENT_ID] = event["transaction_id"] = _require_str(obj, "transaction_id")
    event["user_id"] = _require_int(obj, "user_id")
    event["merchant_id"] = _require_int(obj, "merchant_id")
    event["amount"] = _require_amount(obj)
    for name in TRANSACTION_STRING_FIELDS:
        event[name] = _require_str(obj, name)
    event[fr.EVENT_TS] = _require_timestamp(obj, fr.EVENT_TS)
    event[EVENT_TIME] = from_us(event[fr.EVENT_TS])
    return event


def _checked_label(obj: Mapping) -> dict[str, Any]:
    event: dict[str, Any] = {"kind": LABEL}
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


# --------------------------------------------------------------------------- parsing


def parse_event(payload: bytes | str | None) -> dict[str, Any]:
    """A validated event from an entry's JSON payload, or MalformedEvent naming the problem.

    Transaction (default `kind`): transaction_id, user_id, merchant_id (integers), amount (> 0),
    merchant_category, country, device, channel (strings), event_timestamp (ISO-8601; no offset
    means UTC). Label: kind="label", transaction_id, merchant_id, is_fraud (0/1), label_timestamp.
    Returned dicts carry `event_id` and times as int µs (the updater's event shape)."""
    if payload is None:
        raise MalformedEvent(f"entry has no {EVENT_FIELD!r} field holding the event JSON")
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass  # read again by the standard library below, which names the problem (or accepts it)
    else:
        if type(obj) is dict and obj.get("kind", TRANSACTION) == TRANSACTION:
            fast = _valid_transaction(obj)
            if fast is not None:
                return fast
    # A label, or something wrong: the standard library's reading, checked field by field.
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedEvent(f"payload must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind", TRANSACTION)
    if kind == TRANSACTION:
        return _checked_transaction(obj)
    if kind == LABEL:
        return _checked_label(obj)
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
        out.append(orjson.dumps(obj).decode())
    return out
