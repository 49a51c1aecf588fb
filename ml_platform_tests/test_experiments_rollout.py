"""The staged rollout state machine (pure, no Redis): stages advance only after their minimum
duration and sample size, each guardrail rolls back on its own with a reason naming the value and
the limit, too little evidence is not judged, every transition is recorded and the state survives
a JSON round trip exactly."""

from __future__ import annotations

import json

import pytest

from ml_platform.experiments.rollout import (
    ABORTED,
    COMPLETED,
    DEFAULT_STAGES,
    ROLLED_BACK,
    RUNNING,
    Decision,
    Evidence,
    Guardrails,
    RolloutPlan,
    RolloutState,
    Stage,
    abort,
    apply,
    describe,
    evaluate,
    start_rollout,
)

T0 = 1_700_000_000.0
CANDIDATE, CHAMPION = 7, 3
HEALTHY = {"errors": 0, "p99_latency_ms": 11.2, "champion_p99_latency_ms": 10.0, "agreement": 0.991}


def _start(plan: RolloutPlan | None = None) -> RolloutState:
    return start_rollout(CANDIDATE, CHAMPION, plan or RolloutPlan(), who="cli:alice", now=T0)


def _at_stage(name: str, plan: RolloutPlan | None = None) -> RolloutState:
    """A running rollout moved (by hand-made decisions) to stage `name`, which began at T0."""
    state = _start(plan)
    while state.stage.name != name:
        apply(state, Decision("advance", "test setup"), who="test", now=T0)
    return state


def _pass_stage(state: RolloutState, evidence: Evidence) -> float:
    """Check the current stage holds one second short and one sample short of its minimums, then
    advances (or completes) exactly at them; returns when it did."""
    stage, started = state.stage, state.stage_started_at
    done_at = started + stage.min_duration_s
    if stage.min_duration_s >= 1:
        early = evaluate(state, evidence, done_at - 1)
        assert early.action == "hold", early
        assert f"{int(stage.min_duration_s) - 1}/{stage.min_duration_s:g} s" in early.reason
    if stage.min_samples >= 1:
        short = Evidence(samples=stage.min_samples - 1, **HEALTHY)
        held = evaluate(state, short, done_at)
        assert held.action == "hold", held
        assert f"{stage.min_samples - 1}/{stage.min_samples} samples" in held.reason
    decision = evaluate(state, evidence, done_at)
    assert decision.action in ("advance", "complete"), decision
    assert decision.reason.startswith(f"{stage.name} passed")
    transition = apply(state, decision, who="rollout-sensor", now=done_at, evidence=evidence)
    assert transition is not None and transition.from_stage == stage.name and transition.who == "rollout-sensor"
    assert transition.evidence == evidence.to_dict()
    return done_at


# --------------------------------------------------------------------------- the happy path


def test_happy_path_walks_every_stage_and_completes():
    state = _start()
    assert [s.name for s in state.plan.stages] == ["shadow", "5%", "50%", "100%"]
    assert (state.status, state.stage.name) == (RUNNING, "shadow")
    assert (state.candidate_traffic(), state.shadow_share()) == (0.0, 1.0)
    assert state.history[0].to_stage == "shadow" and state.history[0].from_stage is None
    assert state.history[0].why == f"rollout of v{CANDIDATE} against champion v{CHAMPION} started"

    expected = {"5%": 0.05, "50%": 0.5, "100%": 1.0}
    for stage in DEFAULT_STAGES[:-1]:
        evidence = Evidence(samples=stage.min_samples, **HEALTHY)
        advanced_at = _pass_stage(state, evidence)
        assert state.status == RUNNING and state.stage_started_at == advanced_at
        assert state.candidate_traffic() == expected[state.stage.name]
        assert state.shadow_share() == 0.0  # live stages score no shadow
    assert state.stage.name == "100%" and not state.done

    # 100 % has no minimums: it completes on the next evaluation
    decision = evaluate(state, Evidence(samples=0), state.stage_started_at)
    assert decision.action == "complete"
    apply(state, decision, who="rollout-sensor", now=state.stage_started_at + 30)
    assert state.status == COMPLETED and state.done and state.candidate_traffic() == 1.0
    assert state.reason == decision.reason
    assert [t.to_stage for t in state.history] == ["shadow", "5%", "50%", "100%", COMPLETED]
    assert evaluate(state, Evidence(samples=10_000), T0 + 10**6) == Decision("hold", "rollout is completed")


