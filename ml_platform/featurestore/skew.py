"""Training-serving skew check: do the online store's values equal the offline store's
point-in-time values for the same entities at the same moment?

For each feature view, entities are sampled from the offline store's latest values at the moment
the online store was materialized (`as_of`); they are read online (values and event times, TTL
judged at `as_of`) and looked up offline with the point-in-time join that builds training sets
(`get_historical_features` at `as_of`). Any difference fails the check: a value that differs, a
value on one side and null on the other, an entity missing online, or a different event time.

Entities whose online value is newer than `as_of` (a stream update after the materialization)
are skipped and counted: the offline store cannot vouch for events it has not ingested yet.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from ml_platform.featurestore.definitions import FeatureView
from ml_platform.featurestore.online.codec import EVENT_TIMESTAMP
from ml_platform.values import is_missing

TIMESTAMP_FEATURE = "event_timestamp"  # the `feature` of a mismatch on event time
MAX_EXAMPLES = 50

# Kinds of mismatch, as reported in each example's "kind".
VALUE = "value"  # both sides have a value and they differ
NULL_VS_VALUE = "null_vs_value"  # one side null, the other not (TTL or a missing aggregate)
MISSING_ONLINE = "missing_online"  # the entity has no value online at all
TIMESTAMP = "timestamp"  # the value online is from another event than the offline one


@dataclass
class SkewReport:
    """The outcome of `check_online_offline_skew`: ok, how much was compared, what differed.

    `mismatches` keeps the first `MAX_EXAMPLES` examples ({view, entity, feature, kind, online,
    offline, online_ts, offline_ts}); `mismatch_count` counts them all.
    """

    ok: bool
    sampled: int
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    mismatch_count: int = 0
    mismatched_entities: int = 0
    compared_values: int = 0
    skipped_newer_online: int = 0
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One paragraph for a log line or a check's description."""
        if self.ok:
            text = (
                f"No skew: {self.sampled} entities across {len(self.views)} feature views, "
                f"{self.compared_values} values, online equals offline point-in-time."
            )
        else:
            head = (
                f"SKEW: {self.mismatch_count} mismatching values on {self.mismatched_entities} of "
                f"{self.sampled} sampled entities."
            )
            parts = [head]
            for view, stats in self.views.items():
                if stats["mismatches"]:
                    worst = ", ".join(f"{f} ({n})" for f, n in stats["by_feature"].items())
                    parts.append(f"{view}: {worst}.")
            parts += self.problems
            if self.mismatches:
                e = self.mismatches[0]
                parts.append(
                    f"E.g. {e['view']} {e['entity']} {e['feature']}: online {e['online']!r} "
                    f"(event time {_iso(e['online_ts'])}) vs offline {e['offline']!r} "
                    f"(event time {_iso(e['offline_ts'])})."
                )
            text = " ".join(parts)
        if self.skipped_newer_online:
            text += (
                f" {self.skipped_newer_online} sampled entities were skipped: updated online after the "
                "materialization (stream), not yet in the offline store."
            )
        return text

    def to_metadata(self) -> dict[str, Any]:
        """JSON-ready values for an asset check's metadata (timestamps as ISO strings)."""
        return {
            "ok": self.ok,
            "sampled_entities": self.sampled,
            "compared_values": self.compared_values,
            "mismatching_values": self.mismatch_count,
            "mismatching_entities": self.mismatched_entities,
            "skipped_newer_online": self.skipped_newer_online,
            "views": {name: _json_ready(stats) for name, stats in self.views.items()},
            "problems": list(self.problems),
            "examples": [_json_ready(e) for e in self.mismatches[:10]],
            "summary": self.summary(),
        }


def check_online_offline_skew(
    store,
    views: Sequence[str | FeatureView] | None = None,
    sample_size: int = 200,
    as_of: datetime | None = None,
    seed: int = 0,
    rtol: float = 1e-9,
) -> SkewReport:
    """Compare online values with the offline point-in-time values for up to `sample_size`
    entities per view (default: every registered view).

    `as_of`: the moment to compare at; default, per view, the `as_of` its last online
    materialization recorded. A view never materialized online fails the check. Numbers are
    equal within relative tolerance `rtol`; strings, nulls and event times must match exactly.
    """
    if sample_size < 1:
        raise ValueError(f"sample_size must be >= 1, got {sample_size}")
    chosen = [store.get_feature_view(v if isinstance(v, str) else v.name) for v in (views or [])] or (
        store.list_feature_views()
    )
    rng = np.random.default_rng(seed)
    report = SkewReport(ok=True, sampled=0)
    entities_with_mismatch = 0
    for view in chosen:
        meta = store.online_store.metadata(view.name)
        if not meta:
            report.problems.append(
                f"feature view {view.name!r} is not in the online store: run FeatureStore.materialize"
            )
            report.views[view.name] = _view_stats(None, 0, 0)
            continue
        at = _utc(as_of if as_of is not None else meta.get("as_of"))
        if at is None:
            raise ValueError(
                f"feature view {view.name!r}: its online materialization recorded no as_of (written "
                "without one); pass as_of= the moment the online values were computed for"
            )
        stats, entities_with_mismatch_view = _check_view(store, view, at, sample_size, rng, rtol, report)
        report.views[view.name] = stats
        entities_with_mismatch += entities_with_mismatch_view
    report.mismatched_entities = entities_with_mismatch
    report.ok = report.mismatch_count == 0 and not report.problems
    return report


