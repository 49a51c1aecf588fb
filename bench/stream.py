"""Stream worker benchmark: events/s end to end (XREADGROUP -> features -> champion -> XADD -> XACK)
against baselines measured in the same run.

    .venv/bin/python bench/stream.py [--events 200000] [--batch 500] [--quick] [--skip-two]

Builds a platform in a temp dir (generated history, offline views, a registered champion, the
online store in the Redis on 127.0.0.1:6379 under a `bench_stream_<pid>` prefix, deleted after),
generates the following days' transactions and pre-publishes `--events` of them to one input
stream. Each run reads the whole stream with its own consumer group and output stream, from the
same cold state (buffers re-seeded from the raw history, dedup keys cleared), and is timed from
its first read until every event has its output:

  bare loop      a plain redis-py consumer-group loop: XREADGROUP, json.loads, XADD, XACK (no
                 validation, features or model): the floor any worker pays;
  features only  the worker with a model stand-in that reads no feature and scores nothing
                 (`FeaturesOnly`: validation, dedup, feature fold, online update, atomic emit + ack);
  worker         the full worker with the champion (fast scorer when it passes its parity check);
  worker sklearn the full worker scoring with scikit-learn (assemble_features + predict_proba);
  2 workers      two worker processes in one consumer group.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ml_platform_tests"))

import numpy as np
import pandas as pd
import redis

from ml_platform.serving.champion import ChampionWatcher
from ml_platform.serving.stream import (
    EVENT_FIELD,
    StreamConfig,
    build_worker,
    publish_events,
    seed_once,
    stream_names,
)

HISTORY = {
    "n_users": 20_000,
    "n_merchants": 1_000,
    "days": 10,
    "txns_per_user_per_day": 1.0,
    "fraud_rate": 0.02,
}


class _NoContract:
    feature_refs: tuple[str, ...] = ()
    request_columns: tuple[str, ...] = ()
    decision_threshold = None


class FeaturesOnly:
    """A model source and model in one, for the "features only" run: the worker does everything
    but score (each prediction has a null probability and decision); the model reads no feature."""

    version = 0
    contract = _NoContract()

    def current(self) -> FeaturesOnly:
        return self

    def score_columns(self, request, looked_up) -> np.ndarray:
        return np.full(len(request["amount"]), np.nan)


def bare_loop(client: redis.Redis, stream: str, group: str, output: str, n: int, batch: int) -> float:
    """The floor: read a batch, parse each JSON, XADD one output per event, XACK the batch."""
    client.xgroup_create(stream, group, id="0")
    started = time.perf_counter()
    done = 0
    while done < n:
        reply = client.xreadgroup(group, "bare", {stream: ">"}, count=batch, block=1000)
        if not reply:
            break
        entries = reply[0][1]
        pipe = client.pipeline(transaction=False)
        for entry_id, fields in entries:
            event = json.loads(fields[EVENT_FIELD.encode()])
            pipe.xadd(
                output,
                {
                    "event_id": event["transaction_id"],
                    "prediction": json.dumps({"event_id": event["transaction_id"], "probability": 0.0}),
                },
            )
        pipe.xack(stream, group, *[e[0] for e in entries])
        pipe.execute()
        done += len(entries)
    return time.perf_counter() - started


def reset_state(client: redis.Redis, project: str) -> None:
    """Forget buffers, dedup keys and the seeding record: the next run starts cold."""
    for pattern in (f"{project}:stream:state:*", f"{project}:stream:done:*", f"{project}:stream:seeded*"):
        keys = list(client.scan_iter(match=pattern, count=5000))
        for i in range(0, len(keys), 5000):
            client.unlink(*keys[i : i + 5000])


def settings_from_json(text: str):
    from ml_platform.settings import Settings

    s = json.loads(text)
    return Settings(
        data_dir=Path(s["data_dir"]),
        dagster_home=Path(s["dagster_home"]),
        mlflow_tracking_uri=s["mlflow_tracking_uri"],
        redis_url=s["redis_url"],
        model_name=s["model_name"],
        project=s["project"],
    )


def worker_process(settings_json: str, config_json: str, ready, go, stop) -> None:
    """One worker of the multi-process run: load the model, wait for `go`, run until `stop`."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)
    settings = settings_from_json(settings_json)
    cfg = json.loads(config_json)
    config = StreamConfig(**cfg)
    worker = build_worker(settings, config)
    worker.model_source.check_now()
    ready.set()
    go.wait()
    stop_event = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), stop_event.set()), daemon=True).start()
    worker.run(stop_event)
    worker.close()


