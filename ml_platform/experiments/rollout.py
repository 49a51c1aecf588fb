"""The staged rollout's state machine, one per candidate version: shadow -> 5 % -> 50 % -> 100 %
(configurable). Pure: the caller gathers the evidence and persists the state (JSON).

Each stage lasts at least `min_duration_s` and sees at least `min_samples` candidate predictions
before it may advance; guardrails are judged first, at every evaluation, as soon as there is
enough evidence to judge them (a breach rolls back at once, even mid-stage):
  error rate, p99 latency (absolute, and relative to the champion's), shadow agreement, the
  labelled metric or reward not worse than the champion's beyond a margin, monitors alerting.
Passing the last stage completes the rollout (the caller makes the candidate champion). Every
transition records who / what / when / why and the evidence behind it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

RUNNING, ROLLED_BACK, COMPLETED, ABORTED = "running", "rolled_back", "completed", "aborted"
MIN_JUDGED = 20  # fewer candidate rows than this: error rate, latency, agreement are not judged yet


@dataclass(frozen=True)
class Stage:
    name: str
    traffic: float  # share of live traffic the candidate serves (0: shadow)
    min_duration_s: float
    min_samples: int
    shadow_share: float = 1.0  # shadow stage: share of requests the candidate scores in shadow

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.traffic) <= 1.0:
            raise ValueError(f"Stage {self.name!r}: traffic must be in [0, 1], got {self.traffic!r}")
        if not 0.0 < float(self.shadow_share) <= 1.0:
            raise ValueError(f"Stage {self.name!r}: shadow_share must be in (0, 1], got {self.shadow_share!r}")
        if float(self.min_duration_s) < 0:
            raise ValueError(f"Stage {self.name!r}: min_duration_s must be >= 0, got {self.min_duration_s!r}")
        if int(self.min_samples) < 0:
            raise ValueError(f"Stage {self.name!r}: min_samples must be >= 0, got {self.min_samples!r}")


DEFAULT_STAGES = (
    Stage("shadow", 0.0, 600.0, 500),
    Stage("5%", 0.05, 900.0, 500),
    Stage("50%", 0.5, 1800.0, 2000),
    Stage("100%", 1.0, 0.0, 0),
)


@dataclass(frozen=True)
class Guardrails:
    max_error_rate: float = 0.01
    max_p99_latency_ms: float = 25.0
    max_latency_ratio: float = 1.5
    min_shadow_agreement: float = 0.95
    metric: str = "reward"
    max_metric_drop: float = 0.02
    min_metric_samples: int = 200

    def __post_init__(self) -> None:
        for name in ("max_error_rate", "min_shadow_agreement"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"Guardrails.{name}: must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("max_p99_latency_ms", "max_latency_ratio"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"Guardrails.{name}: must be > 0, got {getattr(self, name)!r}")
        if float(self.max_metric_drop) < 0:
            raise ValueError(f"Guardrails.max_metric_drop: must be >= 0, got {self.max_metric_drop!r}")
        if int(self.min_metric_samples) < 1:
            raise ValueError(f"Guardrails.min_metric_samples: must be >= 1, got {self.min_metric_samples!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"Guardrails.metric: a metric name, got {self.metric!r}")


@dataclass(frozen=True)
class RolloutPlan:
    stages: tuple[Stage, ...] = DEFAULT_STAGES
    guardrails: Guardrails = Guardrails()

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("RolloutPlan.stages: at least one stage")
        if stages[-1].traffic != 1.0:
            raise ValueError(f"RolloutPlan.stages: the last stage must send 100 % of traffic, got {stages[-1].name!r} "
                             f"at {stages[-1].traffic:.0%}")  # fmt: skip
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"RolloutPlan.stages: stage names must differ, got {names}")
        for i, stage in enumerate(stages):
            if stage.traffic == 0.0 and i != 0:
                raise ValueError(f"RolloutPlan.stages: a shadow stage must come first, {stage.name!r} is stage {i + 1}")
            if i and stage.traffic < stages[i - 1].traffic:
                raise ValueError(f"RolloutPlan.stages: traffic must not decrease, {stages[i - 1].name!r} "
                                 f"{stages[i - 1].traffic:.0%} -> {stage.name!r} {stage.traffic:.0%}")  # fmt: skip

    @classmethod
    def from_spec(cls, spec: str, guardrails: Guardrails | None = None, **overrides: Any) -> RolloutPlan:
        """Stages from "shadow,5,50,100" (percentages; 'shadow' = 0 %); the known names take
        DEFAULT_STAGES' durations and samples, others the 50 % stage's. `overrides`
        (min_duration_s, min_samples) apply to every stage but the last."""
        defaults = {s.name: s for s in DEFAULT_STAGES}
        stages = []
        tokens = [t.strip() for t in spec.split(",") if t.strip()]
        for token in tokens:
            if token.lower() == "shadow":
                base, traffic, name = defaults["shadow"], 0.0, "shadow"
            else:
                try:
                    percent = float(token.rstrip("%"))
                except ValueError:
                    raise ValueError(f"stages: {token!r} is neither 'shadow' nor a percentage") from None
                if not 0 < percent <= 100:
                    raise ValueError(f"stages: {token!r} is not a percentage in (0, 100]")
                name = f"{percent:g}%"
                base, traffic = defaults.get(name, defaults["50%"]), percent / 100.0
            stages.append(Stage(name, traffic, base.min_duration_s, base.min_samples, base.shadow_share))
        unknown = sorted(set(overrides) - {"min_duration_s", "min_samples"})
        if unknown:
            raise ValueError(f"from_spec: unknown override(s) {unknown}")
        stages = [Stage(s.name, s.traffic, overrides.get("min_duration_s", s.min_duration_s),
                        overrides.get("min_samples", s.min_samples), s.shadow_share)
                  if i < len(stages) - 1 else s for i, s in enumerate(stages)]  # fmt: skip
        return cls(tuple(stages), guardrails or Guardrails())

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [asdict(s) for s in self.stages], "guardrails": asdict(self.guardrails)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutPlan:
        return cls(tuple(Stage(**s) for s in data["stages"]), Guardrails(**data["guardrails"]))


@dataclass(frozen=True)
class Evidence:
    """What the controller knows about the current stage."""

    samples: int
    errors: int = 0
    p99_latency_ms: float | None = None
    champion_p99_latency_ms: float | None = None
    agreement: float | None = None
    candidate_metrics: Mapping[str, float] = field(default_factory=dict)
    champion_metrics: Mapping[str, float] = field(default_factory=dict)
    candidate_metric_samples: int = 0
    champion_metric_samples: int = 0
    monitoring_alerts: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["candidate_metrics"] = dict(self.candidate_metrics)
        data["champion_metrics"] = dict(self.champion_metrics)
        data["monitoring_alerts"] = list(self.monitoring_alerts)
        return data


@dataclass
class Transition:
    at: float
    from_stage: str | None
    to_stage: str  # a stage name, or "rolled_back", "completed", "aborted"
    who: str
    why: str
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "at_iso": datetime.fromtimestamp(self.at, UTC).isoformat(timespec="seconds")}


@dataclass
class RolloutState:
    candidate_version: int
    champion_version: int
    plan: RolloutPlan
    status: str = RUNNING
    stage_index: int = 0
    stage_started_at: float = 0.0
    started_at: float = 0.0
    reason: str | None = None
    history: list[Transition] = field(default_factory=list)

    @property
    def stage(self) -> Stage:
        return self.plan.stages[self.stage_index]

    @property
    def done(self) -> bool:
        return self.status != RUNNING

    def candidate_traffic(self) -> float:
        if self.status == COMPLETED:
            return 1.0
        return self.stage.traffic if self.status == RUNNING else 0.0

    def shadow_share(self) -> float:
        return self.stage.shadow_share if self.status == RUNNING and self.stage.traffic == 0.0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidate_version": self.candidate_version, "champion_version": self.champion_version,
            "plan": self.plan.to_dict(), "status": self.status, "stage_index": self.stage_index,
            "stage_started_at": self.stage_started_at, "started_at": self.started_at, "reason": self.reason,
            "history": [asdict(t) for t in self.history],
        }  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        values = dict(data)
        values["plan"] = RolloutPlan.from_dict(values["plan"])
        values["history"] = [Transition(**t) for t in values.get("history", [])]
        return cls(**values)


@dataclass(frozen=True)
class Decision:
    action: str  # "hold", "advance", "rollback", "complete"
    reason: str


def start_rollout(candidate_version: int, champion_version: int, plan: RolloutPlan, *, who: str, now: float) -> RolloutState:
    if int(candidate_version) == int(champion_version):
        raise ValueError(f"candidate v{candidate_version} is the champion (v{champion_version}): nothing to roll out")
    state = RolloutState(int(candidate_version), int(champion_version), plan, stage_started_at=now, started_at=now)
    state.history.append(Transition(now, None, plan.stages[0].name, who,
                                    f"rollout of v{candidate_version} against champion v{champion_version} started"))  # fmt: skip
    return state


def _breach(state: RolloutState, e: Evidence) -> str | None:
    g, stage = state.plan.guardrails, state.stage
    at = f"at stage {stage.name} ({e.samples} samples)"
    judged = e.samples + e.errors
    if judged >= MIN_JUDGED and e.errors / judged > g.max_error_rate:
        return f"error rate {e.errors / judged:.3f} > max_error_rate {g.max_error_rate} {at}"
    if e.samples >= MIN_JUDGED and e.p99_latency_ms is not None:
        if e.p99_latency_ms > g.max_p99_latency_ms:
            return f"p99 latency {e.p99_latency_ms:.1f} ms > max_p99_latency_ms {g.max_p99_latency_ms} {at}"
        base = e.champion_p99_latency_ms
        if base is not None and base > 0 and e.p99_latency_ms > g.max_latency_ratio * base:
            return (f"p99 latency {e.p99_latency_ms:.1f} ms > max_latency_ratio {g.max_latency_ratio} x the "
                    f"champion's {base:.1f} ms {at}")  # fmt: skip
    if e.agreement is not None and e.samples >= MIN_JUDGED and e.agreement < g.min_shadow_agreement:
        return f"agreement {e.agreement:.3f} < min_shadow_agreement {g.min_shadow_agreement} {at}"
    m = g.metric
    if (e.candidate_metric_samples >= g.min_metric_samples and e.champion_metric_samples >= g.min_metric_samples
            and m in e.candidate_metrics and m in e.champion_metrics):  # fmt: skip
        cand, champ = float(e.candidate_metrics[m]), float(e.champion_metrics[m])
        if cand < champ - g.max_metric_drop:
            return (f"{m} {cand:.4f} < champion's {champ:.4f} - max_metric_drop {g.max_metric_drop} "
                    f"({e.candidate_metric_samples} vs {e.champion_metric_samples} rewarded rows) {at}")  # fmt: skip
    if e.monitoring_alerts:
        return f"monitors alerting on v{state.candidate_version}: {', '.join(e.monitoring_alerts)} {at}"
    return None


def evaluate(state: RolloutState, evidence: Evidence, now: float) -> Decision:
    if state.done:
        return Decision("hold", f"rollout is {state.status}")
    breach = _breach(state, evidence)
    if breach:
        return Decision("rollback", breach)
    stage = state.stage
    elapsed = now - state.stage_started_at
    if elapsed < stage.min_duration_s or evidence.samples < stage.min_samples:
        return Decision("hold", f"{stage.name}: {evidence.samples}/{stage.min_samples} samples, "
                                f"{int(elapsed)}/{stage.min_duration_s:.0f} s")  # fmt: skip
    parts = [f"{evidence.samples} samples over {elapsed:.0f} s",
             f"error rate {evidence.errors / max(evidence.samples + evidence.errors, 1):.3f}"]  # fmt: skip
    if evidence.p99_latency_ms is not None:
        parts.append(f"p99 {evidence.p99_latency_ms:.1f} ms")
    if evidence.agreement is not None:
        parts.append(f"agreement {evidence.agreement:.3f}")
    m = state.plan.guardrails.metric
    if m in evidence.candidate_metrics and m in evidence.champion_metrics:
        parts.append(f"{m} {evidence.candidate_metrics[m]:.4f} vs {evidence.champion_metrics[m]:.4f}")
    reason = f"{stage.name} passed: " + ", ".join(parts)
    last = state.stage_index == len(state.plan.stages) - 1
    return Decision("complete" if last else "advance", reason)


def apply(state: RolloutState, decision: Decision, *, who: str, now: float,
          evidence: Evidence | None = None) -> Transition | None:  # fmt: skip
    if state.done:
        raise ValueError(f"rollout of v{state.candidate_version} is already {state.status}")
    if decision.action == "hold":
        return None
    before = state.stage.name
    if decision.action == "advance":
        if state.stage_index + 1 >= len(state.plan.stages):
            raise ValueError(f"{before} is the last stage: a rollout there completes, it does not advance")
        state.stage_index += 1
        state.stage_started_at = now
        to = state.stage.name
    elif decision.action == "rollback":
        state.status, state.reason, to = ROLLED_BACK, decision.reason, ROLLED_BACK
    elif decision.action == "complete":
        state.status, state.reason, to = COMPLETED, decision.reason, COMPLETED
    else:
        raise ValueError(f"unknown action {decision.action!r}")
    transition = Transition(now, before, to, who, decision.reason, evidence.to_dict() if evidence else {})
    state.history.append(transition)
    return transition


def abort(state: RolloutState, *, who: str, why: str, now: float) -> Transition:
    if state.done:
        raise ValueError(f"rollout of v{state.candidate_version} is already {state.status}")
    transition = Transition(now, state.stage.name, ABORTED, who, why)
    state.status, state.reason = ABORTED, why
    state.history.append(transition)
    return transition


def describe(state: RolloutState, now: float) -> dict[str, Any]:
    return {
        "candidate_version": state.candidate_version,
        "champion_version": state.champion_version,
        "status": state.status,
        "stage": state.stage.name,
        "candidate_traffic": state.candidate_traffic(),
        "shadow_share": state.shadow_share(),
        "seconds_in_stage": round(now - state.stage_started_at, 1),
        "stages": [asdict(s) for s in state.plan.stages],
        "guardrails": asdict(state.plan.guardrails),
        "reason": state.reason,
        "history": [t.to_dict() for t in state.history],
    }
