"""Where a stream worker's entries and time go: its counters (`WorkerStats`) and the clock that
adds each phase's time to them (`PhaseClock`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerStats:
    entries: int = 0
    predictions: int = 0
    labels: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    claimed: int = 0
    batches: int = 0
    retries: int = 0
    model_version: int | None = None
    started: float = field(default_factory=time.monotonic)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # the fold's parts (pack, script wait, cache, evaluate): the updater's own clock
    fold_seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.started
        return {
            "entries": self.entries,
            "predictions": self.predictions,
            "labels": self.labels,
            "duplicates": self.duplicates,
            "dead_letters": self.dead_letters,
            "claimed": self.claimed,
            "batches": self.batches,
            "retries": self.retries,
            "model_version": self.model_version,
            "seconds": round(seconds, 3),
            "entries_per_s": round(self.entries / seconds, 1) if seconds > 0 else 0.0,
            "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
            "fold_seconds": {k: round(v, 3) for k, v in self.fold_seconds.items()},
        }


class PhaseClock:
    """Adds the time since the previous lap to `totals[phase]` (where a worker's time goes)."""

    def __init__(self, totals: dict[str, float]):
        self.totals = totals
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now
