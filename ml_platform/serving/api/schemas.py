"""The HTTP API's request and response bodies (pydantic): what a caller sends and gets back.

`Transaction` is the request contract of one transaction. Its field limits are the API's own for
now; they are to be derived from the platform's single transaction contract
(`ml_platform/transactions.py`) so the API, the validation gate and the stream accept the same data.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

INT64_MAX = 2**63 - 1
EXAMPLE_TRANSACTION = {
    "transaction_id": "txn-000123",
    "user_id": 42,
    "merchant_id": 7,
    "merchant_category": "electronics",
    "amount": 249.99,
    "country": "DE",
    "device": "ios",
    "channel": "online",
    "event_timestamp": "2026-01-15T12:34:56Z",
}
PREDICT_EXAMPLES = {"purchase": {"summary": "One online purchase", "value": EXAMPLE_TRANSACTION}}
BATCH_EXAMPLES = {
    "two transactions": {
        "summary": "Two transactions of one card holder",
        "value": {
            "transactions": [
                EXAMPLE_TRANSACTION,
                {**EXAMPLE_TRANSACTION, "transaction_id": "txn-000124", "amount": 12.5, "channel": "pos"},
            ]
        },
    }
}


# --------------------------------------------------------------------------- the transaction contract


class Transaction(BaseModel):
    """One card transaction to score (the raw event's columns; no label)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [EXAMPLE_TRANSACTION]})

    transaction_id: str = Field(
        min_length=1, max_length=128, description="Caller's unique id of the transaction"
    )
    user_id: int = Field(ge=0, le=INT64_MAX, description="Card holder id (the user entity)")
    merchant_id: int = Field(ge=0, le=INT64_MAX, description="Merchant id (the merchant entity)")
    merchant_category: str = Field(min_length=1, max_length=64, examples=["electronics"])
    amount: float = Field(gt=0, le=1e9, allow_inf_nan=False, description="Amount, > 0")
    country: str = Field(pattern=r"^[A-Za-z]{2}$", description="ISO-3166 alpha-2 country of the merchant")
    device: str = Field(min_length=1, max_length=64, examples=["ios"])
    channel: str = Field(min_length=1, max_length=64, examples=["online"])
    event_timestamp: datetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When the transaction happened (ISO 8601; naive = UTC; default: now)",
    )

    @field_validator("country")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("event_timestamp")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --------------------------------------------------------------------------- requests and answers


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transactions: list[Transaction] = Field(
        min_length=1, description="Transactions to score (at most the server's max_request_rows, 1000 by default)"
    )


class PredictionFlags(BaseModel):
    unknown_entity: bool = Field(description="The card holder or the merchant has no features online")
    unknown_user: bool
    unknown_merchant: bool
    missing_views: list[str] = Field(
        description="Feature views with no value for this entity (features null)"
    )
    expired_views: list[str] = Field(description="Feature views whose value is older than their TTL (null)")
    unseen_values: list[str] = Field(
        description="Categorical inputs whose value the model never saw in training (e.g. a new "
        "merchant_category): scored as 'unknown', which the model has no data for"
    )


class Prediction(BaseModel):
    prediction_id: str
    transaction_id: str
    probability: float = Field(description="P(fraud) from the model")
    decision: Literal["fraud", "legit"] = Field(description="fraud iff probability >= threshold")
    threshold: float = Field(description="The model contract's decision threshold")
    model_name: str
    model_version: int
    scorer: str = Field(description="features path + scorer, e.g. compiled+treelite")
    latency_ms: float = Field(description="Time in the service: queueing, feature read, scoring")
    flags: PredictionFlags
    features: dict[str, Any] | None = Field(None, description="Model inputs (with ?include_features=true)")


class BatchResponse(BaseModel):
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    message: str
    errors: list[dict[str, Any]] | None = None