def redis_cpu_seconds(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_worker_in_process(settings, config: StreamConfig, n: int, model_source=None) -> tuple[float, dict]:
    """Time one in-process worker draining `n` entries; stats include its own and Redis's CPU."""
    worker = build_worker(settings, config, model_source=model_source)
    if isinstance(worker.model_source, ChampionWatcher):
        worker.model_source.check_now()
    worker.ensure_group()
    redis_before, cpu_before = redis_cpu_seconds(worker.client), time.process_time()
    started = time.perf_counter()
    worker.run(max_entries=n)
    seconds = time.perf_counter() - started
    worker.close()
    stats = worker.stats.as_dict()
    stats["worker_cpu_s"] = round(time.process_time() - cpu_before, 2)
    stats["redis_cpu_s"] = round(redis_cpu_seconds(worker.client) - redis_before, 2)
    return seconds, stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=StreamConfig().batch_size)
    parser.add_argument("--quick", action="store_true", help="20k events, smaller history")
    parser.add_argument("--skip-two", action="store_true", help="skip the two-process run")
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the scikit-learn scorer run")
    parser.add_argument("--skip-features-only", action="store_true", help="skip the no-model run")
    parser.add_argument("--no-pipeline", action="store_true", help="write each batch before reading the next")
    args = parser.parse_args()
    if args.quick:
        args.events = min(args.events, 20_000)
        HISTORY.update(n_users=5_000, days=7)

    from fixtures_platform import build_tiny_platform, settings_to_json, unique_project
    from threadpoolctl import threadpool_limits

    from ml_platform.sources.generator import GeneratorConfig, generate_day

    threadpool_limits(limits=1)
    root = Path(tempfile.mkdtemp(prefix="bench_stream_"))
    t = time.perf_counter()
    platform = build_tiny_platform(
        root, project=unique_project(f"bench_stream_{os.getpid()}"), config=dict(HISTORY)
    )
    print(
        f"platform built in {time.perf_counter() - t:.1f} s: {len(platform.events)} history events, champion v{platform.registry.champion().version}"
    )
    client = platform.redis
    settings = platform.settings
    project = platform.project
    try:
        cfg = dict(HISTORY)
        days = cfg.pop("days")
        gen = GeneratorConfig(start=datetime.now(UTC).date() - timedelta(days=days), days=days, **cfg)
        frames, total, day = [], 0, datetime.now(UTC).date()
        while total < args.events:
            frame = generate_day(gen, day)
            frames.append(frame)
            total += len(frame)
            day += timedelta(days=1)
        events = pd.concat(frames, ignore_index=True).head(args.events)
        names = stream_names(project)
        t = time.perf_counter()
        publish_events(client, names.input, events)
        print(
            f"published {len(events)} events ({events['event_timestamp'].min():%Y-%m-%d} .. "
            f"{events['event_timestamp'].max():%Y-%m-%d}) in {time.perf_counter() - t:.1f} s"
        )
        n = len(events)
        results: dict[str, float] = {}

        def record(label: str, seconds: float, extra: str = "") -> None:
            results[label] = n / seconds
            print(f"{label:<16} {n / seconds:>9,.0f} events/s  ({seconds:.2f} s) {extra}")

        # 1. bare loop
        record(
            "bare loop", bare_loop(client, names.input, "bare", f"{project}:stream:out_bare", n, args.batch)
        )

        def worker_run(label: str, model_source=None, **overrides) -> dict:
            reset_state(client, project)
            base = StreamConfig(
                batch_size=args.batch, block_ms=200, claim_interval_s=3600, pipeline=not args.no_pipeline
            )
            seed = seed_once(
                client, build_worker(settings, model_source=FeaturesOnly()).updater, names, settings.raw_dir
            )
            config = StreamConfig(
                **{
                    **base.__dict__,
                    "group": label.replace(" ", "_"),
                    "output_stream": f"{project}:stream:out_{label.replace(' ', '_')}",
                    **overrides,
                }
            )
            seconds, stats = run_worker_in_process(settings, config, n, model_source)
            assert client.xlen(config.output_stream) == n, (
                f"{label}: {client.xlen(config.output_stream)} outputs for {n} events"
            )
            record(
                label,
                seconds,
                f"[CPU: worker {stats['worker_cpu_s']} s, redis {stats['redis_cpu_s']} s; seeded {seed['rows']} "
                f"history rows in {float(seed['seconds']):.1f} s; {stats['batches']} batches; phases {stats['phase_seconds']}]",
            )
            return stats

        if not args.skip_features_only:
            worker_run("features only", model_source=FeaturesOnly())
        worker_run("worker")
        if not args.skip_sklearn:
            worker_run("worker sklearn", scorer="sklearn")

        if not args.skip_two:
            reset_state(client, project)
            seed_once(
                client, build_worker(settings, model_source=FeaturesOnly()).updater, names, settings.raw_dir
            )
            output = f"{project}:stream:out_two"
            config = {
                "batch_size": args.batch,
                "block_ms": 200,
                "claim_interval_s": 3600,
                "group": "two",
                "output_stream": output,
                "pipeline": not args.no_pipeline,
            }
            client.xgroup_create(names.input, "two", id="0")
            ctx = mp.get_context("spawn")
            go, stop = ctx.Event(), ctx.Event()
            readies = [ctx.Event() for _ in range(2)]
            procs = [
                ctx.Process(
                    target=worker_process,
                    args=(
                        settings_to_json(settings),
                        json.dumps({**config, "consumer": f"w{i}"}),
                        readies[i],
                        go,
                        stop,
                    ),
                )
                for i in range(2)
            ]
            for p in procs:
                p.start()
            for r in readies:
                if not r.wait(180):
                    raise TimeoutError("a worker process did not start")
            started = time.perf_counter()
            go.set()
            while client.xlen(output) < n:
                time.sleep(0.01)
            seconds = time.perf_counter() - started
            stop.set()
            for p in procs:
                p.join(30)
            record("2 workers", seconds)

        print()
        print(f"worker / bare loop:      {results['worker'] / results['bare loop']:.2f}x")
        if "features only" in results:
            print(f"worker / features only:  {results['worker'] / results['features only']:.2f}x")
        if "worker sklearn" in results:
            print(f"worker / worker sklearn: {results['worker'] / results['worker sklearn']:.2f}x")
        if "2 workers" in results:
            print(f"2 workers / 1 worker:    {results['2 workers'] / results['worker']:.2f}x")
        print(
            f"goal >= 10,000 events/s with one worker: {'met' if results['worker'] >= 10_000 else 'NOT met'}"
        )
    finally:
        platform.cleanup()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
