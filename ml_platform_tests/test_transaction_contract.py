"""One transaction contract, three validators: the gate (pandera, on a table), the HTTP API
(pydantic) and the stream worker (its own fast parser) must take the same decision on the same
transaction and, when they refuse it, name the same field.

Hypothesis generates valid transactions and transactions with one field broken (a value of the
wrong type, out of range, too long, blank, off-pattern, not an allowed value, missing, or a field
the contract does not have); each decision is compared with the contract's own, spelled out per
mutation below, not with the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ml_platform.features import CREATED_TS, EVENT_TS, LABEL, LABEL_TS
from ml_platform.serving.api.schemas import Transaction as ApiTransaction
from ml_platform.serving.stream import MalformedEvent, parse_event
from ml_platform.transactions import (
    TRANSACTION,
    ContractViolation,
    IntegerField,
    NumberField,
    TimestampField,
)
from ml_platform.transactions.request_model import pydantic_model
from ml_platform.validation import raw_transactions_schema, validate

GATE_NOW = "2200-01-01T00:00:00+00:00"  # the gate's not-in-future rule is table-only: keep it out
GATE_SCHEMA = raw_transactions_schema()

# --- Strategies -------------------------------------------------------------------------------

_iso = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1)).map(
    lambda d: d.isoformat()
) | st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.isoformat())


def _valid_value(spec) -> st.SearchStrategy:
    if isinstance(spec, IntegerField):
        return st.integers(spec.ge, spec.le)
    if isinstance(spec, NumberField):
        whole = st.integers(math.floor(spec.gt) + 1, math.ceil(spec.lt) - 1)
        if spec.decimals is not None:  # n / 10^decimals: the float nearest a number with that many places
            scale = 10**spec.decimals
            return whole | st.integers(math.floor(spec.gt * scale) + 1, math.ceil(spec.lt * scale) - 1).map(
                lambda n: n / scale
            )
        return st.floats(spec.gt, spec.lt, exclude_min=True, exclude_max=True) | whole
    if isinstance(spec, TimestampField):
        return _iso
    if spec.allowed is not None and not spec.allowed_is_soft:
        return st.sampled_from(spec.allowed)
    if spec.pattern == "[A-Z]{2}":
        return st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2)
    if spec.pattern == "[a-z][a-z0-9_]*":
        return st.sampled_from(spec.allowed or ("grocery",)) | st.from_regex(r"\A[a-z][a-z0-9_]{0,20}\Z")
    return st.text(min_size=spec.min_length, max_size=spec.max_length).filter(lambda t: not t.isspace())


valid_transactions = st.fixed_dictionaries({spec.name: _valid_value(spec) for spec in TRANSACTION.fields})


def _edges(spec) -> list:
    """The values at and just past each declared limit (where two copies of a rule drift apart)."""
    if isinstance(spec, IntegerField):
        return [spec.ge - 1, spec.ge, spec.le, spec.le + 1, 0, -1, 1.0, True, "7", None]
    if isinstance(spec, NumberField):
        below = math.nextafter(spec.lt, 0)
        places = [12.34, 12.345, 0.1 + 0.2, 0.3, 1e-05, 999999.99, 999999.995]  # at and past 2 decimal places
        return [spec.gt, math.nextafter(spec.gt, 1), below, spec.lt, spec.lt + 1, -0.0, 10**20, 1, True, "5", None, *places]
    if isinstance(spec, TimestampField):
        return ["2024-13-01", "2024-01-01T25:00", "2024-01-01", "2024-01-01T00:00:00Z", "", 1704067200, None]
    return [
        "", " ", "\t", "\n", "a" * spec.max_length, "a" * (spec.max_length + 1), "\u00e9" * spec.max_length,
        "US\n", "us", "U S", "ZZ", "Grocery", "grocery\n", "_x", "9lives", "spaceships", *(spec.allowed or ())[:2],
        7, None, ["x"],
    ]


def _bad_value(spec) -> st.SearchStrategy:
    """Values that may or may not break `spec` (the oracle below decides which); half of them at
    a declared limit."""
    junk = st.none() | st.booleans() | st.lists(st.integers(), max_size=2) | st.text(max_size=5)
    if isinstance(spec, IntegerField):
        anything = st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | junk
    elif isinstance(spec, NumberField):
        anything = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**7), 10**7) | junk
    elif isinstance(spec, TimestampField):
        anything = _iso | st.text(max_size=30) | st.integers() | junk
    else:
        anything = st.text(max_size=spec.max_length + 3) | st.integers() | junk
    return st.one_of(st.sampled_from(_edges(spec)), anything)


def _case(event: dict, spec, value) -> tuple[dict, str | None]:
    """`event` with `spec`'s field set to `value`, and the field a validator must name (None: valid)."""
    event = {**event, spec.name: value}
    return event, (None if _oracle_accepts(spec, value) else spec.name)


