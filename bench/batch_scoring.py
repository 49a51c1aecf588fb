"""Benchmark: batch scoring of one day (ml_platform.serving.batch.score_partition) against two
baselines measured in the same run.

    python bench/batch_scoring.py [--rows 1000000] [--chunk-rows 200000] [--baseline-rows 1000000]
                                  [--duckdb-threads 2] [--memory-limit 2GB] [--workdir DIR] [--keep]

Setup (timed, not part of the figures): the generator writes one weekday of ~--rows transactions
(chunked Parquet parts, users/day = rows / 6), the offline feature views are materialized, and a
HistGradientBoosting model (the platform's default parameters) is trained on a separate small
generated history. Then, in this one process (OpenMP at 1 thread, DuckDB at --duckdb-threads):

  ours       score_partition: staged day-level point-in-time join, chunked scoring, one swap
             transaction into the predictions table (everything, end to end)
  per_chunk  the naive path: per chunk of the day, FeatureStore.get_historical_features +
             assemble_features + predict_proba (no write), on the first --baseline-rows rows
  model_only read the same rows with pyarrow + assemble_features (no looked-up features) +
             predict_proba: the floor set by the model alone, on the first --baseline-rows rows

Peak RSS is the process's VmHWM, reset before each method. A check recomputes 1,000 random
predictions through get_historical_features and requires identical scores (exit 1 otherwise).
"""

from __future__ import annotations

import argparse
import json
import shutil
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
    peak_rss_mb,
    raw_partition_files,
    read_predictions,
    reset_peak_rss,
    score_partition,
)
from ml_platform.serving.scoring import LoadedModel, assemble_features

DAY = date(2024, 3, 5)  # a Tuesday: no weekend uplift in the generator
TXNS_PER_USER = 6.0


def setup(workdir: Path, rows: int, duckdb_threads: int, memory_limit: str) -> tuple:
    from ml_platform.featurestore.store import FeatureStore
    from ml_platform.sources.generator import GeneratorConfig, write_dataset

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


def per_chunk_baseline(store, model: LoadedModel, rows: int, chunk_rows: int) -> dict:
    reset_peak_rss()
    started = time.perf_counter()
    n = 0
    for events in raw_batches(store, rows, chunk_rows):
        lookup = events[["user_id", "merchant_id"]].copy()
        lookup[fr.EVENT_TS] = fr.feature_lookup_time(pd.to_datetime(events[fr.EVENT_TS], utc=True))
        looked_up = store.get_historical_features(lookup, list(model.contract.feature_refs))
        frame = assemble_features(events, looked_up[list(model.contract.feature_columns)])
        scores = model.predict_proba(frame)
        n += len(scores)
    seconds = time.perf_counter() - started
    return {"rows": n, "seconds": seconds, "rows_per_s": n / seconds, "peak_rss_mb": peak_rss_mb()}


def model_only_baseline(store, model: LoadedModel, rows: int, chunk_rows: int) -> dict:
    reset_peak_rss()
    started = time.perf_counter()
    n = 0
    for events in raw_batches(store, rows, chunk_rows):
        looked_up = {c: np.full(len(events), None, dtype=object) for c in model.contract.feature_columns}
        frame = assemble_features(events, looked_up)
        scores = model.predict_proba(frame)
        n += len(scores)
    seconds = time.perf_counter() - started
    return {"rows": n, "seconds": seconds, "rows_per_s": n / seconds, "peak_rss_mb": peak_rss_mb()}


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
    parser.add_argument("--chunk-rows", type=int, default=200_000)
    parser.add_argument("--baseline-rows", type=int, default=1_000_000)
    parser.add_argument("--duckdb-threads", type=int, default=2)
    parser.add_argument("--memory-limit", default="2GB")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the generated data and predictions")
    args = parser.parse_args()

    from threadpoolctl import threadpool_limits

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_batch_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with threadpool_limits(limits=1):
            store, model, setup_timings = setup(workdir, args.rows, args.duckdb_threads, args.memory_limit)
            print(f"setup: {json.dumps({k: round(v, 1) for k, v in setup_timings.items()})}", flush=True)
            db = workdir / "predictions.duckdb"
            ours = score_partition(store, model, DAY, db, chunk_rows=args.chunk_rows)
            print(f"ours: {json.dumps(ours)}", flush=True)
            baseline_rows = min(args.baseline_rows, ours["rows"])
            per_chunk = per_chunk_baseline(store, model, baseline_rows, args.chunk_rows)
            print(f"per_chunk: {json.dumps(per_chunk)}", flush=True)
            model_only = model_only_baseline(store, model, baseline_rows, args.chunk_rows)
            print(f"model_only: {json.dumps(model_only)}", flush=True)
            check = check_sample(store, model, db)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(
        f"{ours['rows']:,} rows scored (day {DAY}), chunk_rows={args.chunk_rows:,}, DuckDB threads="
        f"{args.duckdb_threads}, memory_limit={args.memory_limit}, OpenMP threads=1"
    )
    print(f"{'method':<11} {'rows':>11} {'seconds':>9} {'rows/s':>10} {'peak RSS MB':>12} {'ours vs it':>11}")
    for name, r in (("ours", ours), ("per_chunk", per_chunk), ("model_only", model_only)):
        ratio = ours["rows_per_s"] / r["rows_per_s"]
        print(
            f"{name:<11} {r['rows']:>11,} {r['seconds']:>9.1f} {r['rows_per_s']:>10,.0f} "
            f"{r['peak_rss_mb']:>12,.0f} {ratio:>10.2f}x"
        )
    print(
        f"ours by phase (s): load {ours['load_s']}, point-in-time features {ours['features_s']}, "
        f"score + stage {ours['score_s']}, swap {ours['swap_s']}"
    )
    print(
        f"check: {check['rows']} random predictions recomputed via get_historical_features, "
        f"max |diff| {check['max_abs_diff']:.3g} -> {'OK' if check['ok'] else 'FAILED'}"
    )
    return 0 if check["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
