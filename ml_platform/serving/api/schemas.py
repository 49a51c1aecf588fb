"""The HTTP API's request and response bodies (pydantic): what a caller sends and gets back.

`Transaction` is derived from the platform's one transaction contract (`ml_platform.transactions`):
the API, the validation gate and the stream accept exactly the same transactions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ml_platform.experiments.config import REWARD_RANGE
from ml_platform.transactions import INT64_MAX, TRANSACTION  # noqa: F401  (INT64_MAX: re-exported)
from ml_platform.transactions.request_model import pydantic_model

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

# Derived from the platform's one transaction contract (`ml_platform.transactions`), so the API,
# the validation gate and the stream worker accept the same data (test_transaction_contract).
Transaction = pydantic_model(
    TRANSACTION, "Transaction", "One card transaction to score (the raw event's columns; no label).", EXAMPLE_TRANSACTION
)


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
    experiment: str | None = Field(None, description="The experiment that routed this prediction (null: none)")
    arm: str | None = Field(None, description="The experiment's arm that served it (its model_version)")
    selection_probability: float | None = Field(
        None, description="The probability that the router picked this arm for this prediction"
    )


class BatchResponse(BaseModel):
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str
    message: str
    errors: list[dict[str, Any]] | None = None


# --------------------------------------------------------------------------- experiments


class Feedback(BaseModel):
    """A late reward for one prediction made within an experiment."""

    model_config = ConfigDict(extra="forbid")

    prediction_id: str = Field(min_length=1, max_length=200, description="The prediction's prediction_id")
    reward: float = Field(
        ge=REWARD_RANGE[0], le=REWARD_RANGE[1], allow_inf_nan=False,
        description=f"The outcome's reward, in [{REWARD_RANGE[0]}, {REWARD_RANGE[1]}] (e.g. 1 = the decision was right)",
    )  # fmt: skip


class FeedbackBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    feedback: list[Feedback] = Field(min_length=1, description="Rewards (at most the server's max_feedback_rows)")


class FeedbackAccepted(BaseModel):
    prediction_id: str
    experiment_arm: str
    status: Literal["accepted"]


class FeedbackBatchResult(BaseModel):
    accepted: int
    unknown: list[str] = Field(description="prediction ids with no decision awaiting a reward (404 for one)")
    duplicate: list[str] = Field(description="prediction ids already rewarded (409 for one)")
