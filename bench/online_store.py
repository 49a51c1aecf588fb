"""Online store benchmark: read latency and materialization throughput vs. bare redis-py baselines.

    .venv/bin/python bench/online_store.py [--entities 1000000] [--baseline-rows 200000] [--quick]

Uses only the Redis on 127.0.0.1:6379 (or --redis-url), under a `bench_online_<pid>` prefix that
is deleted afterwards. Prints p50/p99 read latency for 1 and 100 entities (20 float features: one
view, three views; and the fraud model's 5 views) against, measured in the same run,
(a) redis-py pipelined HMGET over one hash per entity and (b) one MGET of packed values; then
materialization rows/s and peak RSS for --entities entities against plain pipelined HSET.
The same store on a local three-master Redis Cluster, against this one in the same process:
bench/online_store_cluster.py (a separate script: this one is already near 400 lines).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml_platform.featurestore.definitions import Entity, FeatureView, Field, FileSource, Float64, ValueType
from ml_platform.featurestore.online import RedisOnlineStore

NOW = datetime.now(UTC).replace(microsecond=0)
TS = pa.timestamp("us", tz="UTC")
user = Entity("user", join_keys=["user_id"])
SOURCE = FileSource("bench.parquet")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def float_view(name: str, features: list[str]) -> FeatureView:
    return FeatureView(
        name, [user], SOURCE, schema=[Field(f, Float64) for f in features], ttl=timedelta(days=30)
    )


def float_batches(n: int, features: list[str], chunk: int = 100_000, seed: int = 0):
    """Synthetic latest-feature rows, generated chunk by chunk (as a RecordBatchReader would)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        cols = {
            "user_id": pa.array(np.arange(start, start + m, dtype=np.int64)),
            "event_timestamp": pa.array(np.full(m, int(NOW.timestamp() * 1e6), dtype=np.int64)).cast(TS),
        }
        for f in features:
            cols[f] = pa.array(rng.random(m))
        yield pa.RecordBatch.from_pydict(cols)


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    a = np.array(samples) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99)), float(np.percentile(a, 99.9))


def measure(cases: dict, iterations: int, warmup: int = 200) -> dict[str, tuple[float, float, float]]:
    """Run the cases interleaved (round-robin) so machine noise hits all of them alike."""
    names = list(cases)
    for name in names:
        for _ in range(warmup):
            cases[name]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(iterations):
        for name in names:
            fn = cases[name]
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {n: percentiles(s) for n, s in samples.items()}