def _oracle_accepts(spec, value) -> bool:
    """The contract's rule for one value, restated from its declaration (not its code)."""
    if isinstance(spec, IntegerField):
        return type(value) is int and spec.ge <= value <= spec.le
    if isinstance(spec, NumberField):
        if type(value) not in (int, float) or not spec.gt < value < spec.lt:
            return False
        # at most `decimals` places: the shortest decimal that reads back as this float has no more
        return spec.decimals is None or Decimal(repr(float(value))).normalize().as_tuple().exponent >= -spec.decimals
    if isinstance(spec, TimestampField):
        if not isinstance(value, str):
            return False
        try:
            datetime.fromisoformat(value)
        except ValueError:
            return False
        return True
    import re

    if type(value) is not str or not spec.min_length <= len(value) <= spec.max_length or value.isspace():
        return False
    if spec.pattern and not re.fullmatch(spec.pattern, value):
        return False
    return spec.allowed is None or spec.allowed_is_soft or value in spec.allowed


# --- The three validators, each as a decision: None (accepted) or the field it names -----------


def gate_decision(event: dict) -> str | None:
    row = dict(event)
    when = row.setdefault(EVENT_TS, datetime.now(UTC).isoformat())
    if isinstance(when, str):
        try:
            parsed = datetime.fromisoformat(when)
        except ValueError:
            parsed = None
        if parsed is not None:  # a table holds typed timestamps; text that is no time stays text
            row[EVENT_TS] = pd.Timestamp(parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC))
    frame = pd.DataFrame({k: pd.Series([v], dtype=object) for k, v in row.items()})
    if isinstance(row[EVENT_TS], pd.Timestamp):
        frame[EVENT_TS] = frame[EVENT_TS].astype("datetime64[us, UTC]")
    for column in ("user_id", "merchant_id", "amount"):  # a table column of JSON numbers is numeric
        if column in frame and type(row[column]) in (int, float) and abs(row[column]) < 2**63:
            frame[column] = pd.to_numeric(frame[column])
    frame[CREATED_TS] = frame[EVENT_TS] if isinstance(row[EVENT_TS], pd.Timestamp) else pd.NaT
    frame[CREATED_TS] = pd.to_datetime(frame[CREATED_TS], utc=True).astype("datetime64[us, UTC]")
    frame[LABEL] = pd.array([None], dtype="Int64")
    frame[LABEL_TS] = pd.Series([pd.NaT], dtype="datetime64[us, UTC]")
    report = validate(frame, GATE_SCHEMA, now=GATE_NOW)
    own = [f["column"] for f in report.failures if f["column"] in TRANSACTION.names]
    return own[0] if own else None


def api_decision(event: dict, model=ApiTransaction) -> str | None:
    try:
        model.model_validate(json.loads(json.dumps(event)))
    except ValidationError as exc:
        return str(exc.errors()[0]["loc"][-1])
    return None


def stream_decision(event: dict) -> str | None:
    try:
        parse_event(json.dumps(event).encode())
    except MalformedEvent as exc:
        return exc.field
    return None


# --- The property ------------------------------------------------------------------------------

PROPERTY = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = {
    "transaction_id": "t-1", "user_id": 3, "merchant_id": 4, "merchant_category": "grocery", "amount": 12.5,
    "country": "FR", "device": "ios", "channel": "pos", EVENT_TS: "2024-03-01T10:00:00+00:00",
}  # fmt: skip


