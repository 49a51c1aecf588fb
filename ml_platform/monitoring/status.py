"""The statuses every monitor reports, in order of severity, and how they combine.

ok:      measured, nothing to see;
pending: not measurable yet, and expected to become so (labels still arriving);
no_data: nothing to measure (no predictions that day): not ok, not an alarm;
warn:    a change that is statistically real but small, or close to a threshold;
alert:   a change that is both significant and large enough to act on.
"""

from __future__ import annotations

from collections.abc import Iterable

OK, PENDING, NO_DATA, WARN, ALERT = "ok", "pending", "no_data", "warn", "alert"
STATUSES = (OK, PENDING, NO_DATA, WARN, ALERT)  # least to most severe
_RANK = {s: i for i, s in enumerate(STATUSES)}


def worst(statuses: Iterable[str], default: str = OK) -> str:
    """The most severe of `statuses` (`default` when there are none)."""
    found = [s for s in statuses]
    for s in found:
        if s not in _RANK:
            raise ValueError(f"unknown status {s!r}; one of {STATUSES}")
    return max(found, key=_RANK.__getitem__) if found else default


def is_alarm(status: str) -> bool:
    """warn or alert: what a check reports as failed."""
    return status in (WARN, ALERT)
