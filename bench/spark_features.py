"""Benchmark: offline materialization of the same feature views on DuckDB and on Spark (local mode).

    python bench/spark_features.py [--events 10000000] [--days 60] [--views user_transaction_stats]
                                   [--workdir DIR] [--keep] [--repeat 1] [--driver-memory 4g]
                                   [--duckdb-memory 4GB] [--threads 2]

The raw events are generated once with the project's generator (`sources.generator`, the card
holders scaled so that `--days` days hold about `--events` events) into `--workdir` (reused when
it already holds the same draw; `--keep` keeps it afterwards). Each engine then materializes the
views (`FeatureStore.materialize_offline` for DuckDB, `SparkOfflineEngine.materialize_offline`
for Spark: the same declarations) in a fresh subprocess, alternating DuckDB and Spark `--repeat`
times in this one run, so the ratio compares runs on the same machine at the same time.

Per engine: wall seconds of the materialization (best of the repeats; the Spark session's start
is reported apart), rows written per second, CPU seconds, and the peak memory of the engine's
whole process tree (the JVM is a child of the Spark worker), sampled every 0.2 s and never below
the worker's own VmHWM. Then a parity check: the two tables hold the same rows with the same
values, every one exactly (the views' sums are fixed point: both engines add cents). Exit code 1
if the check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ENGINES = ("duckdb", "spark")
DEFAULT_VIEWS = ["user_transaction_stats"]  # 16 windowed features (count/sum/mean/max x 1h/24h/7d/30d)
TXNS_PER_USER_DAY = 0.6 * 1.05  # the generator's rate, weekends and fraud included (about)


# ------------------------------------------------------------------------------------- data


def generate(workdir: Path, events: int, days: int, seed: int) -> dict:
    """Write workdir/raw (users + `days` daily partitions) unless the same draw is already there."""
    from ml_platform.sources.generator import GeneratorConfig, write_dataset

    n_users = max(int(events / days / TXNS_PER_USER_DAY), 1000)
    spec = {"n_users": n_users, "n_merchants": max(n_users // 40, 500), "days": days, "seed": seed}
    marker = workdir / "raw.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    shutil.rmtree(workdir / "raw", ignore_errors=True)
    started = time.perf_counter()
    write_dataset(GeneratorConfig(**spec), workdir / "raw")
    rows = _count_rows(workdir / "raw" / "transactions")
    info = {"spec": spec, "rows": rows, "generate_s": round(time.perf_counter() - started, 1)}
    marker.write_text(json.dumps(info))
    return info


def _count_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in folder.rglob("*.parquet"))


def _store(workdir: Path, engine: str, threads: int | None, memory: str | None):
    """A store per engine (its own offline/ folder) on the shared raw data (a symlink)."""
    from ml_platform import features as fr
    from ml_platform.featurestore import FeatureStore

    repo = workdir / f"repo_{engine}"
    repo.mkdir(exist_ok=True)
    if not (repo / "raw").exists():
        (repo / "raw").symlink_to(workdir / "raw")
    store = FeatureStore(repo, duckdb_threads=threads, duckdb_memory_limit=memory)
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    return store


# ------------------------------------------------------------------------------------- workers


class PeakMemory:
    """Peak RSS (MB) of this process and its descendants, sampled in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        import psutil

        total = 0
        for p in [self._proc, *self._proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):  # a child that just exited
                continue
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._sample())
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _own_hwm_mb())


def _own_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(engine: str, args) -> dict:
    """Materialize the views with one engine in this (fresh) process; figures as a dict."""
    import resource

    store = _store(args.workdir, engine, args.threads, args.duckdb_memory)
    with PeakMemory() as memory:
        session_s = 0.0
        if engine == "spark":
            from ml_platform.featurestore.spark_offline import (
                SparkOfflineEngine,
                build_spark_session,
                spark_conf,
            )

            t = time.perf_counter()
            spark = build_spark_session(
                spark_conf(master=f"local[{args.threads or 2}]", driver_memory=args.driver_memory)
            )
            spark.sparkContext.setLogLevel("ERROR")
            session_s = time.perf_counter() - t
            run = SparkOfflineEngine(spark).materialize_offline
        else:
            from ml_platform.featurestore.spark_offline import DuckDBOfflineEngine

            run = DuckDBOfflineEngine().materialize_offline
        cpu0 = _cpu_seconds(resource)
        started = time.perf_counter()
        per_view = {name: run(store, name) for name in args.views}
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds(resource) - cpu0
    rows = sum(r["rows"] for r in per_view.values())
    return {
        "engine": engine,
        "seconds": seconds,
        "session_s": session_s,
        "rows": rows,
        "cpu_seconds": cpu,
        "peak_mb": memory.peak_mb,
        "per_view": {
            k: {f: v[f] for f in ("rows", "seconds", "spark_seconds", "write_seconds") if f in v}
            for k, v in per_view.items()
        },
    }