def _assert_same_decision(event: dict, expected: str | None, *, with_gate: bool = True) -> None:
    api, stream = api_decision(event), stream_decision(event)
    assert api == expected, f"API named {api!r}, the contract says {expected!r}: {event}"
    assert stream == expected, f"stream named {stream!r}, the contract says {expected!r}: {event}"
    if with_gate:
        gate = gate_decision(event)
        assert gate == expected, f"gate named {gate!r}, the contract says {expected!r}: {event}"


@PROPERTY
@given(valid_transactions)
def test_valid_transactions_pass_all_three(event):
    _assert_same_decision(event, None)


@pytest.mark.parametrize("name", TRANSACTION.names)
def test_values_at_each_limit_get_the_same_decision_everywhere(name):
    spec = TRANSACTION.field(name)
    decisions = []
    for value in _edges(spec):
        event, expected = _case(VALID, spec, value)
        _assert_same_decision(event, expected)
        decisions.append(expected)
    assert None in decisions and name in decisions  # each field's edges hold both outcomes


@pytest.mark.parametrize("name", TRANSACTION.names)
@PROPERTY
@given(data=st.data())
def test_random_values_get_the_same_decision_everywhere(name, data):
    spec = TRANSACTION.field(name)
    base = data.draw(valid_transactions, label="valid transaction")
    event, expected = _case(base, spec, data.draw(_bad_value(spec), label=name))
    _assert_same_decision(event, expected)


@pytest.mark.parametrize("name", TRANSACTION.names)
def test_a_missing_field_is_named_everywhere(name):
    spec = TRANSACTION.field(name)
    event = {k: v for k, v in VALID.items() if k != name}
    defaulted = isinstance(spec, TimestampField) and spec.default_now  # taken as "now"
    _assert_same_decision(event, None if defaulted else name)


@pytest.mark.parametrize("extra", ["amout", "is_fraud", "created_timestamp", "kind_of"])
def test_a_field_the_contract_does_not_have_is_refused_in_json(extra):
    # A table may carry columns beyond the contract (the hive partition column): gate not asked.
    _assert_same_decision({**VALID, extra: 1}, extra, with_gate=False)


# --- Changing a limit in one place changes all three --------------------------------------------


def test_a_limit_changed_in_the_contract_moves_every_validator():
    tighter = TRANSACTION.with_field(dataclasses.replace(TRANSACTION.field("amount"), lt=100.0))
    event = {"transaction_id": "t1", "user_id": 1, "merchant_id": 2, "merchant_category": "grocery",
             "amount": 150.0, "country": "US", "device": "ios", "channel": "pos",
             EVENT_TS: "2024-01-01T00:00:00+00:00"}
    assert api_decision(event) is None and api_decision(event, pydantic_model(tighter, "T", "")) == "amount"
    with pytest.raises(ContractViolation) as exc:
        tighter.check(event)
    assert exc.value.field == "amount" and "100" in str(exc.value)
    frame = pd.DataFrame([{**event, EVENT_TS: pd.Timestamp("2024-01-01", tz="UTC")}])
    frame[CREATED_TS] = frame[EVENT_TS]
    frame[LABEL], frame[LABEL_TS] = pd.array([None], dtype="Int64"), pd.Series([pd.NaT], dtype="datetime64[us, UTC]")
    assert validate(frame, raw_transactions_schema(), now=GATE_NOW).ok
    failed = validate(frame, raw_transactions_schema(tighter), now=GATE_NOW).failures
    assert [(f["column"], f["check"]) for f in failed] == [("amount", "amount < 100")]


def test_non_json_numbers_are_refused_by_the_contract():
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ContractViolation) as exc:
            TRANSACTION.field("amount").check(bad)
        assert exc.value.field == "amount"


def test_missing_event_time_is_the_time_of_receipt_in_both_serving_paths():
    event = {"transaction_id": "t1", "user_id": 1, "merchant_id": 2, "merchant_category": "grocery",
             "amount": 15.0, "country": "US", "device": "ios", "channel": "pos"}
    before = datetime.now(UTC)
    api_time = ApiTransaction.model_validate(event).event_timestamp
    stream_time = parse_event(json.dumps(event).encode())["event_time"]
    after = datetime.now(UTC) + timedelta(seconds=1)
    assert before <= api_time <= after and before <= stream_time <= after
