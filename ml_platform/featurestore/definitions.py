"""Feature store vocabulary (Feast-compatible names): entities, fields, sources, feature views.

A feature is written once here and every consumer reads the same object: the offline
point-in-time join, the online store, the stream updater and drift monitoring.

Windowed aggregations are *declared as data* (`Aggregation`), never as free SQL: the offline
side compiles a declaration to DuckDB SQL and the streaming side compiles the same declaration
to an incremental updater, so training and serving cannot drift apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

from ml_platform import fixed_point
from ml_platform.timestamps import US_PER_SECOND, span_us

# Features of an event are looked up as of *just before* it: the state the serving path holds when
# the event arrives (aggregates up to the entity's previous event). The offline training set, batch
# scoring, the online read and the stream's incremental state all use this one offset (re-exported
# by ml_platform.features, where the platform's own feature rules are read).
FEATURE_LOOKUP_OFFSET = timedelta(microseconds=1)

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{kind} name {name!r} is not a valid identifier (letters, digits, underscore)")
    return name


class ValueType(Enum):
    """Feature dtypes, named as in Feast (`feast.types`)."""

    Int32 = "INTEGER"
    Int64 = "BIGINT"
    Float32 = "FLOAT"
    Float64 = "DOUBLE"
    String = "VARCHAR"
    Bool = "BOOLEAN"
    UnixTimestamp = "TIMESTAMPTZ"

    @property
    def duckdb_type(self) -> str:
        return self.value


Int32 = ValueType.Int32
Int64 = ValueType.Int64
Float32 = ValueType.Float32
Float64 = ValueType.Float64
String = ValueType.String
Bool = ValueType.Bool
UnixTimestamp = ValueType.UnixTimestamp


@dataclass(frozen=True)
class Field:
    """A named, typed column of a feature view (Feast: `feast.Field`)."""

    name: str
    dtype: ValueType

    def __post_init__(self) -> None:
        _check_name("Field", self.name)
        if not isinstance(self.dtype, ValueType):
            raise TypeError(
                f"Field {self.name!r}: dtype must be a ValueType such as Float64, got {self.dtype!r}"
            )


@dataclass(frozen=True)
class Entity:
    """The thing features describe (a user, a merchant), identified by one or more join keys."""

    name: str
    join_keys: tuple[str, ...] = ()
    value_type: ValueType = Int64
    description: str = ""

    def __init__(
        self,
        name: str,
        join_keys: list[str] | tuple[str, ...] | None = None,
        value_type: ValueType = Int64,
        description: str = "",
    ) -> None:
        _check_name("Entity", name)
        keys = tuple(join_keys) if join_keys else (name,)
        for k in keys:
            _check_name(f"Entity {name!r} join key", k)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "join_keys", keys)
        object.__setattr__(self, "value_type", value_type)
        object.__setattr__(self, "description", description)


@dataclass(frozen=True)
class FileSource:
    """Parquet (a file, a directory or a glob) or CSV data with an event-time column.

    `created_timestamp_column` breaks ties between rows with the same entity and event time:
    the row created last wins (Feast semantics).
    """

    path: str
    timestamp_field: str = "event_timestamp"
    created_timestamp_column: str | None = None
    file_format: str = "parquet"  # "parquet" or "csv"
    name: str = ""

    def __post_init__(self) -> None:
        if self.file_format not in ("parquet", "csv"):
            raise ValueError(
                f"FileSource {self.path!r}: file_format must be 'parquet' or 'csv', got {self.file_format!r}"
            )


AGGREGATION_FUNCTIONS = ("count", "sum", "mean", "min", "max")


def _window_label(window: timedelta) -> str:
    """A window's short name in default feature names: 1h, 24h, 30d (whole units), else seconds."""
    seconds = span_us(window) // US_PER_SECOND
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Aggregation:
    """One windowed aggregation, declared as data.

    Value at time t for an entity = `function(column)` over that entity's source rows with
    timestamp in [t - window, t] (both ends inclusive, the row at t itself included).
    `column=None` with `function="count"` counts rows.

    `decimals` (sum and mean only) declares the column fixed point, its values multiples of
    10^-decimals (2 for an amount in cents, 0 for a 0/1 label): every engine then adds them as
    integers (`ml_platform.fixed_point`), so DuckDB, Spark and the stream give the same bits.
    Without it the sum is a float sum, whose last bits depend on each engine's order of additions.
    """

    function: str
    window: timedelta
    column: str | None = None
    name: str | None = None
    decimals: int | None = None

    def __post_init__(self) -> None:
        if self.function not in AGGREGATION_FUNCTIONS:
            raise ValueError(f"Aggregation function {self.function!r} is not one of {AGGREGATION_FUNCTIONS}")
        if self.column is None and self.function != "count":
            raise ValueError(f"Aggregation {self.function!r} needs a source column")
        if not isinstance(self.window, timedelta) or self.window <= timedelta(0):
            raise ValueError(f"Aggregation window must be a positive timedelta, got {self.window!r}")
        if self.column is not None:
            _check_name("Aggregation column", self.column)
        if self.name is not None:
            _check_name("Aggregation", self.name)
        if self.decimals is not None:
            if self.function not in ("sum", "mean"):
                raise ValueError(
                    f"Aggregation {self.function!r} takes no decimals (got {self.decimals!r}): "
                    "only sum and mean add values, count, min and max are exact anyway"
                )
            try:
                fixed_point.check_decimals(self.decimals)
            except ValueError as e:
                raise ValueError(f"Aggregation {self.feature_name!r}: {e}") from None

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        col = self.column or "rows"
        return f"{col}_{self.function}_{_window_label(self.window)}"

    @property
    def exact(self) -> bool:
        """Every engine computes the same bits: not a float sum (count, min, max, or fixed point)."""
        return self.function not in ("sum", "mean") or self.decimals is not None

    @property
    def dtype(self) -> ValueType:
        return Int64 if self.function == "count" else Float64