def test_advance_reason_summarises_the_evidence():
    state = _at_stage("5%")
    evidence = Evidence(samples=640, **HEALTHY)
    decision = evaluate(state, evidence, T0 + 912)
    assert decision.action == "advance"
    for part in ("5% passed", "640 samples", "912 s", "error rate 0.000", "p99 11.2 ms", "agreement 0.991"):
        assert part in decision.reason


def test_hold_reports_what_is_missing():
    state = _at_stage("5%")
    decision = evaluate(state, Evidence(samples=120, **HEALTHY), T0 + 300)
    assert decision == Decision("hold", decision.reason)
    assert decision.reason.startswith("5%: 120/500 samples, 300/900 s")
    assert apply(state, decision, who="rollout-sensor", now=T0 + 300) is None
    assert state.stage.name == "5%" and len(state.history) == 1 + 1  # start + setup advance only


# --------------------------------------------------------------------------- guardrails

BREACHES = {
    # name: (stage, evidence, substrings of the reason)
    "error_rate": ("5%", Evidence(samples=620, errors=20), ["error rate", "0.031", "max_error_rate", "0.01"]),
    "p99": ("5%", Evidence(samples=100, p99_latency_ms=31.5, champion_p99_latency_ms=30.0),
            ["p99", "31.5", "max_p99_latency_ms", "25"]),
    "latency_ratio": ("50%", Evidence(samples=100, p99_latency_ms=20.0, champion_p99_latency_ms=10.0),
                      ["p99", "20", "max_latency_ratio", "1.5", "10"]),
    "agreement": ("shadow", Evidence(samples=100, agreement=0.91),
                  ["agreement", "0.91", "min_shadow_agreement", "0.95"]),
    "metric": ("50%", Evidence(samples=300, candidate_metrics={"reward": 0.75}, champion_metrics={"reward": 0.80},
                               candidate_metric_samples=250, champion_metric_samples=300),
               ["reward", "0.75", "0.8", "max_metric_drop", "0.02"]),
    "monitoring": ("5%", Evidence(samples=0, monitoring_alerts=("prediction_drift",)), ["prediction_drift"]),
}  # fmt: skip


@pytest.mark.parametrize("guardrail", sorted(BREACHES))
def test_each_guardrail_breach_rolls_back_before_the_stage_minimums(guardrail):
    stage, evidence, parts = BREACHES[guardrail]
    state = _at_stage(stage)
    decision = evaluate(state, evidence, T0 + 10)  # long before min_duration_s: a breach does not wait
    assert decision.action == "rollback", decision
    for part in [*parts, f"stage {stage}", f"{evidence.samples} samples"]:
        assert part in decision.reason, (part, decision.reason)
    transition = apply(state, decision, who="rollout-sensor", now=T0 + 10, evidence=evidence)
    assert (transition.from_stage, transition.to_stage, transition.why) == (stage, ROLLED_BACK, decision.reason)
    assert transition.evidence == evidence.to_dict()
    assert state.status == ROLLED_BACK and state.reason == decision.reason
    assert state.candidate_traffic() == 0.0 and state.shadow_share() == 0.0


def test_healthy_evidence_breaches_nothing():
    """Each BREACHES case's evidence with the breaching value healthy: no rollback (so each case
    above fails for its own guardrail, not another one)."""
    for stage in ("shadow", "5%", "50%"):
        evidence = Evidence(samples=100, errors=1, p99_latency_ms=14.9, champion_p99_latency_ms=10.0, agreement=0.95,
                            candidate_metrics={"reward": 0.79}, champion_metrics={"reward": 0.80},
                            candidate_metric_samples=250, champion_metric_samples=300)  # fmt: skip
        assert evaluate(_at_stage(stage), evidence, T0 + 10).action == "hold"


@pytest.mark.parametrize("candidate", [0.785, 0.78, 0.95])
def test_metric_within_the_margin_does_not_roll_back(candidate):
    evidence = Evidence(samples=300, candidate_metrics={"reward": candidate}, champion_metrics={"reward": 0.80},
                        candidate_metric_samples=250, champion_metric_samples=300)  # fmt: skip
    assert evaluate(_at_stage("50%"), evidence, T0 + 10).action == "hold"


@pytest.mark.parametrize(
    "change",
    [{"candidate_metric_samples": 199}, {"champion_metric_samples": 199},  # too few labelled rows
     {"champion_metrics": {"roc_auc": 0.9}},  # the guardrail's metric is not measured for the champion
    ],
)  # fmt: skip
def test_metric_not_compared_without_enough_labelled_rows(change):
    values = {"samples": 300, "candidate_metrics": {"reward": 0.5}, "champion_metrics": {"reward": 0.8},
                  "candidate_metric_samples": 250, "champion_metric_samples": 250} | change  # fmt: skip
    assert evaluate(_at_stage("50%"), Evidence(**values), T0 + 10).action == "hold"


