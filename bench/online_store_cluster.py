"""Online store on Redis Cluster vs. the same store on one Redis, measured in one process.

    .venv/bin/python bench/online_store_cluster.py [--entities 1000000] [--iterations 2000] [--quick]

Starts a local three-master cluster (`LocalRedisCluster`, system redis-server, free loopback
ports, files under --cluster-dir, removed afterwards) and uses the single Redis on
127.0.0.1:6379 (or --redis-url) under a `bench_cluster_<pid>` prefix, deleted afterwards. The
same views, values and entities go to both. Prints, with cases interleaved: read latency for 1
and 100 entities (1 view x 20 features, the fraud model's 5 views) on one node and on the
cluster, against redis-py's own cluster client (pipelined HMGET over one hash per entity and
mget_nonatomic of packed values); update_entities; full and incremental materialization rows/s.
All three masters and the client share this machine's CPUs, so the cluster figures measure the
protocol's cost (more commands per read), not a cluster's capacity.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from online_store import NOW, delete_prefix, float_batches, float_view, fraud_view_rows, measure

from ml_platform.featurestore.online import RedisOnlineStore
from ml_platform.featurestore.redis_cluster import LocalRedisCluster, cluster_client_from_url


def bench(
    single: redis.Redis, cluster, project: str, entities: int, mat_entities: int, iterations: int
) -> None:
    from ml_platform.features import FEATURE_VIEWS, MODEL_FEATURE_REFS

    feats20 = [f"f{i:02d}" for i in range(20)]
    one = float_view("bench20", feats20)
    stores = {
        "1 node": RedisOnlineStore(single, project=project, views=[one, *FEATURE_VIEWS]),
        "cluster": RedisOnlineStore(cluster, project=project, views=[one, *FEATURE_VIEWS]),
    }
    n_merchants = max(entities // 10, 1)
    for store in stores.values():
        store.write_view(one, float_batches(entities, feats20))
        for v in FEATURE_VIEWS:
            store.write_view(v, fraud_view_rows(v, entities, n_merchants))
    # redis-py's own cluster client on the same data: one hash per entity / one packed string.
    base = f"{project}:baseline"
    rng = np.random.default_rng(3)
    packed_dtype = np.dtype([("ts", "<i8"), ("f", "<f8", 20)])
    for start in range(0, entities, 2000):
        pipe = cluster.pipeline(transaction=False)
        ids = range(start, min(start + 2000, entities))
        for i, row in zip(ids, rng.random((len(ids), 20))):
            pipe.hset(f"{base}:h:{i}", mapping={f: repr(float(x)) for f, x in zip(feats20, row)})
            rec = np.zeros(1, packed_dtype)
            rec["f"] = row
            pipe.set(f"{base}:k:{i}", rec.tobytes())
        pipe.execute()

    pool = 64
    users = {k: [[random.randrange(entities) for _ in range(k)] for _ in range(pool)] for k in (1, 100)}
    rows = {k: [[{"user_id": u} for u in ids] for ids in p] for k, p in users.items()}
    fraud = {
        k: [[{"user_id": u, "merchant_id": random.randrange(n_merchants)} for u in ids] for ids in p]
        for k, p in users.items()
    }
    counter = iter(range(10**12))

    def pick(pools, k):
        return pools[k][next(counter) % pool]

    def hmget(k):
        p = cluster.pipeline(transaction=False)
        for u in pick(users, k):
            p.hmget(f"{base}:h:{u}", feats20)
        return p.execute()

    def mget(k):
        return cluster.mget_nonatomic([f"{base}:k:{u}" for u in pick(users, k)])

    refs = one.feature_refs()
    print(f"\n== Online read latency (ms), {entities:,} entities per view, cases interleaved")
    print(f"{'case':58s} {'p50':>7s} {'p99':>7s} {'p99.9':>7s}")
    for k in (1, 100):
        cases = {}
        for where, store in stores.items():
            cases[f"ours, {where}: 1 view x 20 features, {k}"] = lambda k=k, s=store: s.read(
                refs, pick(rows, k)
            )
            cases[f"ours, {where}: fraud model (5 views), {k}"] = lambda k=k, s=store: s.read(
                MODEL_FEATURE_REFS, pick(fraud, k)
            )
        cases[f"redis-py cluster: pipelined HMGET, {k}"] = lambda k=k: hmget(k)
        cases[f"redis-py cluster: mget_nonatomic packed, {k}"] = lambda k=k: mget(k)
        results = measure(cases, iterations if k == 1 else max(iterations // 2, 100))
        for name, (p50, p99, p999) in results.items():
            print(f"{name:58s} {p50:7.3f} {p99:7.3f} {p999:7.3f}")
        r = list(results.values())
        print(
            f"   -> {k}: cluster/1 node p50 = {r[2][0] / r[0][0]:.2f}x (1 view), {r[3][0] / r[1][0]:.2f}x (fraud); "
            f"redis-py HMGET/ours on the cluster p50 = {r[4][0] / r[2][0]:.1f}x, p99 = {r[4][1] / r[2][1]:.1f}x"
        )
    print("\n== update_entities, 20 float features")
    updates = {
        k: [[{"user_id": u, "event_timestamp": NOW, **{f: 0.5 for f in feats20}} for u in ids] for ids in p]
        for k, p in users.items()
    }
    cases = {
        f"update_entities, {where}, {k}": (lambda k=k, s=store: s.update_entities(one, pick(updates, k)))
        for k in (1, 100)
        for where, store in stores.items()
    }
    for name, (p50, p99, p999) in measure(cases, max(iterations // 3, 100), warmup=50).items():
        print(f"{name:58s} {p50:7.3f} {p99:7.3f} {p999:7.3f}")
    for store in stores.values():
        store.delete_project()
    delete_prefix(single, base + ":")
    for key_batch in _chunks(list(cluster.scan_iter(match=base + ":*", count=5000)), 2000):
        cluster.unlink(*key_batch)

    import pyarrow as pa

    print(f"\n== Materialization: {mat_entities:,} entities x 20 float features")
    mat = float_view("bench_mat", feats20)
    table = pa.Table.from_batches(list(float_batches(mat_entities, feats20)))
    for where, client in (("1 node", single), ("cluster", cluster)):
        store = RedisOnlineStore(client, project=project, views=[mat])
        full = store.write_view(mat, table, as_of=NOW)
        again = store.write_view(mat, table, as_of=NOW)
        inc_rows = min(200_000, mat_entities)
        inc = store.write_view(mat, table.slice(0, inc_rows), mode="incremental", as_of=NOW)
        print(
            f"{where:8s} full {full['rows_per_s']:>9,.0f} rows/s ({full['seconds']:.2f} s), full again "
            f"{again['rows_per_s']:>9,.0f} rows/s, incremental {inc_rows:,} rows {inc['rows_per_s']:>9,.0f} rows/s"
        )
        store.delete_project()
        store.close()
    for store in stores.values():
        store.close()


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster-dir", default=f"/tmp/online_bench_cluster_{os.getpid()}")
    parser.add_argument("--read-entities", type=int, default=100_000)
    parser.add_argument(
        "--entities", type=int, default=1_000_000, help="entities for the materialization run"
    )
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.read_entities, args.entities, args.iterations = 10_000, 50_000, 200
    single = redis.Redis.from_url(args.redis_url)
    project = f"bench_cluster_{os.getpid()}"
    random.seed(0)
    with LocalRedisCluster(args.cluster_dir, masters=3) as local:
        cluster = cluster_client_from_url(local.url)
        print(
            f"redis-server {single.info('server')['redis_version']} (1 node) and a local 3-master cluster "
            f"({local.url}); redis-py {redis.__version__}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
        )
        try:
            bench(single, cluster, project, args.read_entities, args.entities, args.iterations)
        finally:
            print(f"\ncleaned up {delete_prefix(single, project + ':')} leftover keys on the single node")
            cluster.close()


if __name__ == "__main__":
    main()
