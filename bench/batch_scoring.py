"""Benchmark: batch scoring of one day (ml_platform.serving.batch.score_partition), with today's
path before this change (the batch module of commit --baseline-commit, loaded from git) as the
baseline measured in the same process.

    python bench/batch_scoring.py [--rows 10000000] [--baseline-rows 1000000] [--repeats 3]
                                  [--chunk-rows 200000] [--duckdb-threads 2] [--memory-limit 2GB]
                                  [--threads 2] [--full-baseline] [--workdir DIR] [--keep]

Setup (timed, not part of the figures; reused from --workdir when a previous run with the same
sizes finished it there, so `--workdir DIR --keep` skips it the second time): the generator writes
one weekday of ~--rows transactions (chunked Parquet parts, users/day = rows / 6), the offline
feature views are materialized, and a HistGradientBoosting model (the platform's default
parameters) is trained on a separate small generated history; the same for a --baseline-rows day.
Then, in this one process (OpenMP at 1 thread, DuckDB at --duckdb-threads, the native trees at
--threads):

  ours       score_partition on the --rows day, end to end (read, point-in-time features,
             scoring, prediction log, the swap)
  ratio      ours and today's path alternately on the --baseline-rows day, --repeats times each;
             the medians and their ratio (the machine is shared: the ratio is the figure)
  full       with --full-baseline: today's path on the --rows day too, right after ours

Peak RSS is the process's VmHWM, reset before each run. Checks (exit 1 if one fails): 1,000
random published predictions recomputed through get_historical_features + assemble_features +
predict_proba are identical (max |diff| 0); the day's prediction log has one row per prediction
with the published score; on the baseline day, ours and today's path publish identical scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ml_platform import features as fr
from ml_platform.serving.batch import (
    raw_partition_files,
    read_predictions,
    score_partition,
)
from ml_platform.serving.scoring import LoadedModel, assemble_features

DAY = date(2024, 3, 5)  # a Tuesday: no weekend uplift in the generator
TXNS_PER_USER = 6.0
ROOT = Path(__file__).resolve().parent.parent
BASELINE_COMMIT = "682df2b"  # the last commit of serving/batch.py before the columnar path


def setup(workdir: Path, rows: int, duckdb_threads: int, memory_limit: str) -> tuple:
    """The day's raw events, the offline views and the model; reused from `workdir` when a previous
    run with the same --rows finished its setup there (--workdir DIR --keep)."""
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.sources.generator import GeneratorConfig, write_dataset

    done = workdir / "setup_done.json"
    model_file = workdir / "model.pkl"
    if done.exists() and json.loads(done.read_text()).get("rows") == rows and model_file.exists():
        store = FeatureStore(
            workdir / "data", duckdb_threads=duckdb_threads, duckdb_memory_limit=memory_limit
        )
        store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
        return store, pickle.loads(model_file.read_bytes()), {"reused": 1.0}
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.rmtree(workdir / "train", ignore_errors=True)
    timings = {}
    t = time.perf_counter()
    config = GeneratorConfig(
        n_users=max(1000, int(rows / TXNS_PER_USER)),
        n_merchants=max(200, rows // 2000),
        txns_per_user_per_day=TXNS_PER_USER,
        start=DAY,
        days=1,
        fraud_rate=0.01,
    )
    write_dataset(config, workdir / "data" / "raw")
    timings["generate_s"] = time.perf_counter() - t
    store = FeatureStore(workdir / "data", duckdb_threads=duckdb_threads, duckdb_memory_limit=memory_limit)
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    t = time.perf_counter()
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            store.materialize_offline(view.name)
    timings["materialize_offline_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model = train_model_on_small_history(workdir / "train", duckdb_threads)
    timings["train_s"] = time.perf_counter() - t
    model_file.write_bytes(pickle.dumps(model))
    done.write_text(json.dumps({"rows": rows}))
    return store, model, timings


def train_model_on_small_history(root: Path, duckdb_threads: int) -> LoadedModel:
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.sources.generator import GeneratorConfig, write_dataset
    from ml_platform.sources.raw_events import labelled_events, latest_label_time
    from ml_platform.training import build_training_frame, time_split, train_model

    config = GeneratorConfig(
        seed=11,
        n_users=3000,
        n_merchants=200,
        days=21,
        fraud_rate=0.02,
        label_maturity_days=1,
        start=date(2024, 2, 1),
    )
    write_dataset(config, root / "raw")
    store = FeatureStore(root, duckdb_threads=duckdb_threads)
    store.apply([*fr.ENTITIES, *fr.FEATURE_VIEWS])
    for view in fr.FEATURE_VIEWS:
        if view.aggregations:
            store.materialize_offline(view.name)
    as_of = latest_label_time(root / "raw")
    frame = build_training_frame(store, labelled_events(root / "raw", as_of), fr.MODEL_FEATURE_REFS)
    split = time_split(frame, as_of=as_of)
    model, contract = train_model(split.train, split.validation)
    return LoadedModel(version=1, model=model, contract=contract)


def raw_batches(store, rows: int, chunk_rows: int):
    """The first `rows` raw events of the day, as pandas chunks (pyarrow scan)."""
    import pyarrow.dataset as ds

    dataset = ds.dataset([str(f) for f in raw_partition_files(store, DAY)], format="parquet")
    seen = 0
    for batch in dataset.to_batches(batch_size=chunk_rows):
        if seen >= rows:
            return
        batch = batch.slice(0, rows - seen)
        seen += batch.num_rows
        yield batch.to_pandas()


def todays_path(commit: str, workdir: Path):
    """serving/batch.py as it was at `commit` (git show), imported as its own module: the baseline."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:ml_platform/serving/batch.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / f"batch_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"batch_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compare_with_today(
    store, model: LoadedModel, workdir: Path, today, repeats: int, chunk_rows: int, threads: int
) -> dict:
    """ours and today's path alternately on the same day; medians, ratio, and whether they publish
    the same scores."""
    runs: dict[str, list[dict]] = {"ours": [], "today": []}
    for i in range(repeats):
        for name in ("ours", "today") if i % 2 == 0 else ("today", "ours"):
            db = workdir / f"compare_{name}.duckdb"
            if name == "ours":
                r = score_partition(store, model, DAY, db, chunk_rows=chunk_rows, threads=threads)
            else:
                r = today.score_partition(store, model, DAY, db, chunk_rows=chunk_rows)
            print(
                f"  {name} run {len(runs[name]) + 1}: {r['rows_per_s']:,.0f} rows/s ({r['seconds']:.1f} s)",
                flush=True,
            )
            runs[name].append(r)
    ours_scores = read_predictions(workdir / "compare_ours.duckdb", DAY, columns=["transaction_id", "score"])
    today_scores = read_predictions(
        workdir / "compare_today.duckdb", DAY, columns=["transaction_id", "score"]
    )
    same = (
        ours_scores.sort_values("transaction_id")
        .reset_index(drop=True)
        .equals(today_scores.sort_values("transaction_id").reset_index(drop=True))
    )
    median = {name: statistics.median(r["rows_per_s"] for r in rs) for name, rs in runs.items()}
    phases = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("load_s", "features_s", "score_s", "swap_s")}
        for name, rs in runs.items()
    }
    return {
        "rows": runs["ours"][0]["rows"],
        "ours_rows_per_s": [r["rows_per_s"] for r in runs["ours"]],
        "today_rows_per_s": [r["rows_per_s"] for r in runs["today"]],
        "median": median,
        "ratio": median["ours"] / median["today"],
        "phases": phases,
        "peak_rss_mb": {name: max(r["peak_rss_mb"] for r in rs) for name, rs in runs.items()},
        "same_scores": bool(same),
    }