@dataclass(frozen=True)
class FeatureView:
    """A group of features for the same entities, read from one source, valid for `ttl`.

    Either `source` already holds the feature values (a table with the entity join keys,
    `source.timestamp_field` and the schema's columns), or `aggregations` declares how to
    compute them from `source` (raw events): `ml_platform.featurestore.aggregation` compiles
    them to DuckDB SQL and writes the feature table, with one row per (entity, event time).
    `ttl` None or zero: a value never expires.
    """

    name: str
    entities: tuple[Entity, ...]
    source: FileSource
    schema: tuple[Field, ...] = ()
    ttl: timedelta | None = None
    aggregations: tuple[Aggregation, ...] = ()
    description: str = ""
    tags: tuple[tuple[str, str], ...] = field(default=())

    def __init__(
        self,
        name: str,
        entities: list[Entity] | tuple[Entity, ...],
        source: FileSource,
        schema: list[Field] | tuple[Field, ...] | None = None,
        ttl: timedelta | None = None,
        aggregations: list[Aggregation] | tuple[Aggregation, ...] | None = None,
        description: str = "",
        tags: dict[str, str] | None = None,
    ) -> None:
        _check_name("FeatureView", name)
        if not entities:
            raise ValueError(f"FeatureView {name!r} needs at least one entity")
        aggs = tuple(aggregations or ())
        fields = tuple(schema or ())
        if aggs and not fields:
            fields = tuple(Field(a.feature_name, a.dtype) for a in aggs)
        if not fields:
            raise ValueError(f"FeatureView {name!r} needs a schema or aggregations")
        names = [f.name for f in fields]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"FeatureView {name!r} declares features more than once: {dupes}")
        if aggs and sorted(names) != sorted(a.feature_name for a in aggs):
            raise ValueError(f"FeatureView {name!r}: schema {names} does not match its aggregations")
        if ttl is not None and ttl < timedelta(0):
            raise ValueError(f"FeatureView {name!r}: ttl must not be negative, got {ttl!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "entities", tuple(entities))
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "schema", fields)
        object.__setattr__(self, "ttl", ttl)
        object.__setattr__(self, "aggregations", aggs)
        object.__setattr__(self, "description", description)
        object.__setattr__(self, "tags", tuple(sorted((tags or {}).items())))

    @property
    def join_keys(self) -> tuple[str, ...]:
        return tuple(k for e in self.entities for k in e.join_keys)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.schema]

    def feature_refs(self) -> list[str]:
        return [f"{self.name}:{f.name}" for f in self.schema]

    def with_source(self, source: FileSource) -> FeatureView:
        """The same view reading its feature values from another source (the materialized table)."""
        return FeatureView(
            name=self.name,
            entities=self.entities,
            source=source,
            schema=self.schema,
            ttl=self.ttl,
            aggregations=self.aggregations,
            description=self.description,
            tags=dict(self.tags),
        )


def parse_feature_ref(ref: str) -> tuple[str, str]:
    """'view:feature' -> ('view', 'feature'), with a clear error for anything else."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ValueError(f"Feature reference {ref!r} must look like 'feature_view:feature'")
    view, feat = ref.split(":")
    if not view or not feat:
        raise ValueError(f"Feature reference {ref!r} must look like 'feature_view:feature'")
    return view, feat
