"""The stream's input validation (`ml_platform.serving.stream.events`) without Redis: the one-pass
fast path (orjson + `_valid_transaction`) decides exactly as the field-by-field checks on the
standard library's reading of the payload, values and error messages included."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_platform import features as fr
from ml_platform.serving.stream.events import (
    EVENT_TIME,
    MAX_ID_LENGTH,
    MalformedEvent,
    _checked_label,
    _checked_transaction,
    event_payloads,
    parse_event,
)


def _reference(payload):
    """The slow path alone: `json.loads`, then the field-by-field checks."""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"payload is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedEvent(f"payload must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind", "transaction")
    if kind == "transaction":
        return _checked_transaction(obj)
    if kind == "label":
        return _checked_label(obj)
    raise MalformedEvent(f"field 'kind' must be 'transaction' or 'label', got {kind!r}")


def _outcome(parse, payload):
    try:
        return "ok", parse(payload)
    except MalformedEvent as exc:
        return "malformed", str(exc)


def _txn(**changes):
    base = {
        "transaction_id": "t-1",
        "user_id": 7,
        "merchant_id": 3,
        "amount": 12.5,
        "merchant_category": "grocery",
        "country": "DE",
        "device": "ios",
        "channel": "pos",
        fr.EVENT_TS: "2030-01-01T12:00:00.250000+00:00",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()
_I64 = 2**63

ids = st.one_of(
    st.text(max_size=MAX_ID_LENGTH + 5),
    st.sampled_from(["", " ", "\t", "x" * MAX_ID_LENGTH, "x" * (MAX_ID_LENGTH + 1), "é\u2028\x00"]),
    st.integers(),
    st.none(),
)
ints = st.one_of(
    st.integers(min_value=-_I64 - 2, max_value=_I64 + 2),
    st.sampled_from([0, 1, -1, -_I64, _I64 - 1, _I64, -_I64 - 1, 10**30, True, False]),
    st.floats(allow_nan=True),
    st.text(max_size=3),
)
amounts = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**25), max_value=10**25),
    st.sampled_from([0, 0.0, -0.0, 5e-324, 1e308, 10**400, True, "12.5", None]),
)
strings = st.one_of(
    st.text(max_size=MAX_ID_LENGTH + 3), st.sampled_from(["", "  ", "x" * (MAX_ID_LENGTH + 1)]), st.integers()
)
zones = st.sampled_from([None, UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))])
stamps = st.one_of(
    st.builds(lambda d, z: d.replace(tzinfo=z).isoformat(), st.datetimes(), zones),
    st.sampled_from(["yesterday noon", "2030-13-01T00:00:00", "", "2030-01-01", "2030-01-01T00:00:00Z"]),
    st.integers(),
)


FIELDS = {
    "transaction_id": ids,
    "user_id": ints,
    "merchant_id": ints,
    "amount": amounts,
    "merchant_category": strings,
    "country": strings,
    "device": strings,
    "channel": strings,
    fr.EVENT_TS: stamps,
}


@st.composite
def transactions(draw):
    """A well-formed transaction with none, one or two fields changed (or dropped): near the
    boundary, where a fast path and the checks could disagree."""
    obj = _txn()
    for name in draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=2, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            del obj[name]
        else:
            obj[name] = draw(FIELDS[name])
    if draw(st.integers(0, 19)) == 0:
        obj["kind"] = draw(st.sampled_from(["transaction", "label", "refund", None]))
    return obj


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transactions(), st.booleans())
def test_the_fast_path_decides_exactly_as_the_field_by_field_checks(obj, ascii_only):
    payload = json.dumps(obj, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    fast, reference = _outcome(parse_event, payload), _outcome(_reference, payload)
    if fr.EVENT_TS not in obj and fast[0] == "ok":  # no event time: each read takes "now"
        for outcome in (fast, reference):
            assert abs(outcome[1].pop(EVENT_TIME) - datetime.now(UTC)) < timedelta(seconds=5)
            outcome[1].pop(fr.EVENT_TS)
    assert fast == reference


def test_well_formed_transactions_take_the_fast_path_with_the_same_values():
    """A payload of every field right is parsed in one pass; its values equal the checks' values
    (times as int µs, an offset-less time taken as UTC)."""
    cases = [
        _txn(),
        _txn(amount=3),
        _txn(**{fr.EVENT_TS: "2030-01-01T14:00:00.250000+02:00"}),
        _txn(**{fr.EVENT_TS: "2030-01-01T12:00:00.250000"}),
        _txn(user_id=1, merchant_id=_I64 - 1, transaction_id="é" * MAX_ID_LENGTH),
    ]
    for obj in cases:
        payload = json.dumps(obj).encode()
        got = parse_event(payload)
        assert got == _reference(payload)
        assert got[fr.EVENT_TS] == 1_893_499_200_250_000  # 2030-01-01T12:00:00.25Z in µs
        assert got[EVENT_TIME] == datetime(2030, 1, 1, 12, 0, 0, 250_000, tzinfo=UTC)
        assert type(got["amount"]) is float and got["kind"] == "transaction"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        # What orjson refuses or reads differently is read by the standard library, as before.
        (json.dumps(_txn(amount=float("nan"))), "field 'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got nan"),
        (json.dumps(_txn(amount=float("inf"))), "field 'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got inf"),
        (json.dumps(_txn(user_id=10**30)), f"field 'user_id' must be an integer in [1, {_I64 - 1}], got {10**30}"),
        (
            json.dumps(_txn(merchant_id=-_I64 - 1)),
            f"field 'merchant_id' must be an integer in [1, {_I64 - 1}], got {-_I64 - 1}",
        ),
        (
            json.dumps(_txn(transaction_id="x" * (MAX_ID_LENGTH + 1))),
            "field 'transaction_id' must be a string of 1 to 128 characters, not blank, got 'xxx",
        ),
        (json.dumps(_txn(country=" ")), "field 'country' must be a string of 1 to 2 characters, not blank"),
        (json.dumps(_txn(amount=12.345)), "field 'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got 12.345"),
        (json.dumps(_txn(amount=True)), "field 'amount' must be a number with 0 < value < 1e+06 and at most 2 decimal places, got True"),
        (json.dumps(_txn(amount=_DROP)), "field 'amount' is missing"),
        (json.dumps(_txn(device="fax")), "field 'device' must be a string of 1 to 32 characters, not blank, one of"),
        (json.dumps(_txn(refund=True)), "field 'refund' is not a field of a transaction, got True"),
        (
            json.dumps(_txn(**{fr.EVENT_TS: "yesterday noon"})),
            "field 'event_timestamp' must be an ISO-8601 timestamp such as '2024-01-31T12:00:00+00:00', got 'yesterday noon'",
        ),
        (json.dumps(_txn(kind="refund")), "field 'kind' must be 'transaction' or 'label', got 'refund'"),
        ("[1]", "payload must be a JSON object, got list"),
        ("{not json", "payload is not valid JSON: Expecting property name"),
    ],
)
def test_a_malformed_payload_is_named_by_field_and_value(payload, reason):
    with pytest.raises(MalformedEvent) as caught:
        parse_event(payload.encode())
    assert reason in str(caught.value)


def test_payloads_orjson_refuses_but_json_reads_are_still_accepted():
    """A UTF-16 or BOM-prefixed payload, a lone surrogate in an id: the standard library reads
    them (as the worker always did), so they are valid events, not dead letters."""
    text = json.dumps(_txn())
    for payload in (text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode(), text):
        assert parse_event(payload)["transaction_id"] == "t-1"
    assert parse_event(json.dumps(_txn(transaction_id="a\ud800")).encode())["transaction_id"] == "a\ud800"
    label = {
        "kind": "label",
        "transaction_id": "t-1",
        "merchant_id": 3,
        "is_fraud": 1,
        fr.LABEL_TS: "2030-01-02",
    }
    assert parse_event(json.dumps(label))[fr.LABEL] == 1.0


def test_decoding_errors_are_the_standard_librarys():
    """Bytes that are no JSON object: the reason is json.loads' own message."""
    rng = random.Random(0)
    payloads = [b"{", b"{\x00", b'{"a":"\xff"}', b"", b'{"a":1} x', b"[1]"]
    payloads += [b"{" + bytes(rng.randrange(256) for _ in range(rng.randrange(6))) for _ in range(2000)]
    for payload in payloads:
        assert _outcome(parse_event, payload) == _outcome(_reference, payload), payload


def test_event_payloads_round_trip_through_parse_event():
    frame = pd.DataFrame(
        {
            "transaction_id": ["a", "bé"],
            "user_id": [1, 2**62],
            "merchant_id": [5, 6],
            "amount": [0.1, 999_999.99],
            "merchant_category": ["grocery", "travel"],
            "country": ["DE", "FR"],
            "device": ["ios", "desktop"],
            "channel": ["pos", "online"],
            fr.EVENT_TS: pd.to_datetime(
                ["2030-01-01T00:00:00", "2030-01-01T00:00:00.000001"], utc=True, format="ISO8601"
            ),
        }
    )
    events = [parse_event(p) for p in event_payloads(frame)]
    assert [e["transaction_id"] for e in events] == ["a", "bé"]
    assert [e["user_id"] for e in events] == [1, 2**62]
    assert [e["amount"] for e in events] == [0.1, 999_999.99]
    assert [e[fr.EVENT_TS] for e in events] == [1_893_456_000_000_000, 1_893_456_000_000_001]
    with pytest.raises(ValueError, match="lacks columns \\['amount'\\]"):
        event_payloads(frame.drop(columns="amount"))
