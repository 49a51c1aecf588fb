"""The HTTP API's pydantic model of a transaction, derived from the contract (never written by hand).

Each field gets the contract's limits as pydantic constraints (so /docs and the OpenAPI schema
show them) and, after pydantic's own type check, the contract's `check` (so what is accepted is
decided by exactly the code the stream worker runs; the property test holds both to the gate).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, create_model

from ml_platform.transactions.contract import (
    EventContract,
    FieldSpec,
    IntegerField,
    NumberField,
    TextField,
    TimestampField,
)


def _annotation(spec: FieldSpec) -> tuple[Any, Any]:
    """(type annotation, default) of one field."""
    if isinstance(spec, TextField):
        extra: dict[str, Any] = {}
        if spec.pattern:
            extra["pattern"] = f"^{spec.pattern}$"
        if spec.allowed and not spec.allowed_is_soft:
            extra["enum"] = list(spec.allowed)
        elif spec.allowed:
            extra["examples"] = list(spec.allowed[:3])
        field = Field(
            min_length=spec.min_length,
            max_length=spec.max_length,
            description=spec.description,
            json_schema_extra=extra or None,
            strict=True,
        )
        return Annotated[str, field, AfterValidator(spec.check)], ...
    if isinstance(spec, IntegerField):
        return Annotated[int, Field(ge=spec.ge, le=spec.le, strict=True, description=spec.description)], ...
    if isinstance(spec, NumberField):
        # multipleOf documents the fixed point in the OpenAPI schema; spec.check enforces it exactly
        # (pydantic's multiple_of would use float modulo: 12.34 % 0.01 is not 0).
        places = None if spec.decimals is None else {"multipleOf": 10**-spec.decimals}
        field = Field(
            gt=spec.gt, lt=spec.lt, allow_inf_nan=False, strict=True, description=spec.description,
            json_schema_extra=places,
        )
        return Annotated[float, field, AfterValidator(spec.check)], ...
    if isinstance(spec, TimestampField):
        ann = Annotated[datetime, BeforeValidator(spec.check), Field(description=spec.description)]
        if spec.default_now:
            return ann, Field(default_factory=lambda: datetime.now(UTC), description=spec.description)
        return ann, ...
    raise TypeError(f"no pydantic mapping for {type(spec).__name__}")


def pydantic_model(contract: EventContract, name: str, doc: str, example: dict | None = None) -> type[BaseModel]:
    """A pydantic model with one field per contract field; unknown fields are refused."""
    config = ConfigDict(extra="forbid", json_schema_extra={"examples": [example]} if example else None)
    fields = {spec.name: _annotation(spec) for spec in contract.fields}
    model = create_model(name, __config__=config, __doc__=doc, **fields)  # type: ignore[call-overload]
    return model