def _cpu_seconds(resource) -> float:
    """CPU seconds of this process and of its live descendants (the JVM, Spark's Python workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    total = own.ru_utime + own.ru_stime
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += times.user + times.system
    return total


def run_worker(engine: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--workdir", str(args.workdir)]
    cmd += [
        "--views",
        *args.views,
        "--driver-memory",
        args.driver_memory,
        "--duckdb-memory",
        args.duckdb_memory,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- parity


def parity(args) -> list[str]:
    """Each view's two tables, row by row and value by value (EXCEPT ALL both ways: a row of one
    table that the other lacks, or holds with any value different, NULLs included, counts); a list
    of problems (empty: the same)."""
    import duckdb

    problems = []
    con = duckdb.connect(config={"memory_limit": "8GB", "threads": args.threads})
    con.execute("SET enable_progress_bar = false")
    for name in args.views:
        a, b = (f"read_parquet('{args.workdir / f'repo_{e}' / 'offline' / f'{name}.parquet'}')" for e in ENGINES)
        rows_a, rows_b = (con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in (a, b))
        only_a = con.execute(f"SELECT count(*) FROM (SELECT * FROM {a} EXCEPT ALL SELECT * FROM {b})").fetchone()[0]
        only_b = con.execute(f"SELECT count(*) FROM (SELECT * FROM {b} EXCEPT ALL SELECT * FROM {a})").fetchone()[0]
        if rows_a != rows_b or only_a or only_b:
            problems.append(
                f"{name}: duckdb {rows_a:,} rows, spark {rows_b:,}; {only_a:,} duckdb rows differ or lack in "
                f"spark's table, {only_b:,} spark rows in duckdb's"
            )
    return problems


# ------------------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument(
        "--views", nargs="+", default=DEFAULT_VIEWS, help="view names, or 'all' (the 4 aggregated)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the raw data and tables go")
    parser.add_argument("--keep", action="store_true", help="keep --workdir (the raw data) afterwards")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per engine, alternating (best is reported)"
    )
    parser.add_argument(
        "--driver-memory", default="4g", help="Spark driver memory (local mode: all of Spark)"
    )
    parser.add_argument("--duckdb-memory", default="4GB", help="DuckDB memory_limit")
    parser.add_argument("--threads", type=int, default=2, help="DuckDB threads and Spark local[N]")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.views == ["all"]:
        from ml_platform import features as fr

        args.views = [v.name for v in fr.FEATURE_VIEWS if v.aggregations]
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    temporary = args.workdir is None
    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spark_features_")).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        data = generate(args.workdir, args.events, args.days, args.seed)
        print(
            f"raw events: {data['rows']:,} ({data['spec']['n_users']:,} card holders, "
            f"{data['spec']['n_merchants']:,} merchants, {data['spec']['days']} days; generated in "
            f"{data.get('generate_s', '?')} s) in {args.workdir}"
        )
        print(
            f"views: {', '.join(args.views)}; {args.threads} threads, Spark driver {args.driver_memory}, "
            f"DuckDB memory_limit {args.duckdb_memory}"
        )
        runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
        for i in range(args.repeat):
            for engine in ENGINES:
                r = run_worker(engine, args)
                runs[engine].append(r)
                print(
                    f"  run {i + 1} {engine:6s}: {r['seconds']:7.1f} s  {r['rows'] / r['seconds']:>10,.0f} rows/s  "
                    f"peak {r['peak_mb']:7,.0f} MB  cpu {r['cpu_seconds']:6.1f} s"
                    + (f"  (session start {r['session_s']:.1f} s, not counted)" if engine == "spark" else "")
                )
        best = {e: min(rs, key=lambda r: r["seconds"]) for e, rs in runs.items()}
        print("\nengine  seconds    rows/s       peak MB  (best of runs; input events/s in brackets)")
        for engine, r in best.items():
            print(
                f"{engine:6s}  {r['seconds']:7.1f}  {r['rows'] / r['seconds']:>10,.0f}  {max(x['peak_mb'] for x in runs[engine]):>10,.0f}"
                f"  ({data['rows'] * len(args.views) / r['seconds']:,.0f} events/s)"
            )
        for name in args.views:
            d, s_ = best["duckdb"]["per_view"][name], best["spark"]["per_view"][name]
            print(
                f"  {name}: {d['rows']:,} rows; duckdb {d['seconds']:.1f} s, spark {s_['seconds']:.1f} s "
                f"(Spark job {s_['spark_seconds']:.1f} s + DuckDB copy into the store's file {s_['write_seconds']:.1f} s)"
            )
        ratio = best["spark"]["seconds"] / best["duckdb"]["seconds"]
        print(
            f"ratio spark / duckdb: {ratio:.2f}x the time ({'DuckDB' if ratio > 1 else 'Spark'} faster here)"
        )
        problems = parity(args)
        print("parity: " + ("every row and value the same" if not problems else "; ".join(problems)))
        return 1 if problems else 0
    finally:
        if not args.keep:  # what this run wrote (the whole folder when it made it)
            for name in ("raw", *(f"repo_{e}" for e in ENGINES)):
                shutil.rmtree(args.workdir / name, ignore_errors=True)
            (args.workdir / "raw.json").unlink(missing_ok=True)
            if temporary:
                shutil.rmtree(args.workdir, ignore_errors=True)
        else:
            print(f"kept {args.workdir} (raw data and both engines' tables)")


if __name__ == "__main__":
    sys.exit(main())
