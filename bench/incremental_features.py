"""Benchmark: a day's offline materialization, incremental against full, on the same files.

    python bench/incremental_features.py [--events 10000000] [--days 60] [--changed-days 3]
                                         [--views user_transaction_stats] [--repeat 2] [--workdir DIR] [--keep]

The raw events are the project's generator's (`spark_features.generate`: `--days` daily
partitions, about `--events` events; reused when `--workdir` already holds the same draw). Each
repeat, in this one process, on a copy of the partitions aged by an hour:

1. full: `materialize_offline(view, full=True)` over every partition (the baseline);
2. the daily change: the last `--changed-days` partitions are rewritten (new files, as the label
   feed rewrites the days whose labels arrived) and one more day arrives (the last partition,
   held back until now); then `materialize_offline(view)`: incremental from the first changed day;
3. nothing changed (the files aged and recorded once more): `materialize_offline(view)` again
   (the table stands).

Printed: seconds of each (best of the repeats), the ratio incremental / full, the rows of the
table and the time it was recomputed from. Then a parity check: the incremental table against a
full recompute, every row and value (EXCEPT ALL both ways). Exit code 1 if they differ.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spark_features import generate  # the benchmarks share their generated data


def age(folder: Path, seconds: float = 3600) -> None:
    for f in folder.rglob("*.parquet"):
        st = f.stat()
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def rewrite(day: Path) -> None:
    """New files with the same rows (what the label feed's rewrite looks like to the store)."""
    for f in sorted(day.glob("*.parquet")):
        copy = f.with_name(f".{f.name}.new")
        shutil.copyfile(f, copy)
        os.replace(copy, f)


def same_tables(a: Path, b: Path) -> bool:
    import duckdb

    con = duckdb.connect()
    x, y = f"read_parquet('{a}')", f"read_parquet('{b}')"
    for p, q in ((x, y), (y, x)):
        if con.execute(f"SELECT count(*) FROM (SELECT * FROM {p} EXCEPT ALL SELECT * FROM {q})").fetchone()[0]:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--changed-days", type=int, default=3)
    parser.add_argument("--views", nargs="+", default=["user_transaction_stats"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()

    from ml_platform import features as fr
    from ml_platform.featurestore import FeatureStore

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="incremental-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    info = generate(workdir, args.events, args.days, args.seed)
    print(f"raw events: {info['rows']:,} in {args.days} daily partitions ({workdir})")
    repo = workdir / "repo_incremental"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(workdir / "raw", repo / "raw")
    days = sorted((repo / "raw" / "transactions").iterdir())
    held = repo / days[-1].name
    store = FeatureStore(repo, duckdb_threads=args.threads, duckdb_memory_limit="4GB")
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    best: dict[tuple[str, str], float] = {}
    results = {}
    failed = False
    for view in args.views:
        for r in range(args.repeat):
            if held.exists():
                shutil.rmtree(held)
            shutil.move(str(days[-1]), str(held))  # the day that arrives later
            age(repo / "raw")
            full = store.materialize_offline(view, full=True)
            for day in days[-1 - args.changed_days : -1]:
                rewrite(day)
            shutil.move(str(held), str(days[-1]))
            started = time.perf_counter()
            inc = store.materialize_offline(view)
            inc_s = time.perf_counter() - started
            age(repo / "raw")  # the rewritten files were racy at that listing: settle them once
            store.materialize_offline(view)
            started = time.perf_counter()
            unchanged = store.materialize_offline(view)
            still_s = time.perf_counter() - started
            assert inc["mode"] == "incremental" and unchanged["mode"] == "unchanged", (inc, unchanged)
            print(f"  {view} run {r + 1}: full {full['seconds']:.1f} s, incremental {inc_s:.2f} s "
                  f"(from {inc['recomputed_from']}, {inc['changed_files']} files changed), unchanged {still_s:.2f} s")
            for kind, s in (("full", full["seconds"]), ("incremental", inc_s), ("unchanged", still_s)):
                best[(view, kind)] = min(best.get((view, kind), s), s)
            results[view] = inc
        kept = store.offline_table_path(view).with_name(f"{view}.incremental.parquet")
        shutil.copyfile(store.offline_table_path(view), kept)
        store.materialize_offline(view, full=True)
        same = same_tables(kept, store.offline_table_path(view))
        kept.unlink()
        failed |= not same
        f, i, u = best[(view, "full")], best[(view, "incremental")], best[(view, "unchanged")]
        print(f"{view}: {results[view]['rows']:,} rows; full {f:.1f} s, incremental {i:.2f} s "
              f"({i / f:.2f}x the time, {args.changed_days} days rewritten + 1 new of {args.days}), "
              f"unchanged {u:.2f} s; parity with a full recompute: "
              + ("every row and value the same" if same else "DIFFERENT"))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
