"""The promotion rule: a challenger replaces the champion only if it is strictly better, by more
than the margin, on the same held-out rows. Pure: no MLflow, testable with two numbers."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ml_platform.training.evaluate import HIGHER_IS_BETTER


@dataclass(frozen=True)
class PromotionDecision:
    """The outcome of comparing a challenger with the champion on the same held-out data."""

    promoted: bool
    reason: str
    metric: str
    challenger_version: int
    challenger_metric: float | None
    champion_metric: float | None
    champion_version_before: int | None
    margin: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_promotion_metric(metric: str) -> None:
    if metric not in HIGHER_IS_BETTER:
        raise ValueError(f"Unknown promotion metric {metric!r}; use one of {sorted(HIGHER_IS_BETTER)}")


def decide(
    metric: str,
    margin: float,
    challenger_metric: float | None,
    champion_metric: float | None,
    champion_version: int | None,
) -> tuple[bool, str]:
    """(promoted, reason) for a challenger scoring `challenger_metric` against a champion
    (`champion_version` None: there is none) scoring `champion_metric`, both on the same rows.

    Promotion needs an improvement strictly greater than `margin` (in the metric's better
    direction): a tie keeps the champion, so re-training on identical data does not churn the
    registry or the audit trail.
    """
    check_promotion_metric(metric)
    if challenger_metric is None:
        return False, f"{metric} is undefined on the held-out frame (it has a single class)"
    if champion_version is None:
        return True, "no champion yet"
    if champion_metric is None:
        return True, f"champion's {metric} is undefined on the held-out frame"
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    gain = sign * (challenger_metric - champion_metric)
    promoted = gain > margin
    verdict = "promoted" if promoted else "champion kept"
    return promoted, (
        f"challenger {metric} {challenger_metric:.4f} vs champion v{champion_version} "
        f"{champion_metric:.4f}: improvement {gain:+.4f} {'>' if promoted else '<='} required margin "
        f"{margin:.4f} ({verdict}{'' if promoted or gain < margin else ': a tie does not promote'})"
    )
