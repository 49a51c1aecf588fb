"""The streaming plan: feature views compiled into buffer groups.

`compile_views` decides which `BufferGroup` holds each aggregated view's rows (views reading the
same source whose join keys extend another's share its buffers) and turns each view's
`Aggregation` declarations into a `CompiledView`: indexes into its group's record layout and its
windows as int µs, ready for the vectorized evaluation (`windows.py`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_platform.featurestore.definitions import AGGREGATION_FUNCTIONS, FeatureView, ValueType
from ml_platform.featurestore.streaming.buffer import record_dtype
from ml_platform.timestamps import span_us


@dataclass(frozen=True)
class CompiledAggregation:
    """One declaration ready for the vectorized evaluation: output name, function, the index of
    its value column in the buffer (None for count(*)), of its window in the view's windows, and
    its fixed-point decimals (sum and mean add integer units when set)."""

    name: str
    function: str
    column: int | None
    window: int
    decimals: int | None = None


@dataclass(frozen=True)
class CompiledView:
    """A feature view's aggregations compiled against the buffer group that holds its rows."""

    view: FeatureView
    group: str  # the BufferGroup whose buffers hold this view's rows
    join_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]  # join keys beyond the group's (stored in each record)
    timestamp_field: str
    windows_us: tuple[int, ...]  # distinct windows, ascending
    aggregations: tuple[CompiledAggregation, ...]
    ttl_us: int | None

    @property
    def name(self) -> str:
        return self.view.name

    @property
    def max_window_us(self) -> int:
        return self.windows_us[-1]

    @property
    def feature_names(self) -> list[str]:
        return [a.name for a in self.aggregations]


@dataclass(frozen=True)
class BufferGroup:
    """Views whose rows come from one source with one time field and whose join keys extend the
    group's base keys: one buffer per base entity holds the rows of all of them (e.g. the card
    holder's buffer also answers user x merchant counts), so an event touches one key, not one
    per view. Records (`buffer.record_dtype`): time, the group's value columns, the extra
    (integer) keys, event-id hash."""

    name: str
    base_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]
    timestamp_field: str
    value_columns: tuple[str, ...]
    keep_window_us: int  # the longest window of its views: what a buffer must hold
    views: tuple[str, ...]
    record_dtype: np.dtype = field(compare=False)

    @property
    def layout_id(self) -> str:
        """Identifies the record layout: a changed layout starts new buffers instead of misreading old ones."""
        body = "|".join(
            [
                ",".join(self.base_keys),
                ",".join(self.extra_keys),
                self.timestamp_field,
                ",".join(self.value_columns),
            ]
        )
        return hashlib.sha1(body.encode()).hexdigest()[:8]


def is_integer_key(view: FeatureView, key: str) -> bool:
    """Whether join key `key` of `view` holds integers (its entity's value type)."""
    kind = next(e.value_type for e in view.entities if key in e.join_keys)
    return kind in (ValueType.Int64, ValueType.Int32)


def compile_views(views: Iterable[FeatureView]) -> tuple[dict[str, CompiledView], dict[str, BufferGroup]]:
    """Compile the aggregated views and assign each to a buffer group: a view joins an existing
    group when it reads the same source with the same time field, its join keys include the
    group's base keys (the others being integers) and its longest window fits the group's."""
    aggregated = [v for v in views if v.aggregations]
    specs: list[dict[str, Any]] = []
    assignment: dict[str, dict[str, Any]] = {}
    for view in sorted(aggregated, key=lambda v: len(v.join_keys)):
        longest = max(span_us(a.window) for a in view.aggregations)
        source = (view.source.path, view.source.timestamp_field)
        chosen = None
        for spec in specs:
            extra = [k for k in view.join_keys if k not in spec["base"]]
            if (
                spec["source"] == source
                and set(spec["base"]) <= set(view.join_keys)
                and longest <= spec["keep"]
                and all(is_integer_key(view, k) for k in extra)
            ):
                chosen = spec
                break
        if chosen is None:
            chosen = {
                "name": view.name,
                "base": tuple(view.join_keys),
                "source": source,
                "keep": longest,
                "views": [],
                "extra": [],
            }
            specs.append(chosen)
        chosen["views"].append(view)
        chosen["extra"] += [k for k in view.join_keys if k not in chosen["base"] and k not in chosen["extra"]]
        assignment[view.name] = chosen
    groups: dict[str, BufferGroup] = {}
    for spec in specs:
        columns = tuple(dict.fromkeys(a.column for v in spec["views"] for a in v.aggregations if a.column))
        groups[spec["name"]] = BufferGroup(
            name=spec["name"],
            base_keys=spec["base"],
            extra_keys=tuple(spec["extra"]),
            timestamp_field=spec["source"][1],
            value_columns=columns,
            keep_window_us=spec["keep"],
            views=tuple(v.name for v in spec["views"]),
            record_dtype=record_dtype(len(columns), len(spec["extra"])),
        )
    compiled: dict[str, CompiledView] = {}
    for view in aggregated:
        group = groups[assignment[view.name]["name"]]
        windows = tuple(sorted({span_us(a.window) for a in view.aggregations}))
        aggs = tuple(
            CompiledAggregation(
                name=a.feature_name,
                function=a.function,
                column=None if a.column is None else group.value_columns.index(a.column),
                window=windows.index(span_us(a.window)),
                decimals=a.decimals,
            )
            for a in view.aggregations
            if a.function in AGGREGATION_FUNCTIONS
        )
        compiled[view.name] = CompiledView(
            view=view,
            group=group.name,
            join_keys=tuple(view.join_keys),
            extra_keys=tuple(k for k in view.join_keys if k not in group.base_keys),
            timestamp_field=view.source.timestamp_field,
            windows_us=windows,
            aggregations=aggs,
            ttl_us=span_us(view.ttl) if view.ttl else None,
        )
    return compiled, groups
