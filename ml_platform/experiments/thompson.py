"""Beta-Bernoulli Thompson sampling, pure numpy: the arithmetic of routing, no I/O.

Each arm's reward rate has a Beta(alpha, beta) posterior: the prior plus its successes `s` and
failures `f` (a reward r in [0, 1] adds r to s and 1 - r to f, so a single row counts as one
observation, whatever the batch it came in). A decision draws one sample per arm and picks the
largest: arms are chosen in proportion to the probability that they are the best. With an
exploration floor e (k arms, k*e <= 1) a decision is uniform with probability k*e, so every arm
keeps at least e of the traffic and

    P(arm i) = e + (1 - k*e) * P(arm i is the best)

which is the selection probability recorded with each decision (an estimate from
`PROBABILITY_DRAWS` joint samples; exact enough for inverse-propensity weighting).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROBABILITY_DRAWS = 4000  # joint posterior samples behind the selection probabilities (std < 0.008)


@dataclass(frozen=True)
class Posterior:
    """The arms' Beta posteriors, in arm order."""

    alpha: np.ndarray
    beta: np.ndarray

    @classmethod
    def from_counts(
        cls, successes: Sequence[float], failures: Sequence[float], prior: tuple[float, float] = (1.0, 1.0)
    ) -> Posterior:
        s = np.asarray(successes, dtype=float)
        f = np.asarray(failures, dtype=float)
        if s.shape != f.shape or s.ndim != 1 or not len(s):
            raise ValueError(f"successes and failures must be two equal non-empty lists, got {s} and {f}")
        if (s < 0).any() or (f < 0).any():
            raise ValueError(f"successes and failures must be >= 0, got {s} and {f}")
        return cls(prior[0] + s, prior[1] + f)

    @property
    def arms(self) -> int:
        return len(self.alpha)

    def mean(self) -> np.ndarray:
        return self.alpha / (self.alpha + self.beta)

    def std(self) -> np.ndarray:
        total = self.alpha + self.beta
        return np.sqrt(self.alpha * self.beta / (total * total * (total + 1.0)))


def choose(posterior: Posterior, n: int, rng: np.random.Generator, floor: float = 0.0) -> np.ndarray:
    """`n` decisions (arm indices): one Thompson draw per decision, uniform with probability
    k*floor. Vectorised: ~2 µs a row for three arms."""
    k = posterior.arms
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    draws = rng.beta(posterior.alpha, posterior.beta, size=(n, k))
    picks = draws.argmax(axis=1)
    if floor > 0.0:
        explore = rng.random(n) < floor * k
        picks[explore] = rng.integers(0, k, size=int(explore.sum()))
    return picks


def best_probabilities(posterior: Posterior, rng: np.random.Generator, draws: int = PROBABILITY_DRAWS) -> np.ndarray:
    """P(arm i has the highest reward rate), estimated from `draws` joint posterior samples."""
    k = posterior.arms
    if k == 1:
        return np.ones(1)
    samples = rng.beta(posterior.alpha, posterior.beta, size=(draws, k))
    return np.bincount(samples.argmax(axis=1), minlength=k) / draws


def selection_probabilities(
    posterior: Posterior, rng: np.random.Generator, floor: float = 0.0, draws: int = PROBABILITY_DRAWS
) -> np.ndarray:
    """P(a decision picks arm i) under `choose` with `floor`."""
    k = posterior.arms
    return floor + (1.0 - k * floor) * best_probabilities(posterior, rng, draws)


def choose_fixed(weights: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` decisions with fixed traffic shares (a rollout's stage)."""
    if len(weights) == 1:
        return np.zeros(n, dtype=np.int64)
    cumulative = np.cumsum(weights)
    cumulative[-1] = 1.0  # rounding must not leave a gap at the top
    return np.searchsorted(cumulative, rng.random(n), side="right").clip(0, len(weights) - 1)
