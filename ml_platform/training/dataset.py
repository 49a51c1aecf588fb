"""Training sets: labelled events + point-in-time features, a leak-free time split, a content hash.

The split respects *label latency*: a fraud label arrives days after the transaction, so a row may
be used for training only if its label was already known when the training window closed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from ml_platform.features import EVENT_TS, LABEL, LABEL_TS, add_request_features, feature_lookup_time


class HistoricalFeatureSource(Protocol):
    """What training needs from the feature store (Feast's `get_historical_features`)."""

    def get_historical_features(
        self, entity_df: pd.DataFrame, features: list[str], full_feature_names: bool = False
    ) -> pd.DataFrame: ...


def events_with_features(
    store: HistoricalFeatureSource, events: pd.DataFrame, feature_refs: Sequence[str]
) -> pd.DataFrame:
    """`events` (raw transaction columns) with their model features: looked up as of just before
    each `event_timestamp` (`features.feature_lookup_time`, the state serving sees), then the
    request-time features. Same rows, same order. Training and monitoring's "the day's inputs
    when nothing was served" both build features here."""
    events = events.copy()
    events[EVENT_TS] = pd.to_datetime(events[EVENT_TS], utc=True)
    lookup = events.copy()
    lookup[EVENT_TS] = feature_lookup_time(events[EVENT_TS])
    frame = store.get_historical_features(lookup, list(feature_refs), full_feature_names=False)
    if len(frame) != len(events):
        raise RuntimeError(
            f"Feature store returned {len(frame)} rows for {len(events)} events; "
            "get_historical_features must return exactly one row per entity row"
        )
    lost = [c for c in events.columns if c not in frame.columns]
    if lost:
        raise RuntimeError(
            f"Feature store dropped entity columns {lost}; it must pass entity_df columns through"
        )
    frame[EVENT_TS] = events[EVENT_TS].array  # positional: the store keeps row order
    return add_request_features(frame)


def build_training_frame(
    store: HistoricalFeatureSource, labelled_events: pd.DataFrame, feature_refs: Sequence[str]
) -> pd.DataFrame:
    """One row per labelled event: the event's own columns, its features as of just before
    `event_timestamp` (point in time, from the store: `features.feature_lookup_time`, the state
    serving sees) and the request-time features. Rows without a label are dropped.

    The result is sorted by event time (then `transaction_id` when present) so it is reproducible.
    """
    for col in (EVENT_TS, LABEL, LABEL_TS):
        if col not in labelled_events.columns:
            raise ValueError(
                f"labelled_events has no column {col!r}; it needs the raw transaction columns "
                f"(got {list(labelled_events.columns)})"
            )
    labelled = labelled_events[labelled_events[LABEL].notna()].copy()
    if labelled.empty:
        raise ValueError(
            f"No labelled events: every row has {LABEL!r} null (labels have not arrived yet); "
            "generate or wait for labelled data before training"
        )
    labelled[LABEL_TS] = pd.to_datetime(labelled[LABEL_TS], utc=True)
    frame = events_with_features(store, labelled, feature_refs)
    frame[LABEL] = frame[LABEL].astype("int64")
    sort_keys = [EVENT_TS] + (["transaction_id"] if "transaction_id" in frame.columns else [])
    return frame.sort_values(sort_keys, kind="mergesort").reset_index(drop=True)


@dataclass(frozen=True)
class TimeSplit:
    """Train / validation / test frames and the cut times that define them (see `time_split`)."""

    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    train_cut: pd.Timestamp  # t1
    validation_cut: pd.Timestamp  # t2
    as_of: pd.Timestamp
    rows_without_known_label: int  # labelled rows left out because their label arrived too late

    def summary(self) -> dict:
        return {
            "train_rows": len(self.train),
            "validation_rows": len(self.validation),
            "test_rows": len(self.test),
            "train_positives": int(self.train[LABEL].sum()),
            "validation_positives": int(self.validation[LABEL].sum()),
            "test_positives": int(self.test[LABEL].sum()),
            "train_cut": self.train_cut.isoformat(),
            "validation_cut": self.validation_cut.isoformat(),
            "as_of": self.as_of.isoformat(),
            "rows_without_known_label": self.rows_without_known_label,
        }


def time_split(
    frame: pd.DataFrame,
    as_of: pd.Timestamp | str | None = None,
    train_frac: float = 0.6,
    val_frac: float = 0.2,
    strict_validation: bool = False,
    settling: pd.Timedelta | None = None,
) -> TimeSplit:
    """Split by event time with no label leakage.

    Cut times t1 < t2 are the `train_frac` and `train_frac + val_frac` quantiles of the event
    times of the rows whose label is known at `as_of` (default: the latest label time), so
    t1 < t2 <= as_of. A row goes to
      train       if event_ts <  t1           and label_ts <= t1      (label known at the cut)
      validation  if t1 <= event_ts < t2      and label_ts <= as_of   (<= t2 if strict_validation)
      test        if t2 <= event_ts <= as_of  and label_ts <= as_of
    The model is fitted only on labels that existed when its training window closed, and is
    tested on later events. Validation labels only pick the decision threshold and concern events
    before every test event; by default they may arrive up to `as_of`, because with label latency
    longer than the validation window (legit labels settle after ~7 days) `label_ts <= t2` leaves
    the validation split nearly empty. Rows failing their label condition are dropped (counted in
    `rows_without_known_label`), never moved to a later split.

    With `settling` (how long after an event its legit label arrives: `features.LABEL_SETTLING`),
    validation and test keep only *mature* events, event_ts <= as_of - settling: a younger event
    is labelled only if it was charged back early, so those rows are nearly all frauds and would
    inflate the metrics the model is judged (and later monitored) by.
    """
    _check_split_args("time_split", frame, train_frac, val_frac)
    event_ts = pd.to_datetime(frame[EVENT_TS], utc=True)
    label_ts = pd.to_datetime(frame[LABEL_TS], utc=True)
    has_label = frame[LABEL].notna() & label_ts.notna()
    if as_of is None:
        if not has_label.any():
            raise ValueError("time_split: no row has a label and a label_timestamp")
        as_of_ts = label_ts[has_label].max()
    else:
        as_of_ts = _utc(as_of)

    known = has_label & (label_ts <= as_of_ts) & (event_ts <= as_of_ts)
    times = event_ts[known].sort_values().reset_index(drop=True)
    n = len(times)
    if n < 3:
        raise ValueError(
            f"time_split: only {n} rows have a label known by {as_of_ts.isoformat()}; need at least 3"
        )
    t1 = times.iloc[int(n * train_frac)]
    t2 = times.iloc[min(int(n * (train_frac + val_frac)), n - 1)]
    if not t1 < t2:
        raise ValueError(
            f"time_split: train and validation cuts coincide at {t1.isoformat()} (too few distinct event "
            "times); use more data or other fractions"
        )

    in_train = has_label & (event_ts < t1) & (label_ts <= t1)
    mature = event_ts <= (as_of_ts - pd.Timedelta(settling) if settling is not None else as_of_ts)
    in_val = (
        has_label & (event_ts >= t1) & (event_ts < t2) & (label_ts <= (t2 if strict_validation else as_of_ts))
        & mature
    )
    in_test = has_label & (event_ts >= t2) & (event_ts <= as_of_ts) & (label_ts <= as_of_ts) & mature
    in_window = has_label & (event_ts <= as_of_ts)
    return _masked_split(frame, in_train, in_val, in_test, in_window, t1, t2, as_of_ts)


DRIFT_SPLIT_MIN_FRAUDS = 8  # fewer post-drift frauds: the cuts are quantiles of all the rows


def drift_split(
    frame: pd.DataFrame,
    since: pd.Timestamp | str,
    as_of: pd.Timestamp | str,
    settling: pd.Timedelta,
    train_frac: float = 0.5,
    val_frac: float = 0.25,
    history: pd.Timedelta | None = None,
) -> TimeSplit:
    """The split of a retrain after a drift that started at `since`: learn the new world, judge on it.

    The *mature* post-drift rows are the events in [since, as_of - settling] with a known label:
    every legit label of those events has arrived (`settling`: `features.LABEL_SETTLING`), so their
    fraud share is not inflated by the early chargebacks of recent events. Cut times t1 < t2 are the
    `train_frac` and `train_frac + val_frac` quantiles of the event times of their frauds (of all of
    them when fewer than DRIFT_SPLIT_MIN_FRAUDS are frauds), so each split gets its share of the few
    post-drift frauds; a row goes to
      train       if since - history <= event_ts < since  (the labelled history just before the drift:
                                         what did not change is still learnt from it; all of it when
                                         `history` is None) or since <= event_ts < t1, mature
      validation  if t1 <= event_ts < t2, mature   (the threshold is chosen in the new world)
      test        if t2 <= event_ts, mature        (the promotion gate compares on these rows)
    with labels known at `as_of`. Events after `as_of - settling` (only their early chargebacks are
    known) and before `since - history` are left out and counted in `rows_without_known_label`.
    """
    _check_split_args("drift_split", frame, train_frac, val_frac)
    since_ts, as_of_ts = _utc(since), _utc(as_of)
    mature_end = as_of_ts - pd.Timedelta(settling)
    if not since_ts < mature_end:
        raise ValueError(
            f"drift_split: no post-drift event is mature yet (drift since {since_ts.isoformat()}, labels "
            f"settle {pd.Timedelta(settling)} after the event, as_of {as_of_ts.isoformat()})"
        )
    event_ts = pd.to_datetime(frame[EVENT_TS], utc=True)
    label_ts = pd.to_datetime(frame[LABEL_TS], utc=True)
    known = frame[LABEL].notna() & label_ts.notna() & (label_ts <= as_of_ts)
    post = known & (event_ts >= since_ts) & (event_ts <= mature_end)
    frauds = post & (frame[LABEL] == 1)
    # Cut by the frauds' event times when there are enough of them: a few days of post-drift data
    # hold a few dozen frauds, and cuts by row count can leave the test quarter with a handful.
    by_frauds = int(frauds.sum()) >= DRIFT_SPLIT_MIN_FRAUDS
    times = event_ts[frauds if by_frauds else post].sort_values().reset_index(drop=True)
    n = len(times)
    if int(post.sum()) < 3:
        raise ValueError(
            f"drift_split: only {int(post.sum())} mature labelled rows from {since_ts.isoformat()} to "
            f"{mature_end.isoformat()}; need at least 3"
        )
    t1 = times.iloc[int(n * train_frac)]
    t2 = times.iloc[min(int(n * (train_frac + val_frac)), n - 1)]
    if not since_ts < t1 < t2:
        raise ValueError(
            f"drift_split: the post-drift cuts coincide ({t1.isoformat()}, {t2.isoformat()}): too few distinct "
            "event times after the drift; wait for more labelled data"
        )
    oldest = since_ts - pd.Timedelta(history) if history is not None else event_ts.min()
    in_train = known & (((event_ts >= oldest) & (event_ts < since_ts)) | (post & (event_ts < t1)))
    in_val = post & (event_ts >= t1) & (event_ts < t2)
    in_test = post & (event_ts >= t2)
    in_window = frame[LABEL].notna() & label_ts.notna() & (event_ts <= as_of_ts)
    return _masked_split(frame, in_train, in_val, in_test, in_window, t1, t2, as_of_ts)


def _check_split_args(name: str, frame: pd.DataFrame, train_frac: float, val_frac: float) -> None:
    if not (0 < train_frac < 1 and 0 < val_frac < 1 and train_frac + val_frac < 1):
        raise ValueError(
            f"{name} needs 0 < train_frac, 0 < val_frac and train_frac + val_frac < 1 "
            f"(got train_frac={train_frac}, val_frac={val_frac}); the rest is the test split"
        )
    for col in (EVENT_TS, LABEL, LABEL_TS):
        if col not in frame.columns:
            raise ValueError(f"{name}: frame has no column {col!r}")


def _masked_split(frame: pd.DataFrame, in_train, in_val, in_test, in_window, t1, t2, as_of_ts) -> TimeSplit:
    """The TimeSplit of boolean row masks; rows of `in_window` in none of them are counted dropped."""
    dropped = int((in_window & ~(in_train | in_val | in_test)).sum())
    return TimeSplit(
        train=frame[in_train.to_numpy()].reset_index(drop=True),
        validation=frame[in_val.to_numpy()].reset_index(drop=True),
        test=frame[in_test.to_numpy()].reset_index(drop=True),
        train_cut=t1,
        validation_cut=t2,
        as_of=as_of_ts,
        rows_without_known_label=dropped,
    )


def _utc(value: pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def data_version(frame: pd.DataFrame) -> str:
    """A 16-hex-digit content hash of a training set, independent of row order and column order.

    Each row is hashed (pandas' fixed-key `hash_pandas_object`, stable across processes) over the
    columns sorted by name; the sorted row hashes plus the column names are then SHA-256'd.
    Timestamps are normalised to UTC nanoseconds first, so the storage unit (us/ns) does not matter;
    a different dtype for the same numbers (int vs float) does give another version.
    """
    cols = sorted(map(str, frame.columns))
    norm = pd.DataFrame(index=range(len(frame)))
    for col in cols:
        series = frame[col].reset_index(drop=True)
        if isinstance(series.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(series.dtype):
            series = pd.to_datetime(series, utc=True).astype("datetime64[ns, UTC]")
        norm[col] = series
    row_hashes = np.sort(pd.util.hash_pandas_object(norm, index=False).to_numpy(dtype="uint64"))
    digest = hashlib.sha256()
    digest.update("\x1f".join(cols).encode())
    digest.update(row_hashes.tobytes())
    return digest.hexdigest()[:16]
