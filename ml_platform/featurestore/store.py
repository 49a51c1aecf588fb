"""FeatureStore: the registry of entities and feature views plus the offline store over one repo path.

Feast vocabulary: `apply` registers definitions, `get_historical_features` builds point-in-time
correct training rows, `materialize_offline` computes aggregated views into Parquet tables (only
from where the source changed, when that is exact: `incremental`) and `latest_features` gives the
newest value per entity (what the online store loads).

Paths: a FileSource path is relative to `repo_path` unless absolute; aggregated views are
materialized to `repo_path/offline/<view>.parquet`; the registry is mirrored in
`repo_path/registry.json` (read back when a store is opened on the same path).

Why ~540 lines in one module: it is the facade a user holds (Feast's `FeatureStore`); each method
is a few lines over `offline`, `aggregation`, `incremental`, `online/` and `materialize_online`, and the registry
file it keeps is its own state. The SQL and the stores live in those modules.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ml_platform.atomic_files import write_text_atomic
from ml_platform.featurestore import incremental, offline
from ml_platform.featurestore.aggregation import compile_aggregation_sql, source_columns
from ml_platform.featurestore.definitions import (
    Aggregation,
    Entity,
    FeatureView,
    Field,
    FileSource,
    ValueType,
    parse_feature_ref,
)
from ml_platform.settings import DEFAULT_PROJECT
from ml_platform.timestamps import from_us

if TYPE_CHECKING:
    from ml_platform.featurestore.online import OnlineStore

REGISTRY_FILE = "registry.json"
OFFLINE_DIR = "offline"
FINGERPRINT_KEY = "ml_platform_view_fingerprint"  # Parquet key-value metadata of materialized tables


class NotMaterializedError(FileNotFoundError):
    """An aggregated feature view was read before `materialize_offline` wrote its table."""


class FeatureStore:
    """Registry + offline store for the feature repo at `repo_path` (the platform's data dir).

    `duckdb_threads` / `duckdb_memory_limit` (e.g. "2GB") bound each DuckDB query; by default
    DuckDB uses all cores and 80% of RAM. Each call opens its own in-memory DuckDB connection,
    so a store may be shared between threads.
    """

    def __init__(
        self,
        repo_path: str | os.PathLike,
        *,
        duckdb_threads: int | None = None,
        duckdb_memory_limit: str | None = None,
        online_store: OnlineStore | None = None,
        project: str = DEFAULT_PROJECT,
        redis_url: str | None = None,
    ) -> None:
        self.repo_path = Path(repo_path).expanduser().resolve()
        self.project = project
        self.redis_url = redis_url
        self._online = online_store
        self.duckdb_threads = duckdb_threads
        self.duckdb_memory_limit = duckdb_memory_limit
        self._entities: dict[str, Entity] = {}
        self._views: dict[str, FeatureView] = {}
        registry = self.repo_path / REGISTRY_FILE
        if registry.exists():
            self._load_registry(registry)

    # ---------------------------------------------------------------- online store

    @property
    def online_store(self) -> OnlineStore:
        """The online store (an `OnlineStore`; Redis unless one was given), built on first use:
        `redis_url`, else REDIS_URL, else the embedded redis-server under <repo_path>/redis."""
        if self._online is None:
            from ml_platform.featurestore.online import RedisOnlineStore
            from ml_platform.featurestore.redis_server import client_from_url, resolve_redis_url

            url = resolve_redis_url(url=self.redis_url, data_dir=self.repo_path)
            self._online = RedisOnlineStore(client_from_url(url), self.project, views=self._views)
        return self._online

    def materialize(self, views=None, as_of: datetime | None = None, *, mode: str = "full") -> list[dict]:
        """Load the latest values per entity (within TTL, as of `as_of`) from the offline store into
        the online store; mode="incremental" writes only entities changed since the last run."""
        from ml_platform.featurestore.materialize_online import materialize

        return materialize(self.online_store, self, views, as_of, mode=mode)

    def get_online_features(self, features, entity_rows, **kwargs) -> dict[str, list]:
        """Feast's `get_online_features`: column -> list in entity_rows order, entity keys included."""
        return self.online_store.read(features, entity_rows, **kwargs)

    # ---------------------------------------------------------------- registry

    def apply(self, objects: list[Entity | FeatureView] | Entity | FeatureView) -> None:
        """Register entities and feature views (replacing any of the same name).

        A view's entities are registered with it. The registry is persisted to registry.json.
        """
        if isinstance(objects, (Entity, FeatureView)):
            objects = [objects]
        for obj in objects:
            if isinstance(obj, Entity):
                self._entities[obj.name] = obj
            elif isinstance(obj, FeatureView):
                for entity in obj.entities:
                    self._entities[entity.name] = entity
                self._views[obj.name] = obj
            else:
                raise TypeError(
                    f"apply() takes Entity and FeatureView objects, got {type(obj).__name__}: {obj!r}"
                )
        self._save_registry()

    def get_entity(self, name: str) -> Entity:
        """The registered entity `name` (ValueError listing the known ones if absent)."""
        if name not in self._entities:
            raise ValueError(f"Unknown entity {name!r}; registered entities: {sorted(self._entities)}")
        return self._entities[name]

    def list_entities(self) -> list[Entity]:
        return list(self._entities.values())

    def get_feature_view(self, name: str) -> FeatureView:
        """The registered feature view `name` (ValueError listing the known ones if absent)."""
        if name not in self._views:
            raise ValueError(
                f"Unknown feature view {name!r}; registered views: {sorted(self._views)}. "
                "Register it with FeatureStore.apply([...])"
            )
        return self._views[name]

    def list_feature_views(self) -> list[FeatureView]:
        return list(self._views.values())

    # ---------------------------------------------------------------- offline reads

    def get_historical_features(
        self,
        entity_df: pd.DataFrame,
        features: list[str],
        full_feature_names: bool = False,
    ) -> pd.DataFrame:
        """Point-in-time correct feature values for every row of `entity_df`.

        `entity_df` needs `event_timestamp` and the join keys of every requested view; `features`
        are "view:feature" references. Returns a copy of entity_df (same index, order, extra
        columns and duplicate rows) with `event_timestamp` as tz-aware UTC and one column per
        feature, named `feature` or `view__feature` (full_feature_names=True). Per row and view:
        the latest feature row with the same keys and event time in [T - ttl, T], ties broken by
        the latest created timestamp; none -> null. Integer and boolean features come back as
        pandas nullable dtypes (Int64, Int32, boolean) always, floats as float64 with NaN.
        Naive entity timestamps are taken as UTC; a naive/aware mix is an error. An empty
        entity_df gives an empty frame with the same columns and dtypes.
        """
        if not isinstance(entity_df, pd.DataFrame):
            raise TypeError(f"entity_df must be a pandas DataFrame, got {type(entity_df).__name__}")
        if offline.ENTITY_TS not in entity_df.columns:
            raise ValueError(
                f"entity_df has no '{offline.ENTITY_TS}' column (columns: {list(entity_df.columns)}); add the "
                "time at which each row's features should be known"
            )
        plan = self._plan(features, full_feature_names)
        for view, _ in plan:
            missing = [k for k in view.join_keys if k not in entity_df.columns]
            if missing:
                raise ValueError(
                    f"entity_df lacks join key column(s) {missing} needed by feature view {view.name!r} "
                    f"(join keys {list(view.join_keys)}); entity_df columns: {list(entity_df.columns)}"
                )
        outputs = [out for _, pairs in plan for _, out in pairs]
        clashes = [c for c in outputs if c in entity_df.columns]
        if clashes:
            raise ValueError(
                f"feature column(s) {clashes} would overwrite entity_df columns of the same name; rename "
                "them in entity_df or pass full_feature_names=True"
            )
        with self._connect() as con:
            requests = [(self.feature_table(con, view), pairs) for view, pairs in plan]
            return offline.point_in_time_join(con, entity_df, requests, self._requested_order(features, plan))

    def latest_features(self, view_name: str, as_of: datetime) -> pa.Table:
        """One row per entity of `view_name`: its latest feature row with event time <= as_of and,
        when the view has a ttl, >= as_of - ttl. Columns: join keys, event_timestamp, features
        (declared types). A naive `as_of` is taken as UTC. Sorted by join keys."""
        view = self.get_feature_view(view_name)
        with self._connect() as con:
            table = self.feature_table(con, view)
            sql = offline.latest_sql(table)
            try:
                return con.sql(sql, params={"as_of": offline.as_of_utc(as_of)}).to_arrow_table()
            except duckdb.Error as exc:
                raise RuntimeError(f"latest_features for feature view {view_name!r} failed: {exc}") from exc

    # ---------------------------------------------------------------- aggregated views

    def offline_table_path(self, view_name: str) -> Path:
        """Where `materialize_offline` writes the view's table."""
        return self.repo_path / OFFLINE_DIR / f"{view_name}.parquet"

    def aggregation_sql(self, view_name: str) -> str:
        """The DuckDB SQL that computes an aggregated view from its raw source (for docs / UI)."""
        view = self.get_feature_view(view_name)
        return compile_aggregation_sql(view, self._source_scan(view))

    def materialize_offline(self, view_name: str, *, full: bool = False) -> dict:
        """Compute an aggregated view's table and write it atomically to offline/<view>.parquet.

        Incremental where that is exact (`featurestore.incremental`): only the rows from the
        earliest time at which the source changed are recomputed, and nothing when no source file
        changed; `full=True`, or a table from another definition, recomputes everything.

        Returns {"rows", "path", "seconds", "mode" ("full" | "incremental" | "unchanged"),
        "recomputed_from" (ISO time or None), "changed_files"}. The new table replaces the old one
        only once fully written, so a failing run leaves the previous table intact.
        """
        view = self.get_feature_view(view_name)
        if not view.aggregations:
            raise ValueError(
                f"FeatureView {view_name!r} declares no aggregations: it is read from its source directly "
                "and needs no materialize_offline"
            )
        started = time.perf_counter()
        target = self.offline_table_path(view_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with self._connect() as con:
            scan = self._source_scan(view)
            self._check_source_columns(con, view, scan, source_columns(view))
            metadata = {FINGERPRINT_KEY: view_fingerprint(view)}
            step = incremental.Plan("full")
            if incremental.supports_incremental(view):
                previous = {}
                if target.exists() and not full:
                    try:
                        previous = self._table_metadata(con, target)
                    except duckdb.Error:  # an unreadable table: recompute it whole
                        previous = {}
                source_path = offline.resolve_source_path(view.source, self.repo_path)
                fingerprint = (FINGERPRINT_KEY, metadata[FINGERPRINT_KEY])
                step, record = incremental.prepare(con, view, source_path, previous, fingerprint)
                if step.mode == "unchanged":
                    return self._materialized(target, pq.ParquetFile(target).metadata.num_rows, started, step)
                metadata[incremental.RECORD_KEY] = record
            if step.mode == "incremental":
                sql = incremental.incremental_sql(
                    view, str(target), scan, step.since_us, lambda source: compile_aggregation_sql(view, source)
                )
            else:
                sql = compile_aggregation_sql(view, scan)
            kv = ", ".join(f"{key}: {offline.quote_literal(value)}" for key, value in metadata.items())
            options = f"FORMAT parquet, COMPRESSION zstd, KV_METADATA {{{kv}}}"
            try:
                rows = con.execute(
                    f"COPY ({sql}) TO {offline.quote_literal(str(tmp))} ({options})"
                ).fetchall()[0][0]
                os.replace(tmp, target)
            except duckdb.Error as exc:
                raise RuntimeError(
                    f"materialize_offline({view_name!r}) failed; previous table kept: {exc}"
                ) from exc
            finally:
                tmp.unlink(missing_ok=True)
        return self._materialized(target, int(rows), started, step)

    @staticmethod
    def _materialized(target: Path, rows: int, started: float, step: incremental.Plan) -> dict:
        since = None if step.since_us is None else from_us(step.since_us).isoformat()
        return {
            "rows": int(rows),
            "path": str(target),
            "seconds": round(time.perf_counter() - started, 3),
            "mode": step.mode,
            "recomputed_from": since,
            "changed_files": step.changed_files,
        }

    @staticmethod
    def _table_metadata(con, path: Path) -> dict[str, str]:
        """A table file's Parquet key-value metadata."""
        return dict(
            con.execute(
                f"SELECT decode(key), decode(value) FROM parquet_kv_metadata({offline.quote_literal(str(path))})"
            ).fetchall()
        )

    # ---------------------------------------------------------------- internals

    def _connect(self):
        return offline.connect(
            threads=self.duckdb_threads,
            memory_limit=self.duckdb_memory_limit,
            temp_directory=self.repo_path / ".duckdb_tmp",
        )

    def _source_scan(self, view: FeatureView) -> str:
        path = offline.resolve_source_path(view.source, self.repo_path)
        return offline.scan_sql(path, view.source.file_format, what=f"feature view {view.name!r} source")

    def _check_source_columns(self, con, view: FeatureView, scan: str, needed: list[str]) -> None:
        what = f"feature view {view.name!r} source {view.source.path!r}"
        offline.require_columns(offline.relation_columns(con, scan, what=what), needed, what=what)

    def feature_table(self, con, view: FeatureView) -> offline.FeatureTable:
        """The view's values as a relation for `offline.point_in_time_sql`, on connection `con`:
        its materialized table (aggregated views; checked to be computed from the current
        definition) or its raw source. Raises NotMaterializedError when the table is missing or
        stale. Used by `get_historical_features` and by batch scoring's streaming joins."""
        if view.aggregations:
            path = self.offline_table_path(view.name)
            if not path.exists():
                raise NotMaterializedError(
                    f"feature view {view.name!r} is aggregated and has no offline table at {path}; run "
                    f"FeatureStore.materialize_offline({view.name!r}) first"
                )
            scan = offline.scan_sql(str(path), what=f"feature view {view.name!r} offline table")
            what = f"feature view {view.name!r} offline table {path}"
            stored = self._table_metadata(con, path).get(FINGERPRINT_KEY)
            if stored != view_fingerprint(view):
                raise NotMaterializedError(
                    f"{what} was computed from another definition of the view (its source, keys or "
                    f"aggregations changed); run FeatureStore.materialize_offline({view.name!r}) again"
                )
            return offline.materialized_feature_table(view, scan)
        scan = self._source_scan(view)
        src = view.source
        needed = [
            *view.join_keys,
            src.timestamp_field,
            *([src.created_timestamp_column] if src.created_timestamp_column else []),
        ]
        self._check_source_columns(con, view, scan, [*needed, *view.feature_names])
        return offline.raw_feature_table(view, scan)

    def numbered_feature_table(
        self, con, view: FeatureView
    ) -> tuple[offline.FeatureTable, list[Path]] | None:
        """The view's values as `feature_table` gives them (same checks), with one more column,
        `offline.FILE_ROW` = the row's number in its Parquet files (`offline.file_row_sql`), and
        those files in that order: an aggregated view's materialized table, or a raw Parquet source's
        files; None for a CSV source. Batch scoring joins on it and reads the values by row number
        (`serving.batch_positions`)."""
        self.feature_table(con, view)  # its checks: materialized from the current definition; the columns
        if view.aggregations:
            files = [str(self.offline_table_path(view.name))]
            what = f"feature view {view.name!r} offline table"
        elif view.source.file_format == "parquet":
            what = f"feature view {view.name!r} source"
            files = offline.parquet_files(
                con, offline.resolve_source_path(view.source, self.repo_path), what=what
            )
        else:
            return None
        scan = offline.scan_sql(files, what=what, file_row_number=True)
        row, _ = offline.file_row_sql(files)
        extra = [f"{row} AS {offline.FILE_ROW}"]
        if view.aggregations:
            table = offline.materialized_feature_table(view, scan, extra=extra)
        else:
            table = offline.raw_feature_table(view, scan, extra=extra)
        return table, [Path(f) for f in files]

    def _plan(
        self, features: list[str], full_feature_names: bool
    ) -> list[tuple[FeatureView, list[tuple[str, str]]]]:
        """Group feature refs by view: [(view, [(feature, output column), ...]), ...]."""
        if isinstance(features, str):
            features = [features]
        if not features:
            raise ValueError(
                "features is empty: pass 'view:feature' references, e.g. ['user_profile:home_country']"
            )
        by_view: dict[str, list[str]] = {}
        for ref in dict.fromkeys(features):
            view_name, feature = parse_feature_ref(ref)
            if view_name not in self._views:
                raise ValueError(
                    f"Feature reference {ref!r}: unknown feature view {view_name!r}; registered views: "
                    f"{sorted(self._views)}"
                )
            known = self._views[view_name].feature_names
            if feature not in known:
                raise ValueError(
                    f"Feature reference {ref!r}: feature view {view_name!r} has no feature {feature!r}; "
                    f"its features: {known}"
                )
            by_view.setdefault(view_name, []).append(feature)
        plan = []
        owners: dict[str, list[str]] = {}
        for view_name, names in by_view.items():
            pairs = [(n, f"{view_name}__{n}" if full_feature_names else n) for n in names]
            for n, out in pairs:
                owners.setdefault(out, []).append(view_name)
            plan.append((self._views[view_name], pairs))
        clashes = {out: views for out, views in owners.items() if len(views) > 1}
        if clashes:
            raise ValueError(
                f"feature name(s) {sorted(clashes)} come from more than one view ({clashes}); pass "
                "full_feature_names=True to get 'view__feature' column names"
            )
        return plan

    @staticmethod
    def _requested_order(features, plan) -> list[str]:
        """Output columns in the order the feature refs were given."""
        if isinstance(features, str):
            features = [features]
        out_by_ref = {f"{view.name}:{n}": out for view, pairs in plan for n, out in pairs}
        return [out_by_ref[ref] for ref in dict.fromkeys(features)]

    # ---------------------------------------------------------------- registry file

    def _save_registry(self) -> None:
        """Mirror the registry to registry.json (atomically), for other processes and the UI."""
        doc = {
            "entities": [_entity_to_dict(e) for e in self._entities.values()],
            "feature_views": [_view_to_dict(v) for v in self._views.values()],
        }
        write_text_atomic(self.repo_path / REGISTRY_FILE, json.dumps(doc, indent=2, sort_keys=True))

    def _load_registry(self, path: Path) -> None:
        try:
            doc = json.loads(path.read_text())
            self._entities = {d["name"]: _entity_from_dict(d) for d in doc.get("entities", [])}
            self._views = {
                d["name"]: _view_from_dict(d, self._entities) for d in doc.get("feature_views", [])
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"registry file {path} is unreadable ({exc}); delete it and apply() the definitions again"
            ) from exc


# ---------------------------------------------------------------- (de)serialization


def view_fingerprint(view: FeatureView) -> str:
    """A hash of what determines a materialized table's content (keys, source, aggregations), so a
    table computed from an older definition is never read as the current one. ttl and docs excluded."""
    doc = _view_to_dict(view)
    doc = {k: doc[k] for k in ("name", "source", "schema", "aggregations")}
    doc["join_keys"] = list(view.join_keys)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _td_to_seconds(span: timedelta | None) -> float | None:
    return None if span is None else span.total_seconds()


def _entity_to_dict(e: Entity) -> dict:
    return {
        "name": e.name,
        "join_keys": list(e.join_keys),
        "value_type": e.value_type.name,
        "description": e.description,
    }


def _entity_from_dict(d: dict) -> Entity:
    return Entity(
        d["name"],
        join_keys=d["join_keys"],
        value_type=ValueType[d["value_type"]],
        description=d["description"],
    )


def _view_to_dict(v: FeatureView) -> dict:
    src = v.source
    return {
        "name": v.name,
        "entities": [e.name for e in v.entities],
        "source": {
            "path": src.path,
            "timestamp_field": src.timestamp_field,
            "created_timestamp_column": src.created_timestamp_column,
            "file_format": src.file_format,
            "name": src.name,
        },
        "schema": [{"name": f.name, "dtype": f.dtype.name} for f in v.schema],
        "ttl_seconds": _td_to_seconds(v.ttl),
        "aggregations": [
            {
                "function": a.function,
                "window_seconds": a.window.total_seconds(),
                "column": a.column,
                "name": a.name,
                **({"decimals": a.decimals} if a.decimals is not None else {}),
            }
            for a in v.aggregations
        ],
        "description": v.description,
        "tags": dict(v.tags),
    }


def _view_from_dict(d: dict, entities: dict[str, Entity]) -> FeatureView:
    return FeatureView(
        name=d["name"],
        entities=[entities[n] for n in d["entities"]],
        source=FileSource(**d["source"]),
        schema=[Field(f["name"], ValueType[f["dtype"]]) for f in d["schema"]],
        ttl=None if d["ttl_seconds"] is None else timedelta(seconds=d["ttl_seconds"]),
        aggregations=[
            Aggregation(
                a["function"],
                timedelta(seconds=a["window_seconds"]),
                a["column"],
                a["name"],
                a.get("decimals"),
            )
            for a in d["aggregations"]
        ],
        description=d["description"],
        tags=d["tags"],
    )