def test_the_guardrails_metric_is_configurable():
    plan = RolloutPlan(guardrails=Guardrails(metric="roc_auc", max_metric_drop=0.01, min_metric_samples=50))
    state = _at_stage("50%", plan)
    rows = {"samples": 300, "candidate_metric_samples": 60, "champion_metric_samples": 60}
    reward_drop = Evidence(candidate_metrics={"roc_auc": 0.915, "reward": 0.1},
                           champion_metrics={"roc_auc": 0.92, "reward": 0.9}, **rows)  # fmt: skip
    assert evaluate(state, reward_drop, T0 + 10).action == "hold"  # reward is not this plan's metric
    auc_drop = Evidence(candidate_metrics={"roc_auc": 0.90, "reward": 0.9},
                        champion_metrics={"roc_auc": 0.92, "reward": 0.9}, **rows)  # fmt: skip
    decision = evaluate(state, auc_drop, T0 + 10)
    assert decision.action == "rollback" and "roc_auc 0.9" in decision.reason and "0.01" in decision.reason


def test_too_few_rows_are_not_judged():
    state = _at_stage("5%")
    # 19 rows (14 predictions, 5 errors: 26 %) are too few to judge; the 20th makes it a breach
    assert evaluate(state, Evidence(samples=14, errors=5), T0 + 10).action == "hold"
    assert evaluate(state, Evidence(samples=15, errors=5), T0 + 10).action == "rollback"
    slow = {"p99_latency_ms": 500.0, "champion_p99_latency_ms": 10.0, "agreement": 0.2}
    assert evaluate(state, Evidence(samples=19, **slow), T0 + 10).action == "hold"
    assert evaluate(state, Evidence(samples=20, **slow), T0 + 10).action == "rollback"


def test_unknown_champion_latency_skips_only_the_ratio():
    state = _at_stage("5%")
    for champion in (None, 0.0):
        evidence = Evidence(samples=100, p99_latency_ms=20.0, champion_p99_latency_ms=champion)
        assert evaluate(state, evidence, T0 + 10).action == "hold"


# --------------------------------------------------------------------------- plans


@pytest.mark.parametrize(
    ("build", "parts"),
    [
        (lambda: Stage("5%", 1.5, 0, 0), ["traffic", "1.5", "5%"]),
        (lambda: Stage("5%", 0.05, -1, 0), ["min_duration_s", "-1"]),
        (lambda: Stage("5%", 0.05, 0, -3), ["min_samples", "-3"]),
        (lambda: Stage("shadow", 0.0, 0, 0, shadow_share=0.0), ["shadow_share", "0.0"]),
        (lambda: RolloutPlan((Stage("shadow", 0.0, 0, 0), Stage("50%", 0.5, 0, 0))), ["last stage", "50%"]),
        (lambda: RolloutPlan((Stage("5%", 0.05, 0, 0), Stage("shadow", 0.0, 0, 0), Stage("100%", 1.0, 0, 0))),
         ["shadow", "first"]),
        (lambda: RolloutPlan((Stage("50%", 0.5, 0, 0), Stage("5%", 0.05, 0, 0), Stage("100%", 1.0, 0, 0))),
         ["decrease", "50%", "5%"]),
        (lambda: RolloutPlan(()), ["stage"]),
        (lambda: Guardrails(max_error_rate=-0.1), ["max_error_rate", "-0.1"]),
        (lambda: Guardrails(max_p99_latency_ms=0), ["max_p99_latency_ms", "0"]),
        (lambda: Guardrails(min_shadow_agreement=1.2), ["min_shadow_agreement", "1.2"]),
        (lambda: Guardrails(max_metric_drop=-0.5), ["max_metric_drop", "-0.5"]),
        (lambda: RolloutPlan.from_spec("shadow,5,fifty,100"), ["'fifty'"]),
        (lambda: RolloutPlan.from_spec("shadow,5,150"), ["'150'"]),
        (lambda: RolloutPlan.from_spec("shadow,5,50"), ["last stage"]),
    ],
)  # fmt: skip
def test_invalid_plans_name_the_field_and_value(build, parts):
    with pytest.raises(ValueError) as info:
        build()
    for part in parts:
        assert part in str(info.value), (part, str(info.value))


