"""What each daily monitor returns and keeps: a status, dashboard rows, numeric figures to plot
over time, JSON details; saved per monitor and day (data/monitoring/results/<monitor>/<day>.json),
the history the daily report plots and the retraining sensor reads."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from ml_platform.atomic_files import write_text_atomic
from ml_platform.monitoring.status import STATUSES


@dataclass(frozen=True)
class DashboardRow:
    """One line of the dashboard: `Latency p99 | > 200 ms | 145 ms | ok`."""

    metric: str
    threshold: str
    value: str
    status: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"DashboardRow {self.metric!r}: status {self.status!r} is not one of {STATUSES}")


@dataclass
class MonitorResult:
    monitor: str  # data_drift | prediction_drift | model_performance | serving_health
    day: str  # YYYY-MM-DD, the partition
    status: str
    rows: list[DashboardRow] = field(default_factory=list)
    metrics: dict[str, float | int | None] = field(default_factory=dict)  # plotted over time
    details: dict[str, Any] = field(default_factory=dict)  # JSON-safe
    model_version: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MonitorResult:
        rows = [DashboardRow(**r) for r in data.get("rows", [])]
        return cls(**{**data, "rows": rows})


def json_safe(value: Any) -> Any:
    """`value` with NaN/inf as None, numpy scalars as Python, tuples as lists, dates as text."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, date):
        return value.isoformat()
    return value


def results_dir(monitoring_dir: str | Path, monitor: str) -> Path:
    return Path(monitoring_dir) / "results" / monitor


def save_result(monitoring_dir: str | Path, result: MonitorResult) -> Path:
    """Write the result as <monitoring_dir>/results/<monitor>/<day>.json (temp file, then rename)."""
    path = results_dir(monitoring_dir, result.monitor) / f"{result.day}.json"
    return write_text_atomic(path, json.dumps(result.to_dict(), indent=1, allow_nan=False))


def load_result(monitoring_dir: str | Path, monitor: str, day: date | str) -> MonitorResult | None:
    path = results_dir(monitoring_dir, monitor) / f"{day}.json"
    if not path.exists():
        return None
    return MonitorResult.from_dict(json.loads(path.read_text()))


def load_history(monitoring_dir: str | Path, monitor: str, *, until: date | str | None = None,
                 days: int | None = None) -> list[MonitorResult]:
    """The monitor's saved results, oldest first, up to `until` (the last `days` of them)."""
    found = sorted(results_dir(monitoring_dir, monitor).glob("*.json"))
    if until is not None:
        found = [p for p in found if p.stem <= str(until)]
    if days is not None:
        found = found[-days:]
    return [MonitorResult.from_dict(json.loads(p.read_text())) for p in found]
