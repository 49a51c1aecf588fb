"""Staged rollouts end to end, in process against real Redis and MLflow: traffic flows through the
API, rewards arrive by POST /feedback from a simulated world (each model version has its own true
reward rate), and the controller (`RolloutControl.advance` on `gather_evidence`, what
`rollout_sensor` runs each tick) moves the candidate through shadow -> 5 % -> 50 % -> 100 %.

A worse candidate is rolled back at 5 % with the reason recorded, and the champion alone answers
again within 5 s; a better one reaches 100 % and becomes champion (audited); a rollback then
returns the old champion, which answers within 5 s. The Dagster sensor reports transitions as
`rollout_status` materializations and holds as skip reasons."""

from __future__ import annotations

import random
import time

import dagster as dg
import pytest

from ml_platform.defs.experiments import rollout_sensor
from ml_platform.defs.resources import FeatureStoreResource, MLflowRegistryResource
from ml_platform.experiments.evidence import gather_evidence
from ml_platform.experiments.manage import RolloutControl
from ml_platform.experiments.rollout import COMPLETED, ROLLED_BACK, Guardrails, RolloutPlan, Stage
from ml_platform.registry import CHAMPION, PREVIOUS_CHAMPION

# Run a second time in the production profile (make test-production).
pytestmark = pytest.mark.integration

try:
    from fixtures_platform import experiment_api, tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import experiment_api, tiny_platform  # noqa: F401

# Fast stages for a test: no minimum duration, 40 candidate predictions each; the reward
# comparison needs 40 rewarded rows per arm. Latency limits are loose (an in-process server on a
# busy CI machine): the latency guardrails have their own tests in test_experiments_rollout.py.
PLAN = RolloutPlan(
    stages=(Stage("shadow", 0.0, 0.0, 40), Stage("5%", 0.05, 0.0, 40), Stage("50%", 0.5, 0.0, 40),
            Stage("100%", 1.0, 0.0, 0)),
    guardrails=Guardrails(max_p99_latency_ms=500.0, max_latency_ratio=20.0, min_shadow_agreement=0.5,
                          min_metric_samples=40, max_metric_drop=0.05),
)  # fmt: skip


@pytest.fixture(scope="module")
def api(experiment_api):
    return experiment_api


def _state(api):
    return api.app.state.serving


def _traffic(api, tiny_platform, rates: dict[int, float], rng: random.Random, n: int = 100) -> list[dict]:
    """n predictions, each rewarded by the world: 1 with its version's true rate."""
    rows = [tiny_platform.transaction(transaction_id=f"ro-{rng.random():.12f}", amount=round(rng.uniform(5, 900), 2))
            for _ in range(n)]  # fmt: skip
    resp = api.post("/predict/batch", json={"transactions": rows})
    assert resp.status_code == 200, resp.text
    answers = resp.json()["predictions"]
    feedback = [{"prediction_id": p["prediction_id"], "reward": float(rng.random() < rates[p["model_version"]])}
                for p in answers if p["experiment"] is not None]  # fmt: skip
    if feedback:
        r = api.post("/feedback/batch", json={"feedback": feedback})
        assert r.status_code == 200 and r.json()["accepted"] == len(feedback), r.text
    return answers


def _settle(api) -> None:
    """The shadow's queue and the log writer drained (so the evidence sees every prediction)."""
    state = _state(api)
    deadline = time.monotonic() + 10
    while state.shadow.pending and time.monotonic() < deadline:
        time.sleep(0.02)
    api.portal.call(state.log.flush, 5.0)


def _drive(api, tiny_platform, control, rates, seed: int, max_steps: int = 150):
    rng = random.Random(seed)
    transitions = []
    for _ in range(max_steps):
        _traffic(api, tiny_platform, rates, rng)
        _settle(api)
        name, state, revision = control.load()
        evidence = gather_evidence(control.store, tiny_platform.settings, name, state)
        transition = control.advance(evidence, who="test-controller", revision=revision)
        if transition is not None:
            transitions.append(transition)
            _state(api).router.refresh()  # what the 0.1 s refresh would do before the next batch
        if control.load()[1].done:
            return name, control.load()[1], transitions
    raise AssertionError(f"the rollout did not finish in {max_steps} steps: {control.status()}")


