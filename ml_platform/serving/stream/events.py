"""The stream's input events: what an entry's JSON payload must hold, and how a payload becomes
the updater's event dict (`parse_event`), or a `MalformedEvent` naming the field and the value.

What is valid is the transaction contract's decision (`ml_platform.transactions`), the same as
the API's and the validation gate's: the field-by-field path (`_checked_transaction`,
`_checked_label`) is the contract's own check; the one-pass fast path for a well-formed
transaction (`_valid_transaction`, the common case) reads its limits from the contract. Both must
accept exactly the same transactions (tests feed them the same random payloads).

Decoding: the fast path reads the payload with orjson (4x faster than the standard library on
the usual payload); anything it does not accept as a well-formed transaction is read again with
`json.loads` and checked field by field, so the decision and the dead-letter reason are the
standard library's reading of the payload (orjson refuses NaN, a BOM, lone surrogates, and turns
integers beyond 64 bits into floats: those payloads take the standard path).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pandas as pd

from ml_platform import features as fr
from ml_platform import fixed_point
from ml_platform.featurestore.streaming import EVENT_ID
from ml_platform.timestamps import EPOCH, span_us
from ml_platform.transactions import LABEL_EVENT, LABEL_EVENT_OPTIONAL, ContractViolation
from ml_platform.transactions import TRANSACTION as TX

EVENT_FIELD = "event"  # the input entry's field holding the event as JSON
EVENT_TIME = "event_time"  # a parsed transaction's event time as a datetime (the scorer's input)
TRANSACTION = "transaction"
LABEL = "label"
ENVELOPE = ("kind",)  # entry fields that are not fields of the event
TRANSACTION_STRING_FIELDS = ("merchant_category", "country", "device", "channel")

# The fast path's limits, each read from the transaction contract (never restated here).
_TID = TX.field("transaction_id")
_USER, _MERCHANT, _AMOUNT = TX.field("user_id"), TX.field("merchant_id"), TX.field("amount")
_CATEGORY, _COUNTRY = TX.field("merchant_category"), TX.field("country")
_DEVICES = frozenset(TX.field("device").allowed)  # type: ignore[union-attr, arg-type]
_CHANNELS = frozenset(TX.field("channel").allowed)  # type: ignore[union-attr, arg-type]
_CATEGORY_MATCH = re.compile(_CATEGORY.pattern).fullmatch  # type: ignore[union-attr, arg-type]
_COUNTRY_MATCH = re.compile(_COUNTRY.pattern).fullmatch  # type: ignore[union-attr, arg-type]
MAX_ID_LENGTH = _TID.max_length  # type: ignore[union-attr]
_N_FIELDS = len(TX.fields)
# The fast path below names each contract field and checks the vocabularies of device and
# channel only (merchant_category's is soft): a contract that changes that shape must change it.
assert TX.names == (
    "transaction_id", "user_id", "merchant_id", "merchant_category", "amount", "country", "device", "channel",
    fr.EVENT_TS,
), "extend _valid_transaction for the transaction contract's new fields"  # fmt: skip
assert _CATEGORY.allowed_is_soft and _TID.allowed is None and _COUNTRY.allowed is None  # type: ignore[union-attr]


class MalformedEvent(ValueError):
    """An input entry that can never be processed; the message is the dead-letter reason and
    `field` names the event field at fault (None when the payload as a whole is unreadable)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


# --------------------------------------------------------------------------- field checks


def _valid_transaction(obj: dict) -> dict[str, Any] | None:
    """The common case in one pass: a well-formed transaction as an event dict, else None (the
    caller's field-by-field checks then find and name the problem). Hand-tuned for speed from the
    contract's limits; `test_stream_events` and `test_transaction_contract` hold it to the contract."""
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
    n = len(obj)
    if not (
        (n == _N_FIELDS or (n == _N_FIELDS + 1 and "kind" in obj))
        and type(tid) is str
        and _TID.min_length <= len(tid) <= _TID.max_length
        and not tid.isspace()
        and type(uid) is int
        and _USER.ge <= uid <= _USER.le
        and type(mid) is int
        and _MERCHANT.ge <= mid <= _MERCHANT.le
        and (type(amount) is float or type(amount) is int)
        and _AMOUNT.gt < amount < _AMOUNT.lt
        and (_AMOUNT.decimals is None or fixed_point.on_grid(amount, _AMOUNT.decimals))
        and type(category) is str
        and len(category) <= _CATEGORY.max_length
        and _CATEGORY_MATCH(category) is not None
        and type(country) is str
        and _COUNTRY_MATCH(country) is not None
        and type(device) is str
        and device in _DEVICES
        and type(channel) is str
        and channel in _CHANNELS
        and type(stamp) is str
    ):
        return None
    try:
        when = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
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


def _violation(exc: ContractViolation) -> MalformedEvent:
    return MalformedEvent(str(exc), field=exc.field)


def _checked_transaction(obj: Mapping) -> dict[str, Any]:
    """A transaction checked field by field against the contract: the event dict, or
    MalformedEvent naming the first field that is wrong."""
    try:
        checked = TX.check(obj, envelope=ENVELOPE)
    except ContractViolation as exc:
        raise _violation(exc) from None
    when = checked.pop(fr.EVENT_TS)
    event: dict[str, Any] = {"kind": TRANSACTION, EVENT_ID: checked["transaction_id"], **checked}
    event[fr.EVENT_TS] = span_us(when - EPOCH)
    event[EVENT_TIME] = when
    return event


def _checked_label(obj: Mapping) -> dict[str, Any]:
    """A label event (`kind: "label"`) checked against the label contract."""
    optional = {spec.name: spec for spec in LABEL_EVENT_OPTIONAL}
    try:
        checked = LABEL_EVENT.check(obj, envelope=(*ENVELOPE, *optional))
        for name, spec in optional.items():
            if name in obj:
                checked[name] = spec.check(obj[name])
    except ContractViolation as exc:
        raise _violation(exc) from None
    event: dict[str, Any] = {"kind": LABEL, EVENT_ID: checked["transaction_id"], **checked}
    event[fr.LABEL] = float(checked[fr.LABEL])
    event[fr.LABEL_TS] = span_us(checked[fr.LABEL_TS] - EPOCH)
    return event


# --------------------------------------------------------------------------- parsing


def parse_event(payload: bytes | str | None) -> dict[str, Any]:
    """A validated event from an entry's JSON payload, or MalformedEvent naming the problem.

    Transaction (default `kind`): the fields of `ml_platform.transactions.TRANSACTION` (no
    `event_timestamp`: the time the worker reads it). Label: kind="label" and the fields of
    `LABEL_EVENT` (transaction_id, merchant_id, is_fraud, label_timestamp; user_id optional).
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
    raise MalformedEvent(f"field 'kind' must be {TRANSACTION!r} or {LABEL!r}, got {kind!r}", field="kind")


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
