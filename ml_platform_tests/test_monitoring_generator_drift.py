"""Each kind of shift of the generator's drift switch, injected alone, is seen by the drift library
(with the platform's daily thresholds) on the right column with the right status; the same days
without a shift alert on nothing."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest

from ml_platform.monitoring import detect_drift
from ml_platform.monitoring.config import MonitoringConfig
from ml_platform.sources.generator import DriftScenario, GeneratorConfig, generate_day

START = dt.date(2025, 5, 1)
ONSET = START + dt.timedelta(days=21)
COLUMNS = ["amount", "merchant_category", "country", "device", "channel", "hour_of_day"]
THRESHOLDS = MonitoringConfig().drift
BASE = {"seed": 3, "n_users": 2500, "n_merchants": 300, "start": START, "days": 30}
SCENARIOS = {
    "amount": DriftScenario(ONSET, amount_scale=1.5, new_category_share=0.0, fraud_pattern=None),
    "new_category": DriftScenario(ONSET, amount_scale=1.0, new_category_share=0.08, fraud_pattern=None),
    "fraud_pattern": DriftScenario(ONSET, amount_scale=1.0, new_category_share=0.0, fraud_pattern="card_testing"),
}


def _inputs(config: GeneratorConfig, days: list[dt.date]) -> pd.DataFrame:
    frame = pd.concat([generate_day(config, d) for d in days], ignore_index=True)
    return frame.assign(hour_of_day=frame["event_timestamp"].dt.hour)[COLUMNS]


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    """Two weeks before the onset (identical in every scenario: the drift changes nothing before it)."""
    return _inputs(GeneratorConfig(**BASE), [START + dt.timedelta(days=i) for i in range(14)])


def _statuses(reference: pd.DataFrame, current: pd.DataFrame) -> dict[str, str]:
    report = detect_drift(reference, current, thresholds=THRESHOLDS)
    return dict(zip(report.to_frame()["feature"], report.to_frame()["status"], strict=True))


@pytest.mark.parametrize("day_offset", [14, 17, 20])
def test_unshifted_days_of_the_same_period_alert_on_nothing(reference, day_offset):
    current = _inputs(GeneratorConfig(**BASE), [START + dt.timedelta(days=day_offset)])
    statuses = _statuses(reference, current)
    assert "alert" not in statuses.values(), statuses


def test_amounts_scaled_alert_on_amount_only(reference):
    config = GeneratorConfig(**BASE, drift=SCENARIOS["amount"])
    statuses = _statuses(reference, _inputs(config, [ONSET + dt.timedelta(days=1)]))
    assert statuses["amount"] == "alert"
    assert {c: s for c, s in statuses.items() if s == "alert"} == {"amount": "alert"}


def test_a_new_merchant_category_alerts_on_merchant_category_and_names_it(reference):
    config = GeneratorConfig(**BASE, drift=SCENARIOS["new_category"])
    current = _inputs(config, [ONSET + dt.timedelta(days=1)])
    report = detect_drift(reference, current, thresholds=THRESHOLDS)
    column = report["merchant_category"]
    assert column.status == "alert"
    assert column.unseen_categories == 2  # crypto_exchange and digital_wallet
    assert column.unseen_share == pytest.approx(
        current["merchant_category"].isin(["crypto_exchange", "digital_wallet"]).mean()
    )
    statuses = _statuses(reference, current)
    assert statuses["amount"] != "alert"


def test_a_changed_fraud_pattern_does_not_move_the_inputs(reference):
    """Fraud is ~1 % of the rows: a new fraud pattern is a job for labelled performance, and the
    input drift monitor must not cry wolf over it."""
    config = GeneratorConfig(**BASE, drift=SCENARIOS["fraud_pattern"])
    statuses = _statuses(reference, _inputs(config, [ONSET + dt.timedelta(days=1)]))
    assert "alert" not in statuses.values(), statuses
