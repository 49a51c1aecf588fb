"""Thompson-sampling routing through the real Redis: the posteriors live in Redis, the router
decides from a snapshot, rewards arrive by prediction id (late, once), label days apply once."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis
from fixtures_platform import TEST_REDIS_URL, delete_project_keys, unique_project

from ml_platform.experiments.config import ExperimentConfig, check_reward
from ml_platform.experiments.router import ExperimentRouter
from ml_platform.experiments.store import ACCEPTED, DUPLICATE, UNKNOWN, ExperimentStore
from ml_platform.experiments.thompson import Posterior, choose, choose_fixed, selection_probabilities

TRUE_RATES = {"model_v1": 0.45, "model_v2": 0.52, "model_v3": 0.40}


@pytest.fixture()
def store(client):
    project = unique_project("test_experiments")
    loop = asyncio.new_event_loop()  # the async client's connections belong to one loop
    aclient = aioredis.Redis.from_url(TEST_REDIS_URL)
    s = ExperimentStore(client, project, aclient)
    s.run = loop.run_until_complete
    yield s
    delete_project_keys(client, project)
    loop.run_until_complete(aclient.aclose())
    loop.close()


def _simulate(store: ExperimentStore, config: ExperimentConfig, rates: dict, decisions: int, batch: int, seed: int):
    """Route `decisions` rows in batches (the router refreshes its snapshot from Redis between
    batches, as a server does every 0.5 s), reward each decision Bernoulli(rate of its arm) by
    prediction id. Returns the arm names in decision order."""
    store.start(config, who="test")
    router = ExperimentRouter(store, load=lambda version: f"model-{version}", seed=seed)
    world = np.random.default_rng(seed + 1)
    chosen: list[str] = []

    async def run() -> None:
        for _ in range(decisions // batch):
            active = router.refresh()
            assignment = router.assign(batch, active)
            arms = assignment.arm_names()
            pids = [uuid.uuid4().hex for _ in arms]
            await store.record_decisions(config.name, pids, arms, assignment.probabilities.tolist(), 3600)
            rewards = [float(world.random() < rates[a]) for a in arms]
            results = await store.feedback(zip(pids, rewards))
            assert [o for o, _ in results] == [ACCEPTED] * batch
            assert [a for _, a in results] == arms  # each reward went to the arm that served
            chosen.extend(arms)

    store.run(run())
    return chosen


def test_three_arms_most_traffic_goes_to_the_best_and_posteriors_converge(store):
    config = ExperimentConfig(name="three-arms", arms={"model_v1": 1, "model_v2": 2, "model_v3": 3})
    chosen = _simulate(store, config, TRUE_RATES, decisions=6000, batch=50, seed=7)
    last = chosen[-2000:]
    share_best = last.count("model_v2") / len(last)
    # within 4000 decisions the best arm (0.52) gets most of the traffic
    assert share_best > 0.6, f"best arm's share over decisions 4001-6000: {share_best:.2f}"
    stats = store.stats("three-arms")
    for arm, rate in TRUE_RATES.items():
        s = stats[arm]
        assert abs(s.mean - rate) <= 2 * s.std, f"{arm}: mean {s.mean:.3f} ± {s.std:.3f}, true {rate}"
        assert s.served == chosen.count(arm) and s.samples == chosen.count(arm)
    assert stats["model_v2"].std < 0.015  # the best arm is known precisely (thousands of rewards)
    assert sum(s.served for s in stats.values()) == 6000
    assert stats["model_v2"].traffic_share == pytest.approx(chosen.count("model_v2") / 6000)
    assert stats["model_v2"].selection_probability > 0.8


def test_exploration_floor_keeps_every_arm_in_play(store):
    config = ExperimentConfig(
        name="floor", arms={"model_v1": 1, "model_v2": 2, "model_v3": 3}, exploration_floor=0.05
    )
    chosen = _simulate(store, config, {"model_v1": 0.2, "model_v2": 0.9, "model_v3": 0.2}, 4000, 100, seed=3)
    last = chosen[-2000:]
    for arm in ("model_v1", "model_v3"):
        share = last.count(arm) / len(last)
        assert 0.035 < share < 0.09, f"{arm} share {share:.3f} with a 0.05 floor (and a clear winner)"
    probs = store.stats("floor")
    assert probs["model_v1"].selection_probability == pytest.approx(0.05, abs=0.01)


def test_discounting_follows_a_reward_rate_that_changes(store):
    """Arm a is good, then bad: with discount 0.99 its posterior follows the recent rate;
    without discounting it stays near the average of both periods."""
    for name, discount in (("stationary", 1.0), ("discounted", 0.99)):
        config = ExperimentConfig(name=name, arms={"a": 1}, discount=discount)
        store.start(config, who="test")
        pids = [f"{name}-{i}" for i in range(1000)]
        store.run(store.record_decisions(name, pids, ["a"] * 1000, [1.0] * 1000, 3600))
        rewards = [1.0] * 500 + [0.0] * 500
        assert store.feedback_sync(zip(pids, rewards)) == [(ACCEPTED, "a")] * 1000
        store.stop(name, who="test")
    assert store.stats("stationary")["a"].mean == pytest.approx(501 / 1002)
    assert store.stats("discounted")["a"].mean < 0.05  # ~0.99^500 of the early successes remain
    assert store.stats("discounted")["a"].samples == 1000  # counts are not discounted


def test_late_feedback_once_per_decision_and_unknown_ids_counted(store):
    config = ExperimentConfig(name="fb", arms={"v1": 1, "v2": 2})
    store.start(config, who="test")
    store.run(store.record_decisions("fb", ["p1", "p2"], ["v1", "v2"], [0.5, 0.5], 3600))
    assert store.feedback_sync([("p1", 1.0), ("p1", 1.0), ("nope", 1.0), ("p2", 0.25)]) == [
        (ACCEPTED, "v1"),
        (DUPLICATE, "v1"),
        (UNKNOWN, ""),
        (ACCEPTED, "v2"),
    ]
    stats = store.stats("fb")
    assert (stats["v1"].samples, stats["v1"].reward_sum) == (1, 1.0)
    assert stats["v2"].mean == pytest.approx((1 + 0.25) / (2 + 1))  # Beta(1,1) + 0.25 success, 0.75 failure
    assert store.feedback_counts("fb") == {"accepted": 2, "unknown": 0, "duplicate": 1, "invalid": 0}
    with pytest.raises(ValueError, match=r"reward: 1\.5 is outside the allowed range \[0\.0, 1\.0\]"):
        store.feedback_sync([("p2", 1.5)])


def test_an_expired_decision_takes_no_reward(store):
    store.start(ExperimentConfig(name="ttl", arms={"v1": 1}), who="test")
    store.run(store.record_decisions("ttl", ["old"], ["v1"], [1.0], ttl_s=1))
    store.client.pexpire(store.decision_key("old"), 1)  # the feedback window has passed
    import time

    time.sleep(0.05)
    assert store.feedback_sync([("old", 1.0)]) == [(UNKNOWN, "")]
    assert store.stats("ttl")["v1"].samples == 0


def test_a_label_day_is_applied_once(store):
    store.start(ExperimentConfig(name="labels", arms={"v1": 1, "v2": 2}, reward_source="labels"), who="test")
    rewards = [("v1", 1.0), ("v1", 0.0), ("v2", 1.0)]
    assert store.apply_label_day("labels", "2026-01-05", rewards) == 3
    assert store.apply_label_day("labels", "2026-01-05", rewards) is None  # a re-run adds nothing
    stats = store.stats("labels")
    assert (stats["v1"].samples, stats["v1"].reward_sum, stats["v2"].samples) == (2, 1.0, 1)
    with pytest.raises(ValueError, match="arm 'v9' is not an arm"):
        store.apply_label_day("labels", "2026-01-06", [("v9", 1.0)])


def test_sticky_assignment_keeps_a_card_holder_on_one_arm(store):
    config = ExperimentConfig(name="sticky", arms={"v1": 1, "v2": 2}, sticky=True)
    store.start(config, who="test")

    async def run():
        first = await store.stick("sticky", [7, 8], ["v1|0.5", "v2|0.5"])
        again = await store.stick("sticky", [7, 8, 9], ["v2|0.4", "v1|0.6", "v2|0.4"])
        return first, again

    first, again = store.run(run())
    assert first == ["v1|0.5", "v2|0.5"]
    assert again == ["v1|0.5", "v2|0.5", "v2|0.4"]  # 7 and 8 keep their first arm; 9 is new


def test_only_one_experiment_routes_at_a_time_and_names_are_not_reused(store):
    store.start(ExperimentConfig(name="first", arms={"v1": 1}), who="test")
    with pytest.raises(ValueError, match="experiment 'first' is running; stop it"):
        store.start(ExperimentConfig(name="second", arms={"v1": 1}), who="test")
    store.stop("first", who="test", why="done")
    assert store.active() is None and store.status("first") == "stopped"
    with pytest.raises(ValueError, match="named 'first' exists already"):
        store.start(ExperimentConfig(name="first", arms={"v2": 2}), who="test")


def test_thompson_arithmetic():
    rng = np.random.default_rng(0)
    equal = Posterior.from_counts([10, 10], [10, 10])
    assert selection_probabilities(equal, rng) == pytest.approx([0.5, 0.5], abs=0.03)
    clear = Posterior.from_counts([900, 100], [100, 900])
    assert selection_probabilities(clear, rng, floor=0.1) == pytest.approx([0.9, 0.1], abs=1e-9)
    assert np.bincount(choose(clear, 10_000, rng, floor=0.1), minlength=2)[1] == pytest.approx(1000, abs=100)  # the 0.1 floor
    shares = np.bincount(choose_fixed(np.array([0.95, 0.05]), 20_000, rng), minlength=2) / 20_000
    assert shares == pytest.approx([0.95, 0.05], abs=0.006)
    assert (choose_fixed(np.array([0.0, 1.0]), 1000, rng) == 1).all()
    assert Posterior.from_counts([3], [1]).mean() == pytest.approx([4 / 6])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"arms": {}}, "arms: an experiment needs at least one arm"),
        ({"arms": {"a": 0}}, r"arms.a: 0 is not a model version number"),
        ({"arms": {"a": 1, "b": 1}}, "each arm must serve its own version"),
        ({"routing": "epsilon"}, "routing: must be one of"),
        ({"routing": "fixed", "arms": {"a": 1, "b": 2}, "weights": {"a": 1.0}}, "weights: a 'fixed' experiment gives every arm a share"),
        ({"routing": "fixed", "weights": {"a": 0.5}}, "weights: shares must sum to 1, got 0.5"),
        ({"exploration_floor": 0.6, "arms": {"a": 1, "b": 2}}, r"exploration_floor: 0.6 must be >= 0 and at most 1/2"),
        ({"discount": 0.0}, r"discount: 0.0 must be in \(0, 1\]"),
        ({"shadow_version": 1}, "shadow_version: v1 already serves as an arm"),
        ({"shadow_version": 5, "shadow_share": 0}, r"shadow_share: 0 must be in \(0, 1\]"),
        ({"name": "no spaces"}, "name: 'no spaces' is not a valid experiment name"),
        ({"label_rewards": {"tp": 2}}, r"label_rewards.tp: 2 is outside the allowed range"),
    ],
)
def test_config_errors_name_the_field_and_value(kwargs, message):
    values = {"name": "e", "arms": {"a": 1}, **kwargs}
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(**values)


def test_config_round_trips_and_rewards_are_checked():
    config = ExperimentConfig(name="e", arms={"a": 1, "b": 2}, routing="fixed", weights={"a": 0.95, "b": 0.05},
                              shadow_version=3, shadow_share=0.25, sticky=True)  # fmt: skip
    assert ExperimentConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown experiment setting\(s\) \['colour'\]"):
        ExperimentConfig.from_dict({**config.to_dict(), "colour": "red"})
    assert check_reward("0.5") == 0.5
    with pytest.raises(ValueError, match="reward: 'lots' is not a number"):
        check_reward("lots")
    with pytest.raises(ValueError, match="outside the allowed range"):
        check_reward(float("nan"))
