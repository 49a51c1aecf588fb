"""What a scenario is: which days, which population, where the drift starts (plain data).

Day 1 of a scenario is the first day served by the initial champion; that champion is trained by
`training_pipeline` on `history_days` of events before it (the demo's default history: the features'
37-day warm-up and a month of steady state), so monitoring compares day 1 on with a model that
has seen a full history. The scenario's days end yesterday (UTC), like the demo's.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from ml_platform.settings import SyntheticDefaults

SCENARIOS = ("drift", "quiet")
DEFAULT_DAYS = 60
DEFAULT_DRIFT_DAY = 40


@dataclass(frozen=True)
class ScenarioPlan:
    name: str
    days: int = DEFAULT_DAYS
    drift_day: int = DEFAULT_DRIFT_DAY  # the drift scenario's onset (1-based day number)
    history_days: int = SyntheticDefaults.demo_days
    n_users: int = SyntheticDefaults.n_users
    n_merchants: int = SyntheticDefaults.n_merchants
    txns_per_user_per_day: float = SyntheticDefaults.txns_per_user_per_day
    fraud_rate: float = SyntheticDefaults.fraud_rate
    seed: int = SyntheticDefaults.seed
    end: dt.date | None = None  # the last scenario day (default: yesterday, UTC)

    def __post_init__(self) -> None:
        if self.name not in SCENARIOS:
            raise ValueError(f"scenario name {self.name!r} is not one of {SCENARIOS}")
        if not 2 <= self.days <= 366:
            raise ValueError(f"scenario days = {self.days} must be in [2, 366]")
        if not 2 <= self.drift_day <= self.days:
            raise ValueError(f"scenario drift_day = {self.drift_day} must be in [2, days={self.days}]")
        if self.history_days < SyntheticDefaults.min_demo_days:
            raise ValueError(f"scenario history_days = {self.history_days} must be >= "
                             f"{SyntheticDefaults.min_demo_days} (the initial champion's training history)")
        if self.end is None:
            object.__setattr__(self, "end", dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1))

    @property
    def drifts(self) -> bool:
        return self.name == "drift"

    def day(self, number: int) -> dt.date:
        """The date of scenario day `number` (1-based)."""
        return self.end - dt.timedelta(days=self.days - number)

    @property
    def first_day(self) -> dt.date:
        return self.day(1)

    @property
    def history_start(self) -> dt.date:
        return self.first_day - dt.timedelta(days=self.history_days)

    @property
    def history_end(self) -> dt.date:
        return self.first_day - dt.timedelta(days=1)

    @property
    def onset(self) -> dt.date | None:
        """The first drifted day (None: the quiet scenario)."""
        return self.day(self.drift_day) if self.drifts else None

    def number(self, day: dt.date) -> int:
        return (day - self.first_day).days + 1

    def event_source(self) -> dict:
        """The `event_source` resource's fields for this scenario (always the generator)."""
        return {
            "kind": "synthetic",
            "seed": self.seed,
            "n_users": self.n_users,
            "n_merchants": self.n_merchants,
            "txns_per_user_per_day": self.txns_per_user_per_day,
            "fraud_rate": self.fraud_rate,
            "drift_start": self.onset.isoformat() if self.onset else None,
        }

    def to_dict(self) -> dict:
        return {
            "name": self.name, "days": self.days, "drift_day": self.drift_day if self.drifts else None,
            "onset": self.onset.isoformat() if self.onset else None, "first_day": self.first_day.isoformat(),
            "last_day": self.end.isoformat(), "history_days": self.history_days,
            "history_start": self.history_start.isoformat(), "n_users": self.n_users,
            "n_merchants": self.n_merchants, "txns_per_user_per_day": self.txns_per_user_per_day,
            "fraud_rate": self.fraud_rate, "seed": self.seed,
        }
