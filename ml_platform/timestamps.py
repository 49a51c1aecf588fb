"""Time as integer microseconds since the Unix epoch (UTC): the one conversion every layer uses.

The online store, the stream buffers, the fast scorer and the stream worker all keep event times
as int µs; these helpers are the only place that turns datetimes, pandas Timestamps, ISO strings
and timedeltas into that form and back. A naive time is taken as UTC everywhere.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US_PER_SECOND = 1_000_000


def span_us(span: timedelta) -> int:
    """A timedelta as whole µs (exact: no float round trip)."""
    return (span.days * 86400 + span.seconds) * US_PER_SECOND + span.microseconds


def to_us(value: Any) -> int | None:
    """A timestamp (datetime, pandas Timestamp, numpy datetime64, ISO-8601 string, or int µs) as
    int µs since the epoch, UTC; naive values are taken as UTC. None/NaT -> None."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if isinstance(value, np.datetime64):
        if np.isnat(value):
            return None
        return int(value.astype("datetime64[us]").astype(np.int64))
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is None:
            value = value.tz_localize("UTC")
        return value.value // 1000
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return span_us(value - EPOCH)
    raise TypeError(f"not a timestamp: {value!r}")


def from_us(us: int) -> datetime:
    """int µs since the epoch -> an aware UTC datetime."""
    return EPOCH + timedelta(microseconds=int(us))


def now_us(now: datetime | float | None = None) -> int:
    """`now` (a datetime, or float seconds since the epoch; default: the wall clock) as int µs."""
    if now is None:
        return time.time_ns() // 1000
    if isinstance(now, datetime):
        return to_us(now)  # type: ignore[return-value]
    return round(float(now) * US_PER_SECOND)
