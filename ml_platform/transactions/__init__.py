"""The transaction contract (declared once in `contract.py`) and the validators derived from it.

`ml_platform.transactions.request_model` (pydantic, for the API) is imported on demand so that
the stream worker does not pay for it.
"""

from ml_platform.transactions.contract import (
    CHANNELS,
    DEVICES,
    INT64_MAX,
    KNOWN_MERCHANT_CATEGORIES,
    LABEL_EVENT,
    LABEL_EVENT_OPTIONAL,
    MAX_AMOUNT,
    TABLE_ONLY_COLUMNS,
    TRANSACTION,
    ContractViolation,
    EventContract,
    IntegerField,
    NumberField,
    TextField,
    TimestampField,
)

__all__ = [
    "CHANNELS",
    "DEVICES",
    "INT64_MAX",
    "KNOWN_MERCHANT_CATEGORIES",
    "LABEL_EVENT",
    "LABEL_EVENT_OPTIONAL",
    "MAX_AMOUNT",
    "TABLE_ONLY_COLUMNS",
    "TRANSACTION",
    "ContractViolation",
    "EventContract",
    "IntegerField",
    "NumberField",
    "TextField",
    "TimestampField",
]
