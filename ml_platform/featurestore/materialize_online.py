"""Offline -> online: load each feature view's latest values from the offline store (`FeatureStore`)
into an `OnlineStore`, fully (a new version, flipped atomically) or incrementally (only entities
whose event time is after the view's last recorded `as_of`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online.codec import EVENT_TIMESTAMP
from ml_platform.featurestore.online.protocol import OnlineStore

MODES = ("full", "incremental")


def materialize(
    online: OnlineStore,
    feature_store: Any,
    views: Sequence[FeatureView | str] | None = None,
    as_of: datetime | None = None,
    *,
    mode: str = "full",
) -> list[dict[str, Any]]:
    """Load each view's latest values as of `as_of` (default now, UTC) from the offline store into
    the online store. mode="incremental" writes only entities whose event time is after the view's
    last recorded as_of (a view never materialized gets a full load). One result dict per view."""
    if mode not in MODES:
        raise ValueError(f"mode must be 'full' or 'incremental', got {mode!r}")
    as_of = as_of or datetime.now(UTC)
    if as_of.tzinfo is None:
        as_of = as_of.replace(tzinfo=UTC)
    chosen = views if views is not None else feature_store.list_feature_views()
    results = []
    for view in chosen:
        fv = view if isinstance(view, FeatureView) else feature_store.get_feature_view(view)
        view_mode = mode
        table = feature_store.latest_features(fv.name, as_of)
        if mode == "incremental":
            since = online.metadata(fv.name).get("as_of")
            if since is None:
                view_mode = "full"
            else:
                table = table.filter(
                    pc.greater(table.column(EVENT_TIMESTAMP), pa.scalar(since, pa.timestamp("us", tz="UTC")))
                )
        result = online.write_view(fv, table, mode=view_mode, as_of=as_of)
        result["as_of"] = as_of
        results.append(result)
    return results
