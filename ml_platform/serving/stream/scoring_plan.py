"""How the stream worker scores a batch with one model version: which of the model's feature refs
come from the stream's own buffers (the fold's as-of-before values) and which from the online
store (views the stream does not update, with each view's TTL applied at the event time), and
the one call of the model's scoring path on the batch's columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd

from ml_platform import features as fr
from ml_platform.featurestore.definitions import parse_feature_ref
from ml_platform.featurestore.online import OnlineStoreError, RedisOnlineStore
from ml_platform.serving.fast_scorer import EVENT_US
from ml_platform.serving.scoring import assemble_features
from ml_platform.serving.stream.events import EVENT_TIME
from ml_platform.timestamps import from_us, span_us

# Looked-up features are read as of just before the event (features.feature_lookup_time).
LOOKUP_OFFSET_US = span_us(fr.FEATURE_LOOKUP_OFFSET)


@dataclass(frozen=True)
class ScoringPlan:
    """Which of a model's feature refs come from the stream buffers and which from the online store."""

    stream_refs: tuple[tuple[str, str], ...]
    online_refs: tuple[str, ...]
    online_views: tuple[tuple[str, tuple[str, ...], int | None], ...]  # (view, features, TTL in µs)
    request_columns: tuple[str, ...]  # the request's columns other than amount and time (score_columns)
    transaction_columns: tuple[str, ...]  # the columns of the transactions frame (bare LoadedModel)

    @classmethod
    def of(cls, model, stream_views: Sequence[str], online: RedisOnlineStore) -> ScoringPlan:
        stream, online_refs = [], []
        by_view: dict[str, list[str]] = {}
        for ref in model.contract.feature_refs:
            view, feature = parse_feature_ref(ref)
            if view in stream_views:
                stream.append((view, feature))
            else:
                online_refs.append(ref)
                by_view.setdefault(view, []).append(feature)
        views = []
        for view, feats in by_view.items():
            definition = online.views.get(view)
            if definition is None:
                raise ValueError(
                    f"model v{model.version} reads feature view {view!r}, which the online store does not define"
                )
            if not online.metadata(view):
                raise OnlineStoreError(
                    f"feature view {view!r} (read by model v{model.version}) is not in the online store of project "
                    f"{online.project!r}; materialize it (FeatureStore.materialize / `ml-platform materialize`) first"
                )
            views.append((view, tuple(feats), span_us(definition.ttl) if definition.ttl else None))
        request = [
            c for c in (*model.contract.request_columns, "country") if c not in ("amount", fr.EVENT_TS)
        ]
        columns = [
            "transaction_id",
            "user_id",
            "merchant_id",
            *[c for c in fr.REQUEST_COLUMNS if c != fr.EVENT_TS],
        ]
        return cls(
            tuple(stream),
            tuple(online_refs),
            tuple(views),
            tuple(dict.fromkeys(request)),
            tuple(dict.fromkeys(columns)),
        )

    def score(
        self, model, events: list[dict], event_us: np.ndarray, folded, online: RedisOnlineStore
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Fraud probabilities for the batch and the looked-up features the model saw (feature ->
        the fold's float64 array, NaN for null, or the online store's list, None for null).
        `event_us`: the events' times (int64 µs since the epoch); `folded`: the batch's fold.

        One call of the model's scoring path on the batch's columns (a fast_scorer.ScoringPath's
        `score_columns`) or, for a bare LoadedModel, assemble_features + predict_proba."""
        looked_up: dict[str, Any] = {
            feature: folded.before[view][feature] for view, feature in self.stream_refs
        }
        if self.online_refs:
            looked_up.update(self.online_features(online, events, event_us))
        n = len(events)
        if hasattr(model, "score_columns"):
            request: dict[str, Any] = {
                "amount": np.fromiter([e["amount"] for e in events], np.float64, n),
                EVENT_US: event_us,
            }
            for column in self.request_columns:
                request[column] = [e.get(column) for e in events]
            return model.score_columns(request, looked_up), looked_up
        tx = pd.DataFrame({c: [e[c] for e in events] for c in self.transaction_columns})
        tx[fr.EVENT_TS] = pd.to_datetime(event_us, unit="us", utc=True)
        frame = assemble_features(tx, looked_up)
        return np.asarray(model.predict_proba(frame), dtype=np.float64), looked_up

    def online_features(
        self, online: RedisOnlineStore, events: list[dict], event_us: np.ndarray
    ) -> dict[str, list]:
        """The online store's values of the views the stream does not update, as of each event:
        a value older than the view's TTL at the event time is null (the offline join's rule).
        The events themselves are the entity rows (they hold the join keys)."""
        # now=0: no wall-clock TTL filter here; the TTL is applied per event time below.
        answer = online.read(self.online_refs, events, include_event_timestamps=True, now=0.0)
        out: dict[str, list] = {}
        for view, features, ttl_us in self.online_views:
            stale = None
            if ttl_us is not None:  # (unknown entities are null already: no event timestamp, no value)
                span = ttl_us + LOOKUP_OFFSET_US
                # A value at least this new is within the TTL at every event of the batch: only
                # older ones are compared with their own event's time.
                bound = from_us(int(event_us.max()) - span)
                span_td = timedelta(microseconds=span)
                stale = [
                    ts is not None and ts < bound and ts < e[EVENT_TIME] - span_td
                    for ts, e in zip(answer[f"{view}__event_timestamp"], events)
                ]
                if not any(stale):
                    stale = None
            for feature in features:
                values = answer[feature]
                out[feature] = values if stale is None else [None if s else v for v, s in zip(values, stale)]
        return out