def _wait_for(api, tiny_platform, check, seconds: float = 5.0) -> float:
    """Seconds until a plain prediction satisfies `check` (fails after `seconds`)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        (p,) = api.post("/predict/batch", json={"transactions": [tiny_platform.transaction()]}).json()["predictions"]
        if check(p):
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not served within {seconds} s; last answer {p}")


def test_a_worse_candidate_is_rolled_back_at_5_percent_and_a_better_one_becomes_champion(api, tiny_platform):
    store = _state(api).experiments
    registry = tiny_platform.registry
    control = RolloutControl(store, registry)
    assert registry.champion().version == 2

    # v1 earns reward 0.3 where the champion v2 earns 0.9: live evidence must stop it at 5 %
    name, state, transitions = _drive(api, tiny_platform, control_start(control, 1), {1: 0.3, 2: 0.9}, seed=1)
    assert state.status == ROLLED_BACK
    assert [(t.from_stage, t.to_stage) for t in transitions] == [("shadow", "5%"), ("5%", ROLLED_BACK)]
    why = transitions[-1].why
    assert why.startswith("reward ") and "< champion's" in why and "at stage 5%" in why, why
    assert transitions[-1].evidence["candidate_metric_samples"] >= 40  # the evidence is kept with the reason
    assert state.history[-1].who == "test-controller" and state.reason == why
    assert store.status(name) == "stopped" and store.active() is None
    assert registry.champion().version == 2
    took = _wait_for(api, tiny_platform, lambda p: p["experiment"] is None and p["model_version"] == 2)
    assert took < 5.0

    # v1 earns 0.95 against 0.6: it passes every stage and becomes champion
    name, state, transitions = _drive(api, tiny_platform, control_start(control, 1), {1: 0.95, 2: 0.6}, seed=2)
    assert state.status == COMPLETED
    assert [(t.from_stage, t.to_stage) for t in transitions] == [
        ("shadow", "5%"), ("5%", "50%"), ("50%", "100%"), ("100%", COMPLETED)]  # fmt: skip
    aliases = {a: v for a, v in ((CHAMPION, registry.champion().version),
                                 (PREVIOUS_CHAMPION, registry.get_version(PREVIOUS_CHAMPION).version))}  # fmt: skip
    assert aliases == {CHAMPION: 1, PREVIOUS_CHAMPION: 2}
    move = registry.alias_history(CHAMPION)[-1]
    assert move["who"] == "test-controller" and f"staged rollout {name} completed" in move["why"]
    _wait_for(api, tiny_platform, lambda p: p["experiment"] is None and p["model_version"] == 1)

    # the new champion disappoints: one rollback, and the old champion answers within 5 s
    registry.rollback(who="oncall", why="post-rollout regression")
    took = _wait_for(api, tiny_platform, lambda p: p["model_version"] == 2)
    assert took < 5.0
    assert _state(api).holder.swaps[-1].preloaded  # the old champion was kept warm: an instant swap


def control_start(control: RolloutControl, candidate: int) -> RolloutControl:
    control.start(candidate, PLAN, who="test")
    return control


def test_the_sensor_reports_transitions_as_materializations_and_holds_as_skips(api, tiny_platform):
    store = _state(api).experiments
    registry = tiny_platform.registry
    control = RolloutControl(store, registry)
    champion = registry.champion().version
    candidate = 1 if champion == 2 else 2
    plan = RolloutPlan(stages=(Stage("shadow", 0.0, 0.0, 0), Stage("5%", 0.05, 3600.0, 10**6),
                               Stage("100%", 1.0, 0.0, 0)))  # fmt: skip
    name, _ = control.start(candidate, plan, who="test")
    s = tiny_platform.settings
    resources = {
        "feature_store": FeatureStoreResource(repo_path=str(s.data_dir), redis_url=s.redis_url, project=s.project),
        "mlflow": MLflowRegistryResource(tracking_uri=s.mlflow_tracking_uri, model_name=s.model_name),
    }
    try:
        result = rollout_sensor(dg.build_sensor_context(resources=resources))
        assert isinstance(result, dg.SensorResult)
        (event,) = result.asset_events
        assert event.asset_key == dg.AssetKey("rollout_status")
        meta = {k: getattr(v, "value", v) for k, v in event.metadata.items()}
        assert (meta["experiment"], meta["stage"], meta["candidate_traffic"]) == (name, "5%", 0.05)
        assert meta["who"] == "rollout_sensor" and meta["why"].startswith("shadow passed")
        assert "| shadow | 5% | rollout_sensor |" in meta["transitions"]
        held = rollout_sensor(dg.build_sensor_context(resources=resources))
        assert isinstance(held, dg.SkipReason) and "5%: 0/1000000 samples" in held.skip_message
    finally:
        control.abort(who="test", why="sensor test over")
    assert control.status()["status"] == "aborted" and store.active() is None
    skipped = rollout_sensor(dg.build_sensor_context(resources=resources))
    assert isinstance(skipped, dg.SkipReason) and skipped.skip_message == "no rollout is running"


def test_the_experiment_and_rollout_commands(api, tiny_platform, monkeypatch):
    """`ml-platform experiment start|status|stop` and `rollout start|status|abort` on this platform."""
    from click.testing import CliRunner

    from ml_platform.cli import main

    s = tiny_platform.settings
    for key, value in {"ML_PLATFORM_DATA_DIR": str(s.data_dir), "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri,
                       "REDIS_URL": s.redis_url, "ML_PLATFORM_MODEL_NAME": s.model_name,
                       "ML_PLATFORM_PROJECT": s.project}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    cli = CliRunner()
    refused = cli.invoke(main, ["experiment", "start", "cli-bad", "--version", "2", "--version", "9"])
    assert refused.exit_code == 1 and "arms.v9: version 9 is not registered" in refused.output
    started = cli.invoke(main, ["experiment", "start", "cli-ab", "--version", "1", "--version", "2",
                                "--exploration-floor", "0.1", "--who", "alice"])  # fmt: skip
    assert started.exit_code == 0, started.output
    assert "experiment 'cli-ab' started: thompson over v1=v1, v2=v2" in started.output
    status = cli.invoke(main, ["experiment", "status"])
    assert status.exit_code == 0 and "experiment cli-ab: running (routing the API's traffic)" in status.output
    assert "started" in status.output and "by alice" in status.output
    busy = cli.invoke(main, ["rollout", "start", "--candidate", "1"])
    assert busy.exit_code == 1 and "experiment 'cli-ab' is running; stop it" in busy.output
    assert cli.invoke(main, ["experiment", "stop", "cli-ab", "--reason", "done"]).exit_code == 0
    champion = tiny_platform.registry.champion().version
    candidate = 1 if champion == 2 else 2
    rolled = cli.invoke(main, ["rollout", "start", "--candidate", str(candidate), "--stages", "shadow,10,100",
                               "--min-duration", "60"])  # fmt: skip
    assert rolled.exit_code == 0, rolled.output
    assert f"v{candidate} against champion v{champion}, stages shadow -> 10% -> 100%; now in shadow" in rolled.output
    held = cli.invoke(main, ["rollout", "advance"])
    assert held.exit_code == 0 and "holding at shadow: shadow: 0/500 samples" in held.output, held.output
    aborted = cli.invoke(main, ["rollout", "abort", "--reason", "not today", "--who", "bob"])
    assert aborted.exit_code == 0 and "rollout aborted at shadow: not today" in aborted.output
    shown = cli.invoke(main, ["rollout", "status"])
    assert "aborted" in shown.output and "shadow -> aborted  by bob: not today" in shown.output
