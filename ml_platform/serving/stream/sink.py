"""The stream worker's writer thread: a batch's writes (online update + emit) run here while the
worker reads and folds the next batch. One job at a time, in order; a failed job is raised in the
worker's thread (as `SinkError`) before the next one is handed over."""

from __future__ import annotations

import threading
from collections.abc import Callable


class SinkError(RuntimeError):
    """Writing a batch (online update or emit) failed in the sink thread; its entries stay pending."""


class BatchSink:
    """One background thread that runs the worker's write jobs, one at a time, in order."""

    def __init__(self, write: Callable, name: str):
        self._write = write
        self._jobs: list = []
        self._cond = threading.Condition()
        self._busy = False
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"stream-sink-{name}", daemon=True)
        self._thread.start()

    def submit(self, job) -> None:
        """Wait for the previous job (raising its error), then hand this one over."""
        self.wait()
        with self._cond:
            self._jobs.append(job)
            self._busy = True
            self._cond.notify_all()

    def wait(self) -> None:
        """Wait until the job in hand is written; raises SinkError if it failed."""
        with self._cond:
            while self._busy:
                self._cond.wait()
            error, self._error = self._error, None
        if error is not None:
            raise SinkError(f"writing a batch failed: {type(error).__name__}: {error}") from error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if self._closed and not self._jobs:
                    return
                job = self._jobs.pop(0)
            try:
                self._write(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the worker thread by wait()
                with self._cond:
                    self._error = exc
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
