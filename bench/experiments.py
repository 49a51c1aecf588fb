"""Experiments benchmark: the router's cost per request, feedback ingestion, and /predict at a
fixed rate with an experiment of three arms and a 100 % shadow, each against a baseline run in the
same process.

    .venv/bin/python bench/experiments.py [--rate 300] [--duration 60] [--quick]

1. Router decision (in memory, from the posterior snapshot): p50/p99 of `ExperimentRouter.assign`
   for one row over 3 arms, vs one Redis PING round trip (what a router that reads its posteriors
   per request pays at least); plus the decision record (one pipelined HSET+EXPIRE+HINCRBY, on the
   request path so that feedback can never arrive before it).
2. Feedback ingestion: rewards/s through `ExperimentStore.feedback_sync` (one Lua call per reward,
   pipelined 1000 at a time) and through POST /feedback/batch on a running server, vs the same
   number of plain HINCRBYs pipelined (Redis' own ceiling for one small write).
3. HTTP: `bench/http_api.py`'s open-loop load generator at `--rate` requests/s against one
   uvicorn worker, first with no experiment, then with a Thompson experiment over v2/v3/v4 and v1
   in shadow on 100 % of the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ml_platform_tests"))
sys.path.insert(0, str(REPO / "bench"))


def _pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def router_overhead(client, project: str, calls: int) -> dict:
    import redis.asyncio as aioredis
    from fixtures_platform import TEST_REDIS_URL

    from ml_platform.experiments.config import ExperimentConfig
    from ml_platform.experiments.router import ExperimentRouter
    from ml_platform.experiments.store import ExperimentStore

    loop = asyncio.new_event_loop()
    aclient = aioredis.Redis.from_url(TEST_REDIS_URL)
    store = ExperimentStore(client, project, aclient)
    store.start(ExperimentConfig(name="bench-router", arms={"a": 1, "b": 2, "c": 3}, exploration_floor=0.01), who="bench")
    pids = [uuid.uuid4().hex for _ in range(3000)]
    loop.run_until_complete(store.record_decisions("bench-router", pids, ["a", "b", "c"] * 1000, [0.3] * 3000, 600))
    store.feedback_sync([(pid, float(i % 3 == 1)) for i, pid in enumerate(pids)])
    router = ExperimentRouter(store, load=lambda version: version)
    active = router.refresh()
    decide, ping, record = [], [], []
    for _ in range(calls):
        t = time.perf_counter_ns()
        router.assign(1, active)
        decide.append((time.perf_counter_ns() - t) / 1e6)
    for _ in range(min(calls, 5000)):
        t = time.perf_counter_ns()
        client.ping()
        ping.append((time.perf_counter_ns() - t) / 1e6)

    async def records(n: int) -> None:
        for _ in range(n):
            t = time.perf_counter_ns()
            await store.record_decisions("bench-router", [uuid.uuid4().hex], ["a"], [0.3], 600)
            record.append((time.perf_counter_ns() - t) / 1e6)

    loop.run_until_complete(records(min(calls, 5000)))
    loop.run_until_complete(aclient.aclose())
    loop.close()
    return {
        "decide_p50_ms": _pct(decide, 50), "decide_p99_ms": _pct(decide, 99),
        "ping_p50_ms": _pct(ping, 50), "ping_p99_ms": _pct(ping, 99),
        "record_p50_ms": _pct(record, 50), "record_p99_ms": _pct(record, 99),
    }  # fmt: skip


def feedback_ingestion(client, project: str, rewards: int) -> dict:
    import redis.asyncio as aioredis
    from fixtures_platform import TEST_REDIS_URL

    from ml_platform.experiments.config import ExperimentConfig
    from ml_platform.experiments.store import ExperimentStore

    loop = asyncio.new_event_loop()
    aclient = aioredis.Redis.from_url(TEST_REDIS_URL)
    store = ExperimentStore(client, project, aclient)
    store.start(ExperimentConfig(name="bench-feedback", arms={"a": 1, "b": 2, "c": 3}), who="bench")
    pids = [f"fb-{i}" for i in range(rewards)]
    arms = [("a", "b", "c")[i % 3] for i in range(rewards)]
    for i in range(0, rewards, 5000):
        loop.run_until_complete(store.record_decisions("bench-feedback", pids[i:i + 5000], arms[i:i + 5000],
                                                       [0.33] * len(pids[i:i + 5000]), 600))  # fmt: skip
    rng = random.Random(0)
    items = [(pid, float(rng.random() < 0.5)) for pid in pids]
    t = time.perf_counter()
    for i in range(0, rewards, 1000):
        outcomes = store.feedback_sync(items[i:i + 1000])
        assert all(o == "accepted" for o, _ in outcomes)
    lua_s = time.perf_counter() - t
    stats = store.stats("bench-feedback")
    assert sum(s.samples for s in stats.values()) == rewards, "every reward counted exactly once"
    key = f"{project}:bench:plain"
    t = time.perf_counter()
    for i in range(0, rewards, 1000):
        with client.pipeline(transaction=False) as pipe:
            for _ in range(min(1000, rewards - i)):
                pipe.hincrby(key, "n", 1)
            pipe.execute()
    plain_s = time.perf_counter() - t
    loop.run_until_complete(aclient.aclose())
    loop.close()
    return {"lua_rewards_per_s": rewards / lua_s, "plain_hincrby_per_s": rewards / plain_s}


def http_feedback(url: str, pids: list[str]) -> float:
    """Rewards/s through POST /feedback/batch (1000 per call, 4 calls in flight)."""
    import httpx

    async def run() -> float:
        async with httpx.AsyncClient(timeout=30) as http:
            chunks = [pids[i:i + 1000] for i in range(0, len(pids), 1000)]
            sem = asyncio.Semaphore(4)
            accepted = 0

            async def send(chunk):
                nonlocal accepted
                async with sem:
                    r = await http.post(url + "/feedback/batch",
                                        json={"feedback": [{"prediction_id": p, "reward": 1.0} for p in chunk]})  # fmt: skip
                    r.raise_for_status()
                    accepted += r.json()["accepted"]

            t = time.perf_counter()
            await asyncio.gather(*(send(c) for c in chunks))
            took = time.perf_counter() - t
            assert accepted == len(pids), f"{accepted} of {len(pids)} accepted"
            return len(pids) / took

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="10 s runs, a smaller platform")
    args = parser.parse_args()
    if args.quick:
        args.duration = 10.0

    import http_api
    import redis
    from fixtures_platform import (
        TEST_REDIS_URL,
        ServerProcess,
        _train_and_register,
        build_tiny_platform,
        delete_project_keys,
    )

    from ml_platform import features as fr
    from ml_platform.experiments.config import ExperimentConfig
    from ml_platform.experiments.manage import start_experiment
    from ml_platform.experiments.store import ExperimentStore

    client = redis.Redis.from_url(TEST_REDIS_URL)
    project = f"bench_exp_{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="bench_exp_"))
    results: dict = {}
    try:
        print("router decision vs a Redis round trip ...", flush=True)
        results["router"] = router_overhead(client, project + "_router", 20_000 if not args.quick else 5000)
        print(f"  {results['router']}", flush=True)
        print("feedback ingestion ...", flush=True)
        results["feedback"] = feedback_ingestion(client, project + "_fb", 50_000 if not args.quick else 10_000)
        print(f"  {results['feedback']}", flush=True)

        print(f"building the platform in {tmp} ...", flush=True)
        config = {"n_users": 2000, "n_merchants": 300, "days": 30} if not args.quick else None
        platform = build_tiny_platform(tmp / "platform", project=project, config=config,
                                       v2_params=None if args.quick else {"max_iter": 200})  # fmt: skip
        refs = list(fr.MODEL_FEATURE_REFS)
        for run_name, iters in (("v3", 150), ("v4", 100)):
            _train_and_register(platform.registry, platform.store, platform.settings.raw_dir, refs,
                                {"max_iter": iters if not args.quick else 30}, run_name)  # fmt: skip
        pairs = platform.events[["user_id", "merchant_id"]].drop_duplicates().sample(n=2000, random_state=0, replace=True)
        rng = random.Random(0)
        now = datetime.now(UTC).isoformat()
        bodies = [json.dumps({"transaction_id": f"bench-{k}", "user_id": int(u), "merchant_id": int(m),
                              "merchant_category": rng.choice(["grocery", "electronics", "travel", "fuel"]),
                              "amount": round(rng.lognormvariate(3.5, 1.0), 2), "country": rng.choice(["DE", "FR", "US"]),
                              "device": rng.choice(["ios", "android", "desktop"]), "channel": rng.choice(["online", "pos"]),
                              "event_timestamp": now})
                  for k, (u, m) in enumerate(pairs.itertuples(index=False))]  # fmt: skip
        bodies_file = tmp / "bodies.jsonl"
        bodies_file.write_text("\n".join(bodies) + "\n")
        store = ExperimentStore(client, project)
        experiment = ExperimentConfig(name="bench-3arms-shadow", arms={"v2": 2, "v3": 3, "v4": 4},
                                      shadow_version=1, shadow_share=1.0)  # fmt: skip
        for case in ("no experiment", "3 arms + 100 % shadow"):
            if case != "no experiment":
                start_experiment(store, platform.registry, experiment, who="bench")
            with ServerProcess(platform.settings, log_path=tmp / f"server_{len(results)}.log") as server:
                url = server.url + "/predict"
                http_api.run_loadgen("fixed", url, str(bodies_file), "100", "3", "10")  # warm-up
                print(f"\n[{case}] {args.rate:.0f}/s for {args.duration:.0f} s ...", flush=True)
                fixed = http_api.run_loadgen("fixed", url, str(bodies_file), str(args.rate), str(args.duration), "10")
                entry = {"fixed": fixed}
                if case != "no experiment":
                    import httpx

                    info = httpx.get(server.url + f"/experiments/{experiment.name}", timeout=10).json()
                    entry["arms"] = {a: s["served"] for a, s in info["arms"].items()}
                    entry["shadow"] = info["shadow"]
                    pids = [f"bench-http-{i}" for i in range(20_000)]
                    loop = asyncio.new_event_loop()
                    import redis.asyncio as aioredis

                    astore = ExperimentStore(client, project, aioredis.Redis.from_url(TEST_REDIS_URL))
                    for i in range(0, len(pids), 5000):
                        loop.run_until_complete(astore.record_decisions(experiment.name, pids[i:i + 5000],
                                                                        ["v2"] * 5000, [0.33] * 5000, 600))  # fmt: skip
                    loop.close()
                    entry["http_feedback_per_s"] = http_feedback(server.url, pids)
                results[case] = entry
                print(f"  p50 {fixed['p50_ms']:.2f} ms  p99 {fixed['p99_ms']:.2f} ms  max {fixed['max_ms']:.1f} ms  "
                      f"errors {fixed['errors']} of {fixed['requests']}  {entry.get('arms', '')} {entry.get('shadow', '')}",
                      flush=True)  # fmt: skip
        platform.cleanup()
    finally:
        for prefix in (project, project + "_router", project + "_fb"):
            delete_project_keys(client, prefix)
        shutil.rmtree(tmp, ignore_errors=True)

    r, f = results["router"], results["feedback"]
    base, exp = results["no experiment"]["fixed"], results["3 arms + 100 % shadow"]["fixed"]
    print(f"\n=== {datetime.now(UTC):%Y-%m-%d} | {os.cpu_count()} CPUs | 1 uvicorn worker | {args.rate:.0f} req/s "
          f"for {args.duration:.0f} s ===")  # fmt: skip
    print("| measure | figure | baseline (same run) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| router decision, 1 row, 3 arms: p99 | {r['decide_p99_ms'] * 1000:.1f} µs | Redis PING p99 "
          f"{r['ping_p99_ms'] * 1000:.1f} µs | {r['ping_p99_ms'] / r['decide_p99_ms']:.1f}x cheaper |")  # fmt: skip
    print(f"| decision record (on the request path): p50 / p99 | {r['record_p50_ms'] * 1000:.0f} / "
          f"{r['record_p99_ms'] * 1000:.0f} µs | PING p50 {r['ping_p50_ms'] * 1000:.0f} µs | "
          f"{r['record_p50_ms'] / r['ping_p50_ms']:.1f}x a round trip |")  # fmt: skip
    print(f"| feedback ingestion, Lua per reward | {f['lua_rewards_per_s']:,.0f} rewards/s | plain HINCRBY "
          f"{f['plain_hincrby_per_s']:,.0f}/s | {f['lua_rewards_per_s'] / f['plain_hincrby_per_s']:.2f}x |")  # fmt: skip
    http_fb = results["3 arms + 100 % shadow"]["http_feedback_per_s"]
    print(f"| feedback ingestion, POST /feedback/batch | {http_fb:,.0f} rewards/s | library path | "
          f"{http_fb / f['lua_rewards_per_s']:.2f}x |")  # fmt: skip
    print(f"| /predict p50 / p99 with 3 arms + 100 % shadow | {exp['p50_ms']:.2f} / {exp['p99_ms']:.2f} ms, "
          f"{exp['errors']} errors of {exp['requests']} | no experiment {base['p50_ms']:.2f} / {base['p99_ms']:.2f} ms, "
          f"{base['errors']} errors | p99 {exp['p99_ms'] / base['p99_ms']:.2f}x |")  # fmt: skip
    goals = (r["decide_p99_ms"] < 0.2 and exp["p99_ms"] < 25 and exp["errors"] == 0 and f["lua_rewards_per_s"] >= 10_000)
    print(f"goals (router p99 < 0.2 ms, p99 < 25 ms at {args.rate:.0f}/s with 0 errors, >= 10k rewards/s): "
          f"{'MET' if goals else 'NOT MET'}")  # fmt: skip


if __name__ == "__main__":
    main()
