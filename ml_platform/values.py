"""Missing values at the JSON boundary: NaN (pandas/numpy's missing float) becomes None (null)."""

from __future__ import annotations

import math
from typing import Any


def is_missing(value: Any) -> bool:
    """None or a float NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def nan_to_none(value: Any) -> Any:
    """`value`, with a float NaN replaced by None (valid JSON, and what a reader means by 'no value')."""
    return None if isinstance(value, float) and math.isnan(value) else value