def bench_reads(client: redis.Redis, project: str, entities: int, iterations: int) -> None:
    feats20 = [f"f{i:02d}" for i in range(20)]
    one = float_view("bench20", feats20)
    three = [
        float_view("bench_a", feats20[:7]),
        float_view("bench_b", feats20[7:14]),
        float_view("bench_c", feats20[14:]),
    ]
    from ml_platform.features import FEATURE_VIEWS, MODEL_FEATURE_REFS

    store = RedisOnlineStore(client, project=project, views=[one, *three, *FEATURE_VIEWS])
    store.write_view(one, float_batches(entities, feats20))
    for v in three:
        store.write_view(v, float_batches(entities, v.feature_names, seed=1))
    n_merchants = max(entities // 10, 1)
    for v in FEATURE_VIEWS:  # the fraud model's views, keyed as in ml_platform.features
        store.write_view(v, fraud_view_rows(v, entities, n_merchants))

    # Baselines: (a) one hash per entity, 20 fields, pipelined HMGET; (b) one packed string per
    # entity, single MGET. Same values, same entities.
    base = f"{project}:baseline"
    pipe = client.pipeline(transaction=False)
    rng = np.random.default_rng(3)
    packed_dtype = np.dtype([("ts", "<i8"), ("f", "<f8", 20)])
    for start in range(0, entities, 2000):
        ids = range(start, min(start + 2000, entities))
        vals = rng.random((len(ids), 20))
        for i, row in zip(ids, vals):
            pipe.hset(f"{base}:h:{i}", mapping={f: repr(float(x)) for f, x in zip(feats20, row)})
            rec = np.zeros(1, packed_dtype)
            rec["f"] = row
            pipe.set(f"{base}:k:{i}", rec.tobytes())
        pipe.execute()

    refs1 = one.feature_refs()
    refs3 = [r for v in three for r in v.feature_refs()]

    # Requests are drawn before timing (a pool cycled through), so only the read itself is timed.
    pool_size = 64
    user_pools = {
        k: [[random.randrange(entities) for _ in range(k)] for _ in range(pool_size)] for k in (1, 100)
    }
    rows_pools = {k: [[{"user_id": u} for u in ids] for ids in pools] for k, pools in user_pools.items()}
    fraud_pools = {
        k: [[{"user_id": u, "merchant_id": random.randrange(n_merchants)} for u in ids] for ids in pools]
        for k, pools in user_pools.items()
    }
    hash_keys = {k: [[f"{base}:h:{u}" for u in ids] for ids in pools] for k, pools in user_pools.items()}
    str_keys = {k: [[f"{base}:k:{u}" for u in ids] for ids in pools] for k, pools in user_pools.items()}
    counter = iter(range(10**12))

    def pick(pools: dict, k: int):
        return pools[k][next(counter) % pool_size]

    def hmget_baseline(k: int):
        p = client.pipeline(transaction=False)
        for key in pick(hash_keys, k):
            p.hmget(key, feats20)
        return p.execute()

    def mget_baseline(k: int):
        return client.mget(pick(str_keys, k))

    print(
        f"\n== Online read latency (ms), {entities:,} entities per view, {iterations} iterations each, in process"
    )
    print("   ours = RedisOnlineStore.read() incl. decoding to a dict of Python lists and the TTL check;")
    print("   baselines return raw bytes (no decoding).")
    header = f"{'case':58s} {'p50':>7s} {'p99':>7s} {'p99.9':>7s}"
    for k in (1, 100):
        cases = {
            f"ours: 1 view x 20 features, {k} entities": lambda k=k: store.read(refs1, pick(rows_pools, k)),
            f"ours: 3 views (7+7+6 features), {k} entities": lambda k=k: store.read(
                refs3, pick(rows_pools, k)
            ),
            f"ours: fraud model, 5 views, 23 features, {k} entities": lambda k=k: store.read(
                MODEL_FEATURE_REFS, pick(fraud_pools, k)
            ),
            f"baseline: redis-py pipelined HMGET (hash/entity), {k}": lambda k=k: hmget_baseline(k),
            f"baseline: single MGET of packed values, {k}": lambda k=k: mget_baseline(k),
        }
        results = measure(cases, iterations if k == 1 else max(iterations // 2, 100))
        print(header)
        for name, (p50, p99, p999) in results.items():
            print(f"{name:58s} {p50:7.3f} {p99:7.3f} {p999:7.3f}")
        names = list(results)
        ours, hm, mg = results[names[0]], results[names[3]], results[names[4]]
        goal = 0.5 if k == 1 else 2.0
        print(
            f"   -> {k} entities: ours p99 {ours[1]:.3f} ms (goal < {goal} ms: {'MET' if ours[1] < goal else 'NOT MET'}); "
            f"p99 ratio HMGET/ours = {hm[1] / ours[1]:.1f}x, MGET/ours = {mg[1] / ours[1]:.2f}x; "
            f"p50 ratio HMGET/ours = {hm[0] / ours[0]:.1f}x, MGET/ours = {mg[0] / ours[0]:.2f}x"
        )
    # The stream worker's write path: newer-wins upsert of a few entities into the live version.
    print("\n== update_entities (stream worker path: newer-wins Lua upsert), 20 float features")
    update_pools = {
        k: [
            [{"user_id": u, "event_timestamp": NOW, **{f: 0.5 for f in feats20}} for u in ids]
            for ids in user_pools[k]
        ]
        for k in (1, 100)
    }
    results = measure(
        {
            f"update_entities, {k} entities": (lambda k=k: store.update_entities(one, pick(update_pools, k)))
            for k in (1, 100)
        },
        max(iterations // 3, 100),
        warmup=50,
    )
    for name, (p50, p99, p999) in results.items():
        print(f"{name:58s} {p50:7.3f} {p99:7.3f} {p999:7.3f}")
    store.delete_project()
    delete_prefix(client, base + ":")
    store.close()


def fraud_view_rows(view: FeatureView, n_users: int, n_merchants: int) -> pa.Table:
    rng = np.random.default_rng(7)
    keys = view.join_keys
    n = n_users if keys == ("user_id",) else n_merchants if keys == ("merchant_id",) else n_users
    cols: dict[str, pa.Array] = {}
    if keys == ("user_id", "merchant_id"):
        cols["user_id"] = pa.array(np.arange(n, dtype=np.int64))
        cols["merchant_id"] = pa.array(np.arange(n, dtype=np.int64) % n_merchants)
    else:
        cols[keys[0]] = pa.array(np.arange(n, dtype=np.int64))
    cols["event_timestamp"] = pa.array(np.full(n, int(NOW.timestamp() * 1e6), dtype=np.int64)).cast(TS)
    for f in view.schema:
        if f.dtype is ValueType.String:
            cols[f.name] = pa.array(rng.choice(["DE", "FR", "US", "GB"], n))
        elif f.dtype is ValueType.Int64:
            cols[f.name] = pa.array(rng.integers(0, 1000, n))
        else:
            cols[f.name] = pa.array(rng.random(n) * 100)
    return pa.table(cols)


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    n = 0
    batch = []
    for key in client.scan_iter(match=prefix + "*", count=5000):
        batch.append(key)
        if len(batch) >= 2000:
            n += client.unlink(*batch)
            batch = []
    if batch:
        n += client.unlink(*batch)
    return n


def bench_materialize(client: redis.Redis, project: str, entities: int, baseline_rows: int) -> None:
    feats20 = [f"f{i:02d}" for i in range(20)]
    view = float_view("bench_mat", feats20)
    store = RedisOnlineStore(client, project=project, views=[view])
    print(f"\n== Materialization: {entities:,} entities x 20 float features")
    gc.collect()
    # The input as the feature store hands it over: one Arrow table in memory.
    table = pa.Table.from_batches(list(float_batches(entities, feats20)))
    table_mb = table.nbytes / 2**20
    rss_before = current_rss_mb()
    peak_before = rss_mb()
    result = store.write_view(view, table, as_of=NOW)
    peak_after = rss_mb()
    extra = max(0.0, peak_after - max(peak_before, rss_before))
    used = client.info("memory")["used_memory"] / 2**20
    print(
        f"ours, full (new version + atomic flip): {result['rows']:,} rows in {result['seconds']:.2f} s = "
        f"{result['rows_per_s']:,.0f} rows/s; input table {table_mb:.0f} MB; process peak RSS {peak_after:.0f} MB "
        f"(+{extra:.0f} MB over the process before the write); Redis used_memory {used:.0f} MB"
    )
    # A second full run: the same work plus the flip and deleting the 1M-entity old version.
    result2 = store.write_view(view, table, as_of=NOW)
    print(
        f"ours, full again (replaces the 1M version):  {result2['rows_per_s']:,.0f} rows/s ({result2['seconds']:.2f} s)"
    )
    inc_rows = min(baseline_rows, entities)
    inc = store.write_view(view, table.slice(0, inc_rows), mode="incremental", as_of=NOW)
    print(f"ours, incremental (newer-wins Lua upsert), {inc_rows:,} rows: {inc['rows_per_s']:,.0f} rows/s")
    del table
    store.delete_project()
    gc.collect()

    # Baseline: plain redis-py pipelined HSET, one hash per entity, 1000 commands per pipeline.
    rows = min(baseline_rows, entities)
    batches = list(float_batches(rows, feats20, seed=5))
    base = f"{project}:baseline_hset"
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for batch in batches:
        d = batch.to_pydict()
        ids, ts = d["user_id"], d["event_timestamp"]
        cols = [d[f] for f in feats20]
        for i in range(batch.num_rows):
            mapping = {f: c[i] for f, c in zip(feats20, cols)}
            mapping["event_timestamp"] = ts[i].isoformat()
            pipe.hset(f"{base}:{ids[i]}", mapping=mapping)
            if len(pipe) >= 1000:
                pipe.execute()
    pipe.execute()
    base_s = time.perf_counter() - started
    base_rate = rows / base_s
    print(
        f"baseline, redis-py pipelined HSET (hash per entity), {rows:,} rows: {base_rate:,.0f} rows/s ({base_s:.2f} s)"
    )
    delete_prefix(client, base + ":")
    ok_rate = result["rows_per_s"] >= 200_000
    ok_time = result["seconds"] < 10 or entities < 1_000_000
    print(
        f"   -> ratio ours/baseline = {result['rows_per_s'] / base_rate:.1f}x; goal >= 200k rows/s: "
        f"{'MET' if ok_rate else 'NOT MET'}; 1M entities < 10 s: {'MET' if ok_time else 'NOT MET'} "
        f"({result['seconds']:.2f} s)"
    )
    store.close()


def _reader_process(url: str, project: str, view: FeatureView, entities: int, conn) -> None:
    """Read 1 entity in a loop until told to stop (another process, as the HTTP API would be)."""
    client = redis.Redis.from_url(url)
    store = RedisOnlineStore(client, project=project, views=[view])
    refs = view.feature_refs()
    rng = random.Random(1)
    samples = []
    conn.send("ready")
    while not conn.poll():
        rows = [{"user_id": rng.randrange(entities)}]
        t = time.perf_counter()
        store.read(refs, rows)
        samples.append(time.perf_counter() - t)
    conn.send(percentiles(samples) + (len(samples),))


def bench_reads_during_materialization(url: str, client: redis.Redis, project: str, entities: int) -> None:
    import multiprocessing as mp

    feats20 = [f"f{i:02d}" for i in range(20)]
    view = float_view("bench_during", feats20)
    store = RedisOnlineStore(client, project=project, views=[view])
    table = pa.Table.from_batches(list(float_batches(entities, feats20)))
    store.write_view(view, table)
    print(
        f"\n== Read latency (1 entity, another process) while a full materialization of {entities:,} entities runs"
    )
    ctx = mp.get_context("fork")
    for batch_size, window in ((None, None), (1000, 8), (250, 4)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_reader_process, args=(url, project, view, entities, child))
        proc.start()
        parent.recv()
        if batch_size is None:
            time.sleep(2.0)
            label = "idle (no materialization)"
        else:
            store.batch_size, store.pipeline_window = batch_size, window
            result = store.write_view(view, table)
            default = " (default)" if (batch_size, window) == (250, 4) else ""
            label = f"during full write, {batch_size} rows/cmd, {window} in flight{default} ({result['rows_per_s']:,.0f} rows/s)"
        parent.send("stop")
        p50, p99, p999, n = parent.recv()
        proc.join()
        print(f"{label:62s} p50 {p50:.3f}  p99 {p99:.3f}  p99.9 {p999:.3f} ms  ({n} reads)")
    store.delete_project()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--entities", type=int, default=1_000_000, help="entities for the materialization run"
    )
    parser.add_argument(
        "--read-entities", type=int, default=100_000, help="entities per view for the read runs"
    )
    parser.add_argument(
        "--baseline-rows", type=int, default=200_000, help="rows for the (slow) HSET baseline"
    )
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--skip-during", action="store_true", help="skip reads during a materialization")
    args = parser.parse_args()
    if args.quick:
        args.entities, args.read_entities, args.baseline_rows, args.iterations = 50_000, 10_000, 20_000, 300
    client = redis.Redis.from_url(args.redis_url, decode_responses=False)
    try:
        import hiredis  # noqa: F401

        parser_name = "hiredis"
    except ImportError:
        parser_name = "pure-Python parser"
    print(
        f"redis-server {client.info('server')['redis_version']}, redis-py {redis.__version__} ({parser_name}), "
        f"pyarrow {pa.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    project = f"bench_online_{os.getpid()}"
    random.seed(0)
    try:
        bench_reads(client, project, args.read_entities, args.iterations)
        bench_materialize(client, project, args.entities, args.baseline_rows)
        if not args.skip_during:
            bench_reads_during_materialization(args.redis_url, client, project, args.entities)
    finally:
        deleted = delete_prefix(client, project + ":")
        print(f"\ncleaned up {deleted} leftover keys under {project}:*")


if __name__ == "__main__":
    main()
