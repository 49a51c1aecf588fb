"""Shadow scoring: a shadow model version scores (a share of) the live requests' rows off the
request path, and its predictions go to the prediction log beside the live ones (role `shadow`).

The live response never waits for it and never sees its errors: the live batch is answered
first, then its rows, the feature values it read and its results are handed to one worker thread
here. At most `max_pending` batches wait for that thread; beyond that a batch is dropped and
counted (a shadow that hangs or is slower than the traffic costs shadow rows, never live latency).
A shadow that raises logs its rows with no score and the error in `flags`.

A shadow row's latency is what the row would have taken had the shadow served it: the batch's
feature read (shared) plus the shadow's own scoring time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from ml_platform.experiments.shadow_report import shadow_prediction_id
from ml_platform.serving.prediction_log import SHADOW, prediction_entry
from ml_platform.values import nan_to_none

_log = logging.getLogger(__name__)


class ShadowScorer:
    def __init__(
        self,
        append: Callable[[list[bytes]], None] | None,
        model_name: str,
        *,
        max_pending: int = 4,
        loop: asyncio.AbstractEventLoop | None = None,
    ):
        self.append = append  # the prediction log writer's append (called on the event loop)
        self.model_name = model_name
        self.max_pending = int(max_pending)
        self.loop = loop
        self.scored = 0
        self.errors = 0
        self.dropped = 0
        self.last_error: str | None = None
        self._pending = 0
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")

    def submit(
        self,
        model: Any,
        rows: Sequence[dict],
        looked_up: dict[str, list],
        live: Sequence[dict],
        read_ms: float,
        experiment: str,
    ) -> bool:
        """Queue one batch for the shadow (called on the event loop, returns at once); False when
        `max_pending` batches already wait (the batch is dropped and counted)."""
        with self._lock:
            if self._pending >= self.max_pending:
                self.dropped += len(rows)
                return False
            self._pending += 1
        loop = self.loop or asyncio.get_running_loop()
        self._executor.submit(self._run, loop, model, rows, looked_up, live, read_ms, experiment)
        return True

    def _run(self, loop, model, rows, looked_up, live, read_ms, experiment) -> None:
        try:
            entries = self._entries(model, rows, looked_up, live, read_ms, experiment)
            if self.append is not None and entries:
                loop.call_soon_threadsafe(self.append, entries)
        except Exception:  # noqa: BLE001 - nothing of the shadow may escape
            _log.exception("shadow scoring: building the log entries failed")
        finally:
            with self._lock:
                self._pending -= 1

    def _entries(self, model, rows, looked_up, live, read_ms, experiment) -> list[bytes]:
        started = time.perf_counter()
        error = None
        try:
            scored = model.scoring.score(rows, looked_up)
            probabilities = scored.probabilities.tolist()
            inputs = scored.inputs
        except Exception as exc:  # noqa: BLE001 - a failing shadow is reported, not raised
            error = f"{type(exc).__name__}: {exc}"[:500]
            self.errors += len(rows)
            self.last_error = error
            probabilities, inputs = [float("nan")] * len(rows), {}
        else:
            self.scored += len(rows)
        latency_ms = read_ms + (time.perf_counter() - started) * 1000.0
        threshold = model.contract.decision_threshold
        now = datetime.now(UTC)
        out = []
        for i, (row, result) in enumerate(zip(rows, live)):
            p = probabilities[i]
            out.append(
                prediction_entry(
                    prediction_id=shadow_prediction_id(result["prediction_id"]),
                    transaction=row,
                    model_name=self.model_name,
                    model_version=model.version,
                    probability=p,
                    decision=None if error else ("fraud" if p >= threshold else "legit"),
                    threshold=threshold,
                    scorer=model.scoring.name,
                    latency_ms=latency_ms,
                    flags={"error": error} if error else {},
                    features={c: nan_to_none(v[i]) for c, v in inputs.items()},
                    predicted_at=now,
                    role=SHADOW,
                    experiment=experiment,
                    arm=None,
                    selection_probability=None,
                )
            )
        return out

    @property
    def pending(self) -> int:
        return self._pending

    def status(self) -> dict[str, Any]:
        return {
            "scored": self.scored,
            "errors": self.errors,
            "dropped": self.dropped,
            "pending_batches": self._pending,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