def _check_view(
    store, view: FeatureView, at: datetime, sample_size: int, rng, rtol: float, report: SkewReport
):
    keys = list(view.join_keys)
    names = list(view.feature_names)
    latest = store.latest_features(view.name, at)
    stats = _view_stats(at, latest.num_rows, 0)
    if latest.num_rows == 0:
        return stats, 0
    picked = np.sort(rng.choice(latest.num_rows, size=min(sample_size, latest.num_rows), replace=False))
    sample = latest.take(picked).to_pylist()
    entity_rows = [{k: row[k] for k in keys} for row in sample]

    online = store.get_online_features(
        [f"{view.name}:{n}" for n in names],
        entity_rows,
        full_feature_names=True,
        include_event_timestamps=True,
        now=at,
    )
    online_ts = online[f"{view.name}__{EVENT_TIMESTAMP}"]
    compared = [i for i, ts in enumerate(online_ts) if ts is None or ts <= at]
    skipped = len(sample) - len(compared)
    report.skipped_newer_online += skipped
    stats["skipped_newer_online"] = skipped
    if not compared:
        return stats, 0

    # The training path: the point-in-time join, at the moment the online values are for.
    entity_df = pd.DataFrame({k: [entity_rows[i][k] for i in compared] for k in keys})
    entity_df[EVENT_TIMESTAMP] = pd.Timestamp(at)
    offline = store.get_historical_features(
        entity_df, [f"{view.name}:{n}" for n in names], full_feature_names=True
    )
    offline_values = {name: offline[f"{view.name}__{name}"].tolist() for name in names}  # not .iloc per cell
    by_feature: Counter[str] = Counter()
    bad_entities = 0
    for pos, i in enumerate(compared):
        entity = entity_rows[i]
        row_mismatches = []
        offline_ts, on_ts = sample[i][EVENT_TIMESTAMP], online_ts[i]
        if on_ts is None:
            row_mismatches.append((TIMESTAMP_FEATURE, MISSING_ONLINE, None, offline_ts))
        else:
            if on_ts != offline_ts:
                row_mismatches.append((TIMESTAMP_FEATURE, TIMESTAMP, on_ts, offline_ts))
            for name in names:
                on = online[f"{view.name}__{name}"][i]
                off = _scalar(offline_values[name][pos])
                report.compared_values += 1
                if not _same(on, off, rtol):
                    kind = NULL_VS_VALUE if _is_null(on) or _is_null(off) else VALUE
                    row_mismatches.append((name, kind, on, off))
        for feature, kind, on, off in row_mismatches:
            by_feature[feature] += 1
            report.mismatch_count += 1
            stats["mismatches"] += 1
            if len(report.mismatches) < MAX_EXAMPLES:
                report.mismatches.append(
                    {
                        "view": view.name,
                        "entity": dict(entity),
                        "feature": feature,
                        "kind": kind,
                        "online": on,
                        "offline": off,
                        "online_ts": on_ts,
                        "offline_ts": offline_ts,
                    }
                )
        bad_entities += bool(row_mismatches)
    report.sampled += len(compared)
    stats["sampled"] = len(compared)
    stats["mismatched_entities"] = bad_entities
    stats["by_feature"] = dict(by_feature.most_common())
    return stats, bad_entities


def _view_stats(at: datetime | None, offline_entities: int, sampled: int) -> dict[str, Any]:
    return {
        "as_of": at,
        "offline_entities": offline_entities,
        "sampled": sampled,
        "mismatches": 0,
        "mismatched_entities": 0,
        "skipped_newer_online": 0,
        "by_feature": {},
    }


def _utc(value: datetime | pd.Timestamp | str | None) -> datetime | None:
    if value is None:
        return None
    ts = pd.Timestamp(value)
    ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
    return ts.to_pydatetime().astimezone(UTC)


def _scalar(value: Any) -> Any:
    """A pandas cell as a plain Python value (None for any null)."""
    if is_missing(value) or value is pd.NA or value is pd.NaT:
        return None
    return value.item() if isinstance(value, np.generic) else value


def _is_null(value: Any) -> bool:
    return _scalar(value) is None


def _same(online: Any, offline: Any, rtol: float) -> bool:
    """Equal values: both null, equal strings/booleans, or numbers within `rtol`."""
    a, b = _scalar(online), _scalar(offline)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, str) or isinstance(b, str) or isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, datetime) or isinstance(b, datetime):
        return pd.Timestamp(a) == pd.Timestamp(b)
    return a == b or math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=0.0)


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return _iso(_scalar(value)) if not isinstance(value, (str, int, bool)) else value
