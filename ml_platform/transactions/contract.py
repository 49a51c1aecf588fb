"""The transaction contract: every field of a card transaction, declared once.

The validation gate's pandera schema (`ml_platform.validation`), the HTTP API's pydantic model
(`ml_platform.transactions.request_model`) and the stream worker's event parser
(`ml_platform.serving.stream.events`) are all derived from `TRANSACTION`, so a limit changed here
changes what all three accept. `ml_platform_tests/test_transaction_contract.py` feeds the same
random valid and invalid transactions to all three and requires the same decision, naming the
same field.

What is per event (here) and what is per table (the gate only):
- per event: type, range, length, pattern, allowed values of each field, and which fields must
  be present; unknown fields are refused in JSON (a typo must not be silently ignored);
- per table: unique `transaction_id`, `created_timestamp >= event_timestamp`, label consistency
  and "not in the future" need the whole table or a clock of record, so only the gate checks them.
  A table may also carry columns beyond the contract (the hive partition column, say).

`merchant_category` is an open vocabulary: a category outside KNOWN_MERCHANT_CATEGORIES is a fact
about the world (a new merchant type), not broken data. The gate reports it as a warning, and
serving flags it (`unseen_values`), from the model contract's own list of categories it saw.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ml_platform import fixed_point
from ml_platform.features import AMOUNT_DECIMALS, CREATED_TS, EVENT_TS, LABEL, LABEL_TS

INT64_MAX = 2**63 - 1

# --- Vocabularies (the synthetic generator draws from these too) ---
DEVICES: tuple[str, ...] = ("ios", "android", "desktop", "mobile_web", "pos_terminal", "unknown")
CHANNELS: tuple[str, ...] = ("pos", "contactless", "online")
# Known to the platform's reference world, the drift scenario's new ones included; a soft list.
KNOWN_MERCHANT_CATEGORIES: tuple[str, ...] = (
    "grocery", "restaurants", "fuel", "pharmacy", "clothing", "entertainment", "utilities",
    "online_retail", "travel", "electronics", "gaming", "jewelry", "gift_cards",
    "crypto_exchange", "digital_wallet", "buy_now_pay_later",
)  # fmt: skip


class ContractViolation(ValueError):
    """One field of one event breaks the contract; `field` names it, `value` is what was given."""

    def __init__(self, field: str, value: Any, rule: str) -> None:
        self.field, self.value, self.rule = field, value, rule
        shown = "<missing>" if value is _MISSING else repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"field {field!r} {rule}, got {shown}")


_MISSING = object()


@dataclass(frozen=True)
class TextField:
    """A string: length in characters, optional full-match pattern, optional allowed values."""

    name: str
    description: str
    max_length: int
    min_length: int = 1
    pattern: str | None = None  # matched against the whole value
    allowed: tuple[str, ...] | None = None
    allowed_is_soft: bool = False  # outside `allowed` is reported (gate warning, serving flag), not refused

    def __post_init__(self) -> None:
        object.__setattr__(self, "_regex", re.compile(self.pattern) if self.pattern else None)

    @property
    def rule(self) -> str:
        parts = [f"must be a string of {self.min_length} to {self.max_length} characters, not blank"]
        if self.pattern:
            parts.append(f"matching {self.pattern}")
        if self.allowed and not self.allowed_is_soft:
            parts.append(f"one of {list(self.allowed)}")
        return ", ".join(parts)

    def check(self, value: Any) -> str:
        if (
            type(value) is not str
            or not self.min_length <= len(value) <= self.max_length
            or value.isspace()
            or (self._regex is not None and self._regex.fullmatch(value) is None)  # type: ignore[attr-defined]
            or (self.allowed is not None and not self.allowed_is_soft and value not in self.allowed)
        ):
            raise ContractViolation(self.name, value, self.rule)
        return value


@dataclass(frozen=True)
class IntegerField:
    """A whole number (a JSON integer; not a boolean, not 5.0) in [ge, le]."""

    name: str
    description: str
    ge: int
    le: int = INT64_MAX

    @property
    def rule(self) -> str:
        return f"must be an integer in [{self.ge}, {self.le}]"

    def check(self, value: Any) -> int:
        if type(value) is not int or not self.ge <= value <= self.le:
            raise ContractViolation(self.name, value, self.rule)
        return value


@dataclass(frozen=True)
class NumberField:
    """A finite number (a JSON integer or float; not a boolean) with gt < value < lt; with
    `decimals`, a fixed-point number with at most that many decimal places (an amount in cents:
    2), which features add exactly (`ml_platform.fixed_point`)."""

    name: str
    description: str
    gt: float
    lt: float
    decimals: int | None = None

    def __post_init__(self) -> None:
        if self.decimals is not None:
            fixed_point.check_decimals(self.decimals)

    @property
    def rule(self) -> str:
        places = "" if self.decimals is None else f" and at most {self.decimals} decimal places"
        return f"must be a number with {self.gt:g} < value < {self.lt:g}{places}"

    def check(self, value: Any) -> float:
        if (type(value) is not float and type(value) is not int) or not self.gt < value < self.lt:
            raise ContractViolation(self.name, value, self.rule)
        if self.decimals is not None and not fixed_point.on_grid(float(value), self.decimals):
            raise ContractViolation(self.name, value, self.rule)
        return float(value)


@dataclass(frozen=True)
class TimestampField:
    """An instant: in JSON an ISO-8601 string (no offset means UTC); in a table a UTC timestamp.
    `default_now`: a JSON event without it is taken as happening when the platform received it."""

    name: str
    description: str
    default_now: bool = False

    rule = "must be an ISO-8601 timestamp such as '2024-01-31T12:00:00+00:00'"

    def check(self, value: Any) -> datetime:
        """The instant as an aware UTC datetime."""
        if type(value) is str:
            try:
                when = datetime.fromisoformat(value)
            except ValueError:
                raise ContractViolation(self.name, value, self.rule) from None
        elif isinstance(value, datetime):
            when = value
        else:
            raise ContractViolation(self.name, value, self.rule)
        return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


FieldSpec = TextField | IntegerField | NumberField | TimestampField


@dataclass(frozen=True)
class EventContract:
    """The fields of one kind of event, in their canonical order."""

    name: str
    fields: tuple[FieldSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {f.name: f for f in self.fields})

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if not getattr(f, "default_now", False))

    def with_field(self, spec: FieldSpec) -> EventContract:
        """This contract with the field of the same name replaced by `spec` (e.g. a tighter limit)."""
        if spec.name not in self.names:
            raise KeyError(f"{self.name} has no field {spec.name!r}; fields: {list(self.names)}")
        return EventContract(self.name, tuple(spec if f.name == spec.name else f for f in self.fields))

    def field(self, name: str) -> FieldSpec:
        return self.by_name[name]  # type: ignore[attr-defined]

    def check(self, obj: Mapping[str, Any], *, envelope: tuple[str, ...] = (), now: datetime | None = None) -> dict:
        """`obj` (a decoded JSON object) as checked values, or ContractViolation naming the first bad
        field in contract order: a missing field, a bad value, then an unknown field. Keys in
        `envelope` (e.g. the stream's `kind`) are not event fields and are passed over."""
        out: dict[str, Any] = {}
        for spec in self.fields:
            value = obj.get(spec.name, _MISSING)
            if value is _MISSING:
                if getattr(spec, "default_now", False):
                    out[spec.name] = now or datetime.now(UTC)
                    continue
                raise ContractViolation(spec.name, _MISSING, "is missing")
            out[spec.name] = spec.check(value)
        if len(obj) > len(out):
            for key in obj:
                if key not in self.by_name and key not in envelope:  # type: ignore[attr-defined]
                    raise ContractViolation(str(key), obj[key], f"is not a field of a {self.name}")
        return out


TRANSACTION_ID = TextField("transaction_id", "The caller's unique id of the transaction", max_length=128)
USER_ID = IntegerField("user_id", "Card holder id (the user entity)", ge=1)
MERCHANT_ID = IntegerField("merchant_id", "Merchant id (the merchant entity)", ge=1)
MAX_AMOUNT = 1_000_000.0  # a single card payment of this or more is a data error, not a purchase

TRANSACTION = EventContract(
    "transaction",
    (
        TRANSACTION_ID,
        USER_ID,
        MERCHANT_ID,
        TextField(
            "merchant_category",
            "The merchant's category, a lowercase identifier (new categories are flagged, not refused)",
            max_length=64,
            pattern=r"[a-z][a-z0-9_]*",
            allowed=KNOWN_MERCHANT_CATEGORIES,
            allowed_is_soft=True,
        ),
        NumberField("amount", "Amount of the payment", gt=0.0, lt=MAX_AMOUNT, decimals=AMOUNT_DECIMALS),
        TextField("country", "ISO 3166-1 alpha-2 country of the merchant", max_length=2, pattern=r"[A-Z]{2}"),
        TextField("device", "Device the payment was made from", max_length=32, allowed=DEVICES),
        TextField("channel", "Payment channel", max_length=32, allowed=CHANNELS),
        TimestampField(EVENT_TS, "When the transaction happened (default: when it was received)", default_now=True),
    ),
)

# A label arriving for an earlier transaction (the stream's `kind: "label"` events).
LABEL_EVENT = EventContract(
    "label",
    (
        TRANSACTION_ID,
        MERCHANT_ID,
        IntegerField(LABEL, "1: the transaction was fraud, 0: legit", ge=0, le=1),
        TimestampField(LABEL_TS, "When the label became known"),
    ),
)
LABEL_EVENT_OPTIONAL = (USER_ID,)  # a label event may name the card holder too

# The raw table's columns beyond the transaction's own (gate only; see the module docstring).
TABLE_ONLY_COLUMNS = (CREATED_TS, LABEL, LABEL_TS)
