"""`OnlineStore`: what `FeatureStore`, the skew check, the HTTP API and the stream worker need of an
online store. `RedisOnlineStore` implements it on one Redis, `RedisClusterOnlineStore`
(cluster_store.py) on a Redis Cluster; every implementation must pass the one contract suite,
`ml_platform_tests/online_store_contract.py`.

The contract, in short: values are versioned per feature view; a full write builds a new version
and flips to it atomically (a failed write leaves the previous version serving); a read of several
views for several entities is one consistent snapshot (each view's values all come from one
version, and views are read at one moment; on Redis Cluster "one moment" holds for views with
the same join keys, see docs/online_store.md "Redis Cluster"); values older than the view's TTL at `now`, and
unknown entities, read as None (with a status column on request); nulls and NaN stay distinct.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from ml_platform.featurestore.definitions import FeatureView

# Feast's FieldStatus names, reported per view and entity with include_status=True.
PRESENT = "PRESENT"
NOT_FOUND = "NOT_FOUND"
OUTSIDE_MAX_AGE = "OUTSIDE_MAX_AGE"

FeatureRequest = Sequence[str] | Mapping[Any, Sequence[str]]


class OnlineStoreError(RuntimeError):
    """A problem with the online store's state (not materialized, schema changed, superseded, ...)."""


@runtime_checkable
class OnlineStore(Protocol):
    """An online store of one project: the latest feature values per entity, versioned per view."""

    project: str
    views: Mapping[str, FeatureView]  # the definitions reads take join keys and TTL from

    def read(
        self,
        features: FeatureRequest,
        entity_rows: Sequence[Mapping[str, Any]],
        *,
        full_feature_names: bool = False,
        include_event_timestamps: bool = False,
        include_status: bool = False,
        now: datetime | float | None = None,
    ) -> dict[str, list]:
        """Feast's get_online_features(...).to_dict(): column -> list in entity_rows order, join
        keys first; one consistent snapshot across the requested views."""
        ...

    async def read_async(
        self,
        features: FeatureRequest,
        entity_rows: Sequence[Mapping[str, Any]],
        *,
        full_feature_names: bool = False,
        include_event_timestamps: bool = False,
        include_status: bool = False,
        now: datetime | float | None = None,
    ) -> dict[str, list]:
        """`read` for an asyncio caller (the HTTP API)."""
        ...

    def write_view(
        self, view: FeatureView | str, data: Any, *, mode: str = "full", as_of: datetime | None = None
    ) -> dict[str, Any]:
        """Materialize one row per entity. mode="full": a new version, then an atomic flip to it;
        mode="incremental": newer-event-time-wins upsert into the current version. Returns at
        least view, mode, rows, seconds, rows_per_s and version."""
        ...

    def update_entities(self, view: FeatureView | str, rows: Any) -> dict[str, int]:
        """Newer-wins upsert of a few entities into the current version (the stream worker's
        path). Returns {"rows": sent, "written": stored}."""
        ...

    def metadata(self, view: str) -> dict[str, Any]:
        """The view's current version and last materialization (version, as_of, rows, ...);
        {} if it was never materialized."""
        ...

    def materialized_views(self) -> list[str]:
        """Names of the views that have a materialized version."""
        ...

    def delete_project(self) -> int:
        """Delete everything of this project's online store; returns how many keys/items went."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...
