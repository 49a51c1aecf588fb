"""Which asset writes each declared source: feature-view dependencies follow the declarations.

A feature view names its source (`FeatureView.source`, a `FileSource` with a path under the data
directory, see ml_platform/features.py); the asset that writes that path is its upstream. A view
with aggregations is materialized into its own offline table (an asset named like the view); a
view without reads its source as is, so whoever consumes its features depends on the source's asset.
"""

from collections.abc import Iterable

from ml_platform import features as fr
from ml_platform.featurestore.definitions import FeatureView, FileSource

# Source path (relative to the data directory) -> the asset that writes it.
SOURCE_ASSETS: dict[str, str] = {
    fr.TRANSACTIONS_PATH: "raw_transactions",  # transactions_source and labels_source
    fr.USERS_PATH: "users",
}


def source_asset(view_or_source: FeatureView | FileSource) -> str:
    """The asset that writes a view's (or a source's) declared source path."""
    source = view_or_source.source if isinstance(view_or_source, FeatureView) else view_or_source
    asset = SOURCE_ASSETS.get(source.path.strip("/"))
    if asset is None:
        what = f"feature view {view_or_source.name!r}" if isinstance(view_or_source, FeatureView) else "a source"
        raise ValueError(
            f"{what} reads source {source.name or source.path!r} at {source.path!r}, which no asset writes "
            f"(known: {sorted(SOURCE_ASSETS)}); add its path and asset to SOURCE_ASSETS in {__name__}"
        )
    return asset


def view_asset(view: FeatureView) -> str:
    """The asset that holds the view's feature values: its offline table, or its source as is."""
    return view.name if view.aggregations else source_asset(view)


def view_assets(views: Iterable[FeatureView]) -> list[str]:
    """`view_asset` of each view, without repeats, in order."""
    return list(dict.fromkeys(view_asset(v) for v in views))
