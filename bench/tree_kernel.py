"""Benchmark: batch scoring's tree kernel (ml_platform.serving.batch_trees.NativeTrees) on one
thread, against the kernel before the block-wise one (batch_trees.py of --baseline-commit, loaded
from git with its own compiled library) and scikit-learn's predict_proba, in the same process.

    python bench/tree_kernel.py [--model classifier.pkl --matrix X.npy | --generate]
                                [--rows 100000] [--rounds 5] [--check-rows N]
                                [--generate-rows 1000000] [--baseline-commit 6b0b657]

Inputs: a pickled fitted HistGradientBoostingClassifier and its model matrix (.npy, float64);
by default /tmp/batchwork/treework/{classifier.pkl,X.npy} if both exist, else (or with
--generate) both are generated (~1 min): a 1M x 32 matrix shaped like the platform's (5 categorical code columns first, a group
of numeric columns missing together in ~40% of rows, two mostly missing, a few rare NaN) and a
HistGradientBoostingClassifier with the platform's default parameters
(ml_platform.training.model_types.HistGradientBoostingParams: 200 trees of 31 leaves) trained on
another 100k generated rows.

Timing: --rows rows evenly spaced over the matrix, as a Fortran-order matrix (as batch_columns
builds it); each round runs every scorer once on them, one after the other (OpenMP limited to 1
thread, the kernels at threads=1): the old kernel, the new kernel's best build on this CPU, its
portable build, and scikit-learn's predict_proba. Figures: CPU time of the calling thread per row (µs), median and
best over the rounds, and the ratios of the medians (the machine may be shared: the ratios are
the figure).

Checks (exit 1 if one fails): every build of the new kernel gives scikit-learn's predict_proba
bit for bit (np.array_equal) on --check-rows rows (default: the whole matrix; scikit-learn runs
on all cores for this check, its result does not depend on it).
"""

from __future__ import annotations

import argparse
import importlib.util
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml_platform.serving import batch_trees

BASELINE_COMMIT = "6b0b657"  # the last change of serving/batch_trees.py before the block-wise kernel
DEFAULT_DIR = Path("/tmp/batchwork/treework")


def old_module(commit: str, workdir: Path):
    """serving/batch_trees.py as it was at `commit` (git show), imported as its own module."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:ml_platform/serving/batch_trees.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = workdir / f"batch_trees_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"batch_trees_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_matrix(rng: np.random.Generator, n: int) -> np.ndarray:
    """n x 32, shaped like the platform's model matrix: categorical codes first, then numerics
    with the platform's kinds of missingness."""
    X = np.empty((n, 32))
    for column, k in enumerate((13, 13, 6, 3, 8)):
        X[:, column] = np.minimum(rng.geometric(0.3, n) - 1, k - 1)  # skewed, like real categories
    X[rng.random(n) < 0.01, 1] = np.nan
    X[:, 5:] = rng.lognormal(size=(n, 27)) * rng.choice([1.0, 10.0, 100.0], 27)
    X[rng.random(n) < 0.4, 5:21] = np.nan  # a view missing for new card holders
    X[rng.random(n) < 0.01, 21:23] = np.nan
    X[rng.random(n) < 0.95, 23:25] = np.nan
    X[rng.random(n) < 0.85, 25] = np.nan
    return np.asfortranarray(X)


