"""What an experiment is (`ExperimentConfig`): its arms (registered model versions), how traffic
is routed between them, an optional shadow version, and how rewards arrive. Validated when built:
a bad value is a `ValueError` naming the field and the value.

Routing:
- "thompson": Beta-Bernoulli Thompson sampling over rewards in [0, 1] (`thompson`), with an
  optional exploration floor (every arm keeps at least that share), optional discounting of old
  rewards (non-stationary rewards: `discount` < 1 multiplies every arm's evidence by it at each
  reward), optional sticky assignment per card holder.
- "fixed": fixed traffic shares (`weights`), what a staged rollout uses (5 % / 95 %, ...).

Rewards: "feedback" (`POST /feedback {prediction_id, reward}`, within `feedback_ttl_s` of the
decision) or "labels" (the `experiment_rewards` asset turns arrived fraud labels into rewards with
`label_rewards`: the reward of each outcome of a decision, e.g. 1 for a correct one).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

ROUTINGS = ("thompson", "fixed")
REWARD_SOURCES = ("feedback", "labels")
OUTCOMES = ("tp", "fp", "tn", "fn")  # decision fraud + label fraud = tp, fraud + legit = fp, ...
REWARD_RANGE = (0.0, 1.0)  # Beta-Bernoulli posteriors: a reward r adds r successes and 1 - r failures
DEFAULT_FEEDBACK_TTL_S = 86_400  # a decision accepts feedback for a day (memory: ~150 B a decision)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_LABEL_REWARDS = {"tp": 1.0, "tn": 1.0, "fp": 0.0, "fn": 0.0}  # 1 for a correct decision


def arm_name(version: int) -> str:
    """The default name of the arm serving registered version `version`."""
    return f"v{int(version)}"


def check_reward(reward: Any, field_name: str = "reward") -> float:
    """`reward` as a float in REWARD_RANGE, or a ValueError naming the field and the value."""
    low, high = REWARD_RANGE
    try:
        value = float(reward)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}: {reward!r} is not a number (rewards are in [{low}, {high}])") from None
    if not low <= value <= high:  # NaN fails too
        raise ValueError(f"{field_name}: {reward!r} is outside the allowed range [{low}, {high}]")
    return value


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    arms: Mapping[str, int]  # arm name -> registered model version (each loaded once, kept warm)
    routing: str = "thompson"
    weights: Mapping[str, float] | None = None  # "fixed": traffic share per arm (sums to 1)
    exploration_floor: float = 0.0  # "thompson": every arm's share is at least this
    discount: float = 1.0  # "thompson": 1 = stationary rewards; 0.999 = forget slowly
    sticky: bool = False  # one arm per card holder (user_id) for the experiment's life
    prior: tuple[float, float] = (1.0, 1.0)  # Beta(alpha, beta) before any reward
    shadow_version: int | None = None  # scores `shadow_share` of requests off the request path
    shadow_share: float = 0.0
    reward_source: str = "feedback"
    label_rewards: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LABEL_REWARDS))
    feedback_ttl_s: int = DEFAULT_FEEDBACK_TTL_S

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME_PATTERN.match(self.name):
            raise ValueError(
                f"name: {self.name!r} is not a valid experiment name (1-64 letters, digits, '_', '.', '-')"
            )
        if not isinstance(self.arms, Mapping) or not self.arms:
            raise ValueError(f"arms: an experiment needs at least one arm, got {self.arms!r}")
        arms: dict[str, int] = {}
        for name, version in self.arms.items():
            if not isinstance(name, str) or not NAME_PATTERN.match(name):
                raise ValueError(f"arms: {name!r} is not a valid arm name")
            try:
                v = int(version)
            except (TypeError, ValueError):
                raise ValueError(f"arms.{name}: {version!r} is not a model version number") from None
            if v < 1 or v != version:
                raise ValueError(f"arms.{name}: {version!r} is not a model version number")
            arms[name] = v
        if len(set(arms.values())) != len(arms):
            raise ValueError(f"arms: each arm must serve its own version, got {arms}")
        object.__setattr__(self, "arms", arms)
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: must be one of {ROUTINGS}, got {self.routing!r}")
        if self.routing == "fixed":
            self._check_weights(arms)
        elif self.weights is not None:
            raise ValueError("weights: only a 'fixed' experiment has weights (thompson learns them)")
        floor = float(self.exploration_floor)
        if not 0.0 <= floor or floor * len(arms) > 1.0:
            raise ValueError(
                f"exploration_floor: {self.exploration_floor!r} must be >= 0 and at most 1/{len(arms)} "
                f"for {len(arms)} arms"
            )
        if not 0.0 < float(self.discount) <= 1.0:
            raise ValueError(f"discount: {self.discount!r} must be in (0, 1]")
        a, b = (float(x) for x in self.prior)
        if not (a > 0 and b > 0):
            raise ValueError(f"prior: Beta parameters must be > 0, got {self.prior!r}")
        object.__setattr__(self, "prior", (a, b))
        if self.shadow_version is not None:
            if int(self.shadow_version) < 1:
                raise ValueError(f"shadow_version: {self.shadow_version!r} is not a model version number")
            if int(self.shadow_version) in arms.values():
                raise ValueError(
                    f"shadow_version: v{self.shadow_version} already serves as an arm; a shadow scores "
                    "beside the live arms"
                )
            if not 0.0 < float(self.shadow_share) <= 1.0:
                raise ValueError(f"shadow_share: {self.shadow_share!r} must be in (0, 1] with a shadow version")
        elif self.shadow_share:
            raise ValueError(f"shadow_share: {self.shadow_share!r} needs a shadow_version")
        if self.reward_source not in REWARD_SOURCES:
            raise ValueError(f"reward_source: must be one of {REWARD_SOURCES}, got {self.reward_source!r}")
        rewards = dict(DEFAULT_LABEL_REWARDS)
        for outcome, value in dict(self.label_rewards).items():
            if outcome not in OUTCOMES:
                raise ValueError(f"label_rewards: {outcome!r} is not one of {OUTCOMES}")
            rewards[outcome] = check_reward(value, f"label_rewards.{outcome}")
        object.__setattr__(self, "label_rewards", rewards)
        if int(self.feedback_ttl_s) < 1:
            raise ValueError(f"feedback_ttl_s: {self.feedback_ttl_s!r} must be >= 1 second")

    def _check_weights(self, arms: dict[str, int]) -> None:
        if not isinstance(self.weights, Mapping) or set(self.weights) != set(arms):
            raise ValueError(
                f"weights: a 'fixed' experiment gives every arm a share; arms {sorted(arms)}, "
                f"weights {self.weights!r}"
            )
        weights = {}
        for name, share in self.weights.items():
            share = float(share)
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"weights.{name}: {share!r} must be in [0, 1]")
            weights[name] = share
        if abs(sum(weights.values()) - 1.0) > 1e-9:
            raise ValueError(f"weights: shares must sum to 1, got {sum(weights.values())!r} ({weights})")
        object.__setattr__(self, "weights", weights)

    @property
    def arm_names(self) -> list[str]:
        return list(self.arms)

    @property
    def versions(self) -> list[int]:
        """Every version the experiment serves (arms, then the shadow)."""
        out = list(self.arms.values())
        return out + [int(self.shadow_version)] if self.shadow_version is not None else out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["arms"] = dict(self.arms)
        data["prior"] = list(self.prior)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown experiment setting(s) {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "prior" in values:
            values["prior"] = tuple(values["prior"])
        return cls(**values)
