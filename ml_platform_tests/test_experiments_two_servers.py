"""Two API processes share one experiment through Redis: predictions from either, rewards sent
concurrently to both (some twice, at once, to different servers). The posterior counts equal the
rewards sent exactly: no update lost between processes, no decision rewarded twice."""

from __future__ import annotations

import random
import threading
from collections import Counter

import httpx
import pytest

from ml_platform.experiments.config import ExperimentConfig
from ml_platform.experiments.manage import start_experiment
from ml_platform.experiments.store import ExperimentStore

try:
    from fixtures_platform import ServerProcess, tiny_platform
except ImportError:
    from ml_platform_tests.fixtures_platform import ServerProcess, tiny_platform  # noqa: F401


@pytest.fixture(scope="module")
def servers(tiny_platform, tmp_path_factory):
    store = ExperimentStore(tiny_platform.redis, tiny_platform.project)
    start_experiment(store, tiny_platform.registry, ExperimentConfig(name="shared", arms={"v1": 1, "v2": 2}),
                     who="test")  # fmt: skip
    logs = tmp_path_factory.mktemp("servers")
    a = ServerProcess(tiny_platform.settings, log_path=logs / "a.log", experiment_refresh_s=0.2)
    b = ServerProcess(tiny_platform.settings, log_path=logs / "b.log", experiment_refresh_s=0.2)
    with a, b:
        yield store, [a.url, b.url]


def test_concurrent_feedback_to_two_processes_is_counted_exactly(servers, tiny_platform):
    store, urls = servers
    predictions = []
    with httpx.Client(timeout=10) as http:
        for k in range(12):
            rows = [tiny_platform.transaction(transaction_id=f"two-{k}-{i}", amount=5.0 + i) for i in range(50)]
            r = http.post(urls[k % 2] + "/predict/batch", json={"transactions": rows})
            assert r.status_code == 200, r.text
            predictions += r.json()["predictions"]
    assert {p["experiment"] for p in predictions} == {"shared"}
    rng = random.Random(5)
    rewards = {p["prediction_id"]: (p["arm"], round(rng.random(), 3)) for p in predictions}
    twice = set(rng.sample(sorted(rewards), 60))  # sent at the same moment to both servers
    outcomes: Counter = Counter()
    lock = threading.Lock()
    items = sorted(rewards)
    rng.shuffle(items)
    shards = [items[i::8] for i in range(8)]

    def send(shard: list[str], worker: int) -> None:
        local: Counter = Counter()
        with httpx.Client(timeout=10) as http:
            for j, pid in enumerate(shard):
                body = {"prediction_id": pid, "reward": rewards[pid][1]}
                targets = urls if pid in twice else [urls[(worker + j) % 2]]
                for url in targets:
                    local[http.post(url + "/feedback", json=body).status_code] += 1
        with lock:
            outcomes.update(local)

    threads = [threading.Thread(target=send, args=(shard, w)) for w, shard in enumerate(shards)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert outcomes == {200: len(rewards), 409: len(twice)}  # each decision accepted once

    stats = store.stats("shared")
    for arm in ("v1", "v2"):
        sent = [r for a, r in rewards.values() if a == arm]
        assert stats[arm].samples == len(sent), arm
        assert stats[arm].reward_sum == pytest.approx(sum(sent), abs=1e-9), arm
        assert stats[arm].served == sum(p["arm"] == arm for p in predictions)
        # successes + failures = rewards: the Beta posterior moved by exactly one per reward
        post = store.read_posterior(store.config("shared"))
        i = list(store.config("shared").arms).index(arm)
        assert post.alpha[i] + post.beta[i] == pytest.approx(2.0 + len(sent), abs=1e-9)
    assert store.feedback_counts("shared") == {"accepted": len(rewards), "unknown": 0, "duplicate": len(twice),
                                               "invalid": 0}  # fmt: skip
    # either server reports the same shared posterior
    views = [httpx.get(url + "/experiments/shared", timeout=10).json()["arms"] for url in urls]
    assert views[0]["v1"]["samples"] == views[1]["v1"]["samples"] == stats["v1"].samples