def test_from_spec():
    assert RolloutPlan.from_spec("shadow,5,50,100") == RolloutPlan()
    fast = RolloutPlan.from_spec("shadow, 5, 20%, 100", min_duration_s=2.0, min_samples=30)
    assert [(s.name, s.traffic) for s in fast.stages] == [("shadow", 0.0), ("5%", 0.05), ("20%", 0.2), ("100%", 1.0)]
    assert [(s.min_duration_s, s.min_samples) for s in fast.stages] == [(2.0, 30)] * 3 + [(0.0, 0)]
    custom = RolloutPlan.from_spec("20,100").stages[0]  # an unknown name takes the 50 % stage's minimums
    fifty = DEFAULT_STAGES[2]
    assert (custom.min_duration_s, custom.min_samples) == (fifty.min_duration_s, fifty.min_samples)
    assert RolloutPlan.from_dict(json.loads(json.dumps(fast.to_dict()))) == fast


# --------------------------------------------------------------------------- persistence, lifecycle


def test_json_round_trip_of_a_state_with_history_is_exact():
    plan = RolloutPlan.from_spec("shadow,5,100", min_duration_s=60, min_samples=50)
    state = start_rollout(CANDIDATE, CHAMPION, plan, who="cli:alice", now=T0 + 0.25)
    passed = Evidence(samples=50, **HEALTHY)
    apply(state, evaluate(state, passed, T0 + 61), who="rollout-sensor", now=T0 + 61, evidence=passed)
    bad = Evidence(samples=400, errors=30, p99_latency_ms=12.5, candidate_metrics={"reward": 0.7, "roc_auc": 0.91},
                   champion_metrics={"reward": 0.8}, candidate_metric_samples=210, champion_metric_samples=220,
                   monitoring_alerts=("prediction_drift", "serving_health"))  # fmt: skip
    apply(state, evaluate(state, bad, T0 + 90), who="rollout-sensor", now=T0 + 90, evidence=bad)
    assert state.status == ROLLED_BACK and len(state.history) == 3

    text = json.dumps(state.to_dict(), allow_nan=False)
    restored = RolloutState.from_dict(json.loads(text))
    assert restored == state
    assert restored.to_dict() == state.to_dict()
    assert restored.history[-1].evidence["monitoring_alerts"] == ["prediction_drift", "serving_health"]


def test_start_refuses_the_champion_as_candidate():
    with pytest.raises(ValueError, match="v3"):
        start_rollout(3, 3, RolloutPlan(), who="cli:alice", now=T0)


def test_apply_on_a_finished_rollout_raises():
    state = _at_stage("5%")
    breach = evaluate(state, Evidence(samples=100, monitoring_alerts=("prediction_drift",)), T0 + 5)
    apply(state, breach, who="rollout-sensor", now=T0 + 5)
    with pytest.raises(ValueError, match="rollout of v7 is already rolled_back"):
        apply(state, Decision("advance", "x"), who="rollout-sensor", now=T0 + 6)
    with pytest.raises(ValueError, match="already rolled_back"):
        abort(state, who="cli:bob", why="too late", now=T0 + 7)
    assert state.stage.name == "5%" and len(state.history) == 3  # nothing more recorded


def test_abort_records_who_and_why():
    state = _at_stage("50%")
    why = "incident 42: the feature store is degraded"
    transition = abort(state, who="cli:bob", why=why, now=T0 + 77)
    assert (transition.at, transition.from_stage, transition.to_stage) == (T0 + 77, "50%", ABORTED)
    assert (transition.who, transition.why, transition.evidence) == ("cli:bob", why, {})
    assert state.history[-1] is transition
    assert state.status == ABORTED and state.reason == transition.why and state.candidate_traffic() == 0.0
    assert evaluate(state, Evidence(samples=5000, **HEALTHY), T0 + 10**5).reason == "rollout is aborted"


def test_describe_is_json_safe_and_complete():
    plan = RolloutPlan(stages=(Stage("shadow", 0.0, 60, 10, shadow_share=0.25), Stage("100%", 1.0, 0, 0)))
    state = _start(plan)
    info = json.loads(json.dumps(describe(state, T0 + 42), allow_nan=False))
    assert (info["candidate_version"], info["champion_version"]) == (CANDIDATE, CHAMPION)
    assert (info["status"], info["stage"]) == (RUNNING, "shadow")
    assert info["shadow_share"] == 0.25
    assert [s["name"] for s in info["stages"]] == ["shadow", "100%"]
    assert info["reason"] is None
    assert [(t["from_stage"], t["to_stage"], t["who"]) for t in info["history"]] == [(None, "shadow", "cli:alice")]
    assert 42 in info.values() or 42.0 in info.values()  # the time in the stage