def check_log(result: dict, db: Path) -> dict:
    """The day's prediction log: one row per published prediction, with its score."""
    import pyarrow.parquet as pq

    log = pq.read_table(result["log_path"], columns=["transaction_id", "probability"]).to_pandas()
    published = read_predictions(db, DAY, columns=["transaction_id", "score"])
    merged = published.merge(log, on="transaction_id", how="outer", indicator=True)
    both = merged["_merge"] == "both"
    ok = bool(both.all() and len(log) == len(published) and (merged["score"] == merged["probability"]).all())
    return {"rows": len(log), "ok": ok}


def check_sample(store, model: LoadedModel, db: Path, n: int = 1000, seed: int = 0) -> dict:
    """Recompute n random predictions through get_historical_features: scores must be identical."""
    got = read_predictions(db, DAY, columns=["transaction_id", "score"])
    pick = got.sample(n=min(n, len(got)), random_state=seed)
    ids = set(pick["transaction_id"])
    parts = [b[b["transaction_id"].isin(ids)] for b in raw_batches(store, 10**12, 1_000_000)]
    events = pd.concat(parts, ignore_index=True)
    lookup = events[["user_id", "merchant_id"]].copy()
    lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
    looked_up = store.get_historical_features(lookup, list(model.contract.feature_refs))
    frame = assemble_features(events, looked_up[list(model.contract.feature_columns)])
    expected = pd.Series(model.predict_proba(frame), index=events["transaction_id"])
    mine = pick.set_index("transaction_id")["score"].reindex(expected.index)
    diff = float(np.max(np.abs(mine.to_numpy() - expected.to_numpy())))
    return {"rows": len(expected), "max_abs_diff": diff, "ok": diff == 0.0 and len(expected) == len(pick)}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-rows", type=int, default=200_000)
    parser.add_argument("--duckdb-threads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="the native trees' threads")
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    parser.add_argument(
        "--full-baseline",
        action="store_true",
        help="also run today's path on the --rows day, right after ours (a 10M-row day: ~8 min more)",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated data and predictions")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    workdir.mkdir(parents=True, exist_ok=True)
    today = todays_path(args.baseline_commit, workdir)
    try:
        with threadpool_limits(limits=1):
            store, model, setup_timings = setup(
                workdir / f"day_{args.rows}", args.rows, args.duckdb_threads, args.memory_limit
            )
            print(f"setup: {json.dumps({k: round(v, 1) for k, v in setup_timings.items()})}", flush=True)
            db = workdir / f"day_{args.rows}" / "predictions.duckdb"
            ours = score_partition(store, model, DAY, db, chunk_rows=args.chunk_rows, threads=args.threads)
            print(f"ours: {json.dumps(ours)}", flush=True)
            full = None
            if args.full_baseline:
                full = today.score_partition(
                    store, model, DAY, db.with_name("today.duckdb"), chunk_rows=args.chunk_rows
                )
                print(f"today (full day): {json.dumps(full)}", flush=True)
            check = check_sample(store, model, db)
            log_check = check_log(ours, db)
            small = workdir / f"day_{args.baseline_rows}"
            small_store, small_model, _ = setup(
                small, args.baseline_rows, args.duckdb_threads, args.memory_limit
            )
            print(
                f"ours vs today's path ({args.baseline_commit}) on the {args.baseline_rows:,}-row day:",
                flush=True,
            )
            compare = compare_with_today(
                small_store, small_model, small, today, args.repeats, args.chunk_rows, args.threads
            )
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"{ours['rows']:,} rows scored (day {DAY}), chunk_rows={args.chunk_rows:,}, DuckDB threads="
        f"{args.duckdb_threads}, memory_limit={args.memory_limit}, trees: {ours['scorer']} on "
        f"{ours['threads']} threads, OpenMP threads=1"
    )
    print(
        f"ours: {ours['seconds']:.1f} s, {ours['rows_per_s']:,.0f} rows/s, peak RSS {ours['peak_rss_mb']:,.0f} MB; "
        f"by phase (s): load {ours['load_s']}, point-in-time features {ours['features_s']}, "
        f"score + stage + log {ours['score_s']}, swap {ours['swap_s']}"
    )
    if full is not None:
        print(
            f"today's path on the same day: {full['seconds']:.1f} s, {full['rows_per_s']:,.0f} rows/s, peak RSS "
            f"{full['peak_rss_mb']:,.0f} MB -> ours {ours['rows_per_s'] / full['rows_per_s']:.2f}x; by phase (s): "
            f"load {full['load_s']}, features {full['features_s']}, score {full['score_s']}, swap {full['swap_s']}"
        )
    m, p = compare["median"], compare["phases"]
    print(
        f"ratio on {compare['rows']:,} rows, medians of {args.repeats}: ours {m['ours']:,.0f} rows/s "
        f"(runs {', '.join(f'{r:,.0f}' for r in compare['ours_rows_per_s'])}), today {m['today']:,.0f} rows/s "
        f"(runs {', '.join(f'{r:,.0f}' for r in compare['today_rows_per_s'])}) -> {compare['ratio']:.2f}x; "
        f"peak RSS MB ours {compare['peak_rss_mb']['ours']:,.0f}, today {compare['peak_rss_mb']['today']:,.0f}"
    )
    for name in ("ours", "today"):
        print(f"  {name} phases (median s): {json.dumps(p[name])}")
    print(
        f"check: {check['rows']} random predictions recomputed via get_historical_features, "
        f"max |diff| {check['max_abs_diff']:.3g} -> {'OK' if check['ok'] else 'FAILED'}"
    )
    print(
        f"check: prediction log {log_check['rows']:,} rows, one per prediction with its score -> "
        f"{'OK' if log_check['ok'] else 'FAILED'}"
    )
    print(
        f"check: ours and today's path publish identical scores on the baseline day -> "
        f"{'OK' if compare['same_scores'] else 'FAILED'}"
    )
    return 0 if check["ok"] and log_check["ok"] and compare["same_scores"] else 1


if __name__ == "__main__":
    sys.exit(main())
