"""Experiments in the stream worker: a batch's events split between the active experiment's arms
(the same `ExperimentRouter` as the API, so the posteriors in Redis are shared), each arm's events
scored by its own version, and the decisions recorded so that rewards reach the arm that served.

A stream prediction's id is `stream-<event id>` (what its output and the prediction log say):
`POST /feedback` with it rewards the arm. The experiment's shadow is the API's concern: the
stream answers nobody waiting, so it scores live arms only.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from ml_platform.featurestore.streaming import EVENT_ID


def _take(values: Any, idx: np.ndarray) -> Any:
    if isinstance(values, np.ndarray):
        return values[idx]
    return [values[i] for i in idx.tolist()]


def arm_items(worker, active, transactions, done_keys, events, event_us, folded) -> list:
    """The prediction items of a batch routed by experiment `active` (an ActiveExperiment)."""
    assignment = worker.router.assign(len(events), active)
    items: list = []
    ids: list[str] = []
    arms: list[str] = []
    probabilities: list[float] = []
    for a, model in enumerate(active.models):
        idx = np.flatnonzero(assignment.arms == a)
        if not len(idx):
            continue
        positions = idx.tolist()
        before = {view: {f: _take(v, idx) for f, v in columns.items()} for view, columns in folded.before.items()}
        sub_events = [events[i] for i in positions]
        p = assignment.probabilities[idx]
        items += worker.items(
            model, [transactions[i] for i in positions], [done_keys[i] for i in positions], sub_events,
            event_us[idx], SimpleNamespace(before=before), experiment=(active.name, active.arm_names[a], p),
        )  # fmt: skip
        ids += [f"stream-{e[EVENT_ID]}" for e in sub_events]
        arms += [active.arm_names[a]] * len(positions)
        probabilities += p.tolist()
    worker.router.store.record_decisions_sync(active.name, ids, arms, probabilities, active.config.feedback_ttl_s)
    return items
