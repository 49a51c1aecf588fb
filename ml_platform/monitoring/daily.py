"""One day of monitoring over the platform's own storage (plain Python; the Dagster assets call it).

Where each monitor reads from:
- the served predictions: the prediction log (api, stream and batch, one dataset), kept to the
  transactions whose event falls on the day, one row per transaction (a transaction scored by
  several paths counts once: the online score if there is one, else batch);
- the champion and its reference: the MLflow registry (`monitoring/` artifacts of its run);
- the labels: all known by the end of the day (the label feed's arrivals, and the labels the raw
  events carried when they were written);
- the day's inputs when nothing was served: the raw events of the day with their point-in-time
  features (the same function training uses).
Each monitor's result is saved under data/monitoring/results/<monitor>/<day>.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from ml_platform import features as fr
from ml_platform.monitoring.config import MonitoringConfig
from ml_platform.monitoring.data_drift import data_drift
from ml_platform.monitoring.performance import model_performance
from ml_platform.monitoring.prediction_drift import prediction_drift
from ml_platform.monitoring.reference import MonitoringReference, load_model_reference
from ml_platform.monitoring.results import MonitorResult, save_result
from ml_platform.monitoring.serving_health import fetch_api_metrics, serving_health

# Which path's row stands for a transaction scored by several: what the customer saw first.
SOURCE_PRIORITY = ("api", "stream", "batch")


@dataclass
class MonitoringInputs:
    """Where one deployment keeps what monitoring reads, and its configuration."""

    registry: Any  # ml_platform.registry.ModelRegistry
    raw_dir: Path
    predictions_log_dir: Path
    monitoring_dir: Path
    data_dir: Path
    config: MonitoringConfig = field(default_factory=MonitoringConfig)
    store: Any = None  # the feature store: the day's features when nothing was served
    api_metrics_url: str | None = None
    _references: dict[int, MonitoringReference] = field(default_factory=dict, repr=False)

    def champion(self) -> tuple[int, MonitoringReference, Any]:
        """(version, reference, contract) of the current champion."""
        champion = self.registry.champion()
        if champion is None:
            raise LookupError(f"{self.registry.model_name} has no champion yet: run the training pipeline first")
        version = champion.version
        if version not in self._references:
            self._references[version] = load_model_reference(
                self.registry, version, self.monitoring_dir / "reference", self.data_dir
            )
        return version, self._references[version], self.registry.get_contract(version)


def served_predictions(log_dir: Path, first: date, last: date) -> pd.DataFrame:
    """The logged predictions of transactions whose event day is in [first, last], one row per
    transaction (by `SOURCE_PRIORITY`), with the model's input values as columns."""
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    # A prediction is logged on or after its event (api/stream partitions are the logging day;
    # a replay can log weeks later), so read from the first day on and keep the event days.
    log = read_prediction_log(log_dir, start=first, expand_features=True)
    if log.empty:
        return log
    event_day = pd.to_datetime(log[fr.EVENT_TS], utc=True).dt.date
    log = log[(event_day >= first) & (event_day <= last)]
    rank = log["source"].map({s: i for i, s in enumerate(SOURCE_PRIORITY)}).fillna(len(SOURCE_PRIORITY))
    log = log.assign(_rank=rank).sort_values(["_rank", "predicted_at"], kind="stable")
    return log.drop_duplicates("transaction_id", keep="first").drop(columns="_rank").reset_index(drop=True)


def model_inputs(frame: pd.DataFrame, contract) -> pd.DataFrame:
    """The model's input columns of logged rows (the columns the day lacks stay out: the drift
    library reports them missing)."""
    from ml_platform.serving.prediction_log_reader import model_input_frame

    return model_input_frame(frame, contract.input_columns)


def day_features_from_raw(store, raw_dir: Path, day: date, contract) -> pd.DataFrame:
    """The model inputs of every raw event of `day`, built as training builds them."""
    from ml_platform.sources import raw_events
    from ml_platform.training.dataset import events_with_features

    events = raw_events.read_days(raw_dir, [day])
    if events.empty:
        return contract.model_input(pd.DataFrame(columns=list(contract.input_columns)))
    return contract.model_input(events_with_features(store, events, contract.feature_refs))


def raw_transaction_ids(raw_dir: Path, first: date, last: date) -> pd.Series:
    """The ids of the raw events of the days in [first, last] that have a partition."""
    from ml_platform.sources import raw_events

    days = [d for d in raw_events.all_partition_days(raw_dir) if first <= d <= last]
    if not days:
        return pd.Series([], dtype="str", name="transaction_id")
    return raw_events.read_days(raw_dir, days)["transaction_id"]


def run_data_drift(inputs: MonitoringInputs, day: date) -> tuple[MonitorResult, Any]:
    version, reference, contract = inputs.champion()
    served = served_predictions(inputs.predictions_log_dir, day, day)
    note = f"{len(served)} served predictions"
    if served.empty and inputs.store is not None:
        from ml_platform.sources.raw_events import transactions_partition

        if any(transactions_partition(inputs.raw_dir, day).glob("*.parquet")):
            frame = day_features_from_raw(inputs.store, inputs.raw_dir, day, contract)
            note = "nothing served: the day's raw events with their point-in-time features"
        else:
            frame = model_inputs(served, contract)
            note = "nothing served and no raw events for the day"
    else:
        frame = model_inputs(served, contract)
    result, report = data_drift(
        reference, frame, day.isoformat(), inputs.config.drift, model_version=version, source_note=note
    )
    save_result(inputs.monitoring_dir, result)
    return result, report


def run_prediction_drift(inputs: MonitoringInputs, day: date) -> MonitorResult:
    version, reference, _ = inputs.champion()
    served = served_predictions(inputs.predictions_log_dir, day, day)
    result = prediction_drift(
        reference, served, day.isoformat(), inputs.config.prediction, inputs.config.drift, model_version=version
    )
    save_result(inputs.monitoring_dir, result)
    return result


def run_model_performance(inputs: MonitoringInputs, day: date) -> MonitorResult:
    from ml_platform.sources.generator import MAX_CHARGEBACK_DELAY_DAYS
    from ml_platform.sources.labels import read_known_labels

    version, reference, _ = inputs.champion()
    t = inputs.config.performance
    # Predictions far enough back that any label arriving today can find its prediction.
    first = day - timedelta(days=max(t.window_days, MAX_CHARGEBACK_DELAY_DAYS + 1))
    served = served_predictions(inputs.predictions_log_dir, first, day)
    labels = read_known_labels(inputs.raw_dir, until=day, events_since=first)
    known = raw_transaction_ids(inputs.raw_dir, day - timedelta(days=MAX_CHARGEBACK_DELAY_DAYS + 1), day)
    result = model_performance(
        served, labels, day, reference.metrics, t, known_transaction_ids=known, model_version=version
    )
    save_result(inputs.monitoring_dir, result)
    return result


def run_serving_health(inputs: MonitoringInputs, day: date) -> MonitorResult:
    from ml_platform.serving.prediction_log_reader import read_prediction_log

    log = read_prediction_log(inputs.predictions_log_dir, start=day, with_features=False)
    if len(log):
        log = log[pd.to_datetime(log["predicted_at"], utc=True).dt.date == day]  # served that day
    api_metrics, note = fetch_api_metrics(inputs.api_metrics_url)
    result = serving_health(log, day.isoformat(), inputs.config.serving, api_metrics=api_metrics, api_note=note)
    save_result(inputs.monitoring_dir, result)
    return result