def generated(rows: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    from ml_platform.training.model_types import HistGradientBoostingParams

    rng = np.random.default_rng(0)
    train = synthetic_matrix(rng, 100_000)
    z = np.nan_to_num(np.log1p(train[:, 5:]), nan=-1.0)
    logit = 0.8 * z[:, 21] - 0.5 * z[:, 17] + 0.3 * z[:, 0] * (train[:, 2] == 1) + (train[:, 0] > 3) - 3.0
    y = (rng.random(len(train)) < 1 / (1 + np.exp(-logit))).astype(int)
    p = HistGradientBoostingParams()
    classifier = HistGradientBoostingClassifier(
        max_iter=p.max_iter,
        learning_rate=p.learning_rate,
        max_leaf_nodes=p.max_leaf_nodes,
        min_samples_leaf=p.min_samples_leaf,
        l2_regularization=p.l2_regularization,
        class_weight=p.class_weight,
        categorical_features=list(range(5)),
        early_stopping=False,
        random_state=0,
    ).fit(train, y)
    return classifier, synthetic_matrix(rng, rows)


def cpu_us_per_row(fn, X: np.ndarray) -> float:
    start = time.thread_time()
    fn(X)
    return (time.thread_time() - start) / len(X) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a pickled HistGradientBoostingClassifier")
    parser.add_argument("--matrix", type=Path, help="its model matrix (.npy)")
    parser.add_argument("--rows", type=int, default=100_000, help="rows timed per scorer and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check-rows", type=int, help="rows checked bit for bit (default: all)")
    parser.add_argument("--generate", action="store_true", help="generate the model and matrix")
    parser.add_argument("--generate-rows", type=int, default=1_000_000)
    parser.add_argument("--baseline-commit", default=BASELINE_COMMIT)
    args = parser.parse_args()
    from threadpoolctl import threadpool_limits

    model_path = args.model or DEFAULT_DIR / "classifier.pkl"
    matrix_path = args.matrix or DEFAULT_DIR / "X.npy"
    if model_path.exists() and matrix_path.exists() and not args.generate:
        classifier = pickle.loads(model_path.read_bytes())
        X = np.load(matrix_path, mmap_mode="r")
        source = f"{model_path}, {matrix_path}"
    elif (args.model or args.matrix) and not args.generate:
        parser.error(f"{model_path} or {matrix_path} does not exist")
    else:
        t = time.perf_counter()
        classifier, X = generated(args.generate_rows)
        source = f"generated ({time.perf_counter() - t:.0f} s)"
    trees = [t for it in classifier._predictors for t in it]
    print(
        f"model: {len(trees)} trees of <= {max(t.get_n_leaf_nodes() for t in trees)} leaves; "
        f"matrix {X.shape[0]:,} x {X.shape[1]} ({source})",
        flush=True,
    )

    new = batch_trees.NativeTrees.of(classifier)
    if new is None:
        print("the kernel cannot serve this model (see the log)")
        return 1
    builds = {new.variant: new}
    if new.variant != "portable":
        builds["portable"] = batch_trees.NativeTrees(classifier, batch_trees._compiled("portable"))

    failed = False
    n_check = len(X) if args.check_rows is None else min(args.check_rows, len(X))
    check = np.asfortranarray(X[:n_check])
    t = time.perf_counter()
    want = classifier.predict_proba(check)[:, 1]
    print(f"check: scikit-learn on {n_check:,} rows in {time.perf_counter() - t:.1f} s", flush=True)
    for name, trees_ in builds.items():
        got = trees_.predict_proba(check, threads=2)
        same = bool(np.array_equal(got, want))
        failed |= not same
        print(
            f"check: new kernel ({name} build) == scikit-learn on {n_check:,} rows: {same}"
            + ("" if same else f" ({int(np.sum(got != want))} rows differ)"),
            flush=True,
        )
    del check, want

    scorers = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            old = old_module(args.baseline_commit, Path(tmp)).NativeTrees.of(classifier)
            if old is not None:
                scorers[f"old kernel ({args.baseline_commit})"] = lambda M: old.predict_proba(M, threads=1)
        except (subprocess.CalledProcessError, OSError) as exc:
            print(f"the old kernel is not available ({exc}): not timed")
    for name, trees_ in builds.items():
        scorers[f"new kernel ({name})"] = lambda M, trees_=trees_: trees_.predict_proba(M, threads=1)
    scorers["scikit-learn predict_proba"] = lambda M: classifier.predict_proba(M)[:, 1]

    picks = np.linspace(0, len(X) - 1, min(args.rows, len(X))).astype(np.int64)  # spread over the matrix
    timed = np.asfortranarray(X[picks])
    times: dict[str, list[float]] = {name: [] for name in scorers}
    with threadpool_limits(limits=1):
        for name, fn in scorers.items():  # warm-up
            fn(timed[:2000])
        for _ in range(args.rounds):
            for name, fn in scorers.items():
                times[name].append(cpu_us_per_row(fn, timed))

    print(f"\none thread, {len(timed):,} rows (Fortran order), {args.rounds} rounds, CPU µs per row:")
    medians = {name: statistics.median(v) for name, v in times.items()}
    best = f"new kernel ({new.variant})"
    for name, values in times.items():
        ratios = ", ".join(
            f"{medians[other] / medians[name]:.2f}x faster than {other}"
            for other in medians
            if other != name and medians[other] > medians[name] and name.startswith("new")
        )
        print(f"  {name:34s} median {medians[name]:6.2f}  best {min(values):6.2f}   {ratios}")
    old_name = next((n for n in medians if n.startswith("old")), None)
    if old_name:
        print(f"ratio old/new ({new.variant}): {medians[old_name] / medians[best]:.2f}")
    print("bit-for-bit check:", "FAILED" if failed else "ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
