"""The batch tree kernel (`batch_trees.NativeTrees`) against scikit-learn's HistGradientBoosting
`predict_proba`, bit for bit, on each build this machine runs ("portable" always, "avx2" where the
CPU has it), on the edges of its block-wise pass: row counts around the block size, blocks where
only some rows are NaN, values on the thresholds, odd category codes, C, Fortran and strided
input, several threads; models without numeric or without categorical splits or with no splits;
which build is chosen and the fallback when the AVX2 build fails; the private cache directory.
(test_batch_scoring.py checks the kernel on the platform's own champion and day.)"""

from __future__ import annotations

import os

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from threadpoolctl import threadpool_limits

from ml_platform.serving import batch_trees

BLOCK = batch_trees.BLOCK
N_CAT = 2  # columns 0 and 1 are categorical


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with threadpool_limits(limits=1):
        yield


def make_data(rng: np.random.Generator, n: int, n_num: int = 6, n_cat: int = N_CAT) -> np.ndarray:
    X = rng.normal(size=(n, n_cat + n_num))
    for c in range(n_cat):
        X[:, c] = rng.integers(0, 12 + 8 * c, n)
    X[rng.random(X.shape) < 0.1] = np.nan
    X[rng.random(n) < 0.3, n_cat : n_cat + 3] = np.nan  # numeric columns missing together
    return X


def fit(X: np.ndarray, n_cat: int = N_CAT, **params) -> HistGradientBoostingClassifier:
    rng = np.random.default_rng(1)
    num = np.nan_to_num(X[:, n_cat:]) if X.shape[1] > n_cat else np.zeros((len(X), 1))
    cat = np.nan_to_num(X[:, :n_cat], nan=-1) if n_cat else np.zeros((len(X), 1))
    logit = num[:, 0] + np.sin(2 * num[:, -1]) + 0.8 * (cat[:, 0] % 3 == 0) - 0.5 * np.isnan(X[:, -1])
    y = (rng.random(len(X)) < 1 / (1 + np.exp(-logit))).astype(int)
    defaults = {"max_iter": 40, "max_leaf_nodes": 31, "min_samples_leaf": 10, "random_state": 0}
    defaults |= params
    categorical = list(range(n_cat)) or None
    return HistGradientBoostingClassifier(categorical_features=categorical, **defaults).fit(X, y)


@pytest.fixture(scope="module")
def model():
    return fit(make_data(np.random.default_rng(0), 8000))


def trees_for(classifier, variant: str) -> batch_trees.NativeTrees:
    kernel = batch_trees._compiled(variant)
    assert kernel is not None, "no C compiler on this machine?"
    if variant == "avx2" and not batch_trees._compiled("portable").lib.cpu_has_avx2():
        pytest.skip("this CPU has no AVX2")
    return batch_trees.NativeTrees(classifier, kernel)


def odd_rows(classifier, rng: np.random.Generator, n: int) -> np.ndarray:
    """Rows that take every odd branch, in blocks that mix them: values on the thresholds, NaN in
    some rows of a block only (and in every row, and in the last row of a block), -0.0, huge and tiny values,
    negative, fractional and unseen category codes."""
    X = make_data(rng, n)
    nodes = np.concatenate([t.nodes for it in classifier._predictors for t in it])
    split = nodes[~nodes["is_leaf"].astype(bool) & ~nodes["is_categorical"].astype(bool)]
    rows = rng.integers(0, n, n // 3)
    picks = rng.integers(0, len(split), len(rows))
    X[rows, split["feature_idx"][picks]] = split["num_threshold"][picks]  # exactly on a threshold
    for start in range(0, n - BLOCK, 5 * BLOCK):  # block-sized runs with NaN in a few rows only
        lanes = rng.choice(BLOCK, rng.integers(1, BLOCK), replace=False)
        X[start + lanes, rng.integers(N_CAT, X.shape[1])] = np.nan
    nums = X[:, N_CAT:]
    specials = rng.random(nums.shape) < 0.02
    nums[specials] = rng.choice([-0.0, 5e-324, 1e300, -1e300], specials.sum())  # sklearn refuses inf
    cats = X[:, :N_CAT]
    cats[rng.random(cats.shape) < 0.05] = -1.0
    cats[rng.random(cats.shape) < 0.02] = -1e300
    cats[rng.random(cats.shape) < 0.05] = -0.5
    cats[rng.random(cats.shape) < 0.05] = 2.5  # no category: scikit-learn's encoder makes it NaN
    cats[rng.random(cats.shape) < 0.05] = -0.0  # category 0
    cats[rng.random(cats.shape) < 0.05] = 200.0  # no category has this code
    X[BLOCK : 2 * BLOCK, :] = np.nan  # a block NaN everywhere
    X[5 * BLOCK - 1, :] = np.nan  # the last row of a block
    return X


def assert_exact(trees: batch_trees.NativeTrees, X: np.ndarray, threads: int = 1) -> np.ndarray:
    want = trees.classifier.predict_proba(X)[:, 1]
    got = trees.predict_proba(X, threads=threads)
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.array_equal(got, want), (threads, int(np.sum(got != want)), np.abs(got - want).max())
    np.testing.assert_array_equal(trees.raw(X, threads)[:, 0], trees.classifier._raw_predict(X)[:, 0])
    return want


@pytest.mark.parametrize("variant", ["portable", "avx2"])
def test_each_build_gives_scikit_learns_probabilities_on_odd_rows(model, variant):
    trees = trees_for(model, variant)
    assert trees.variant == variant
    X = odd_rows(model, np.random.default_rng(5), 4003)  # not a multiple of the block
    # the rows do take the odd branches: some blocks mix NaN and values in one column
    blocks = np.isnan(X[: len(X) // BLOCK * BLOCK]).reshape(-1, BLOCK, X.shape[1])
    assert (blocks.any(axis=1) & ~blocks.all(axis=1)).any(axis=1).mean() > 0.5
    assert blocks.all(axis=(1, 2)).any()
    for matrix in (X, np.asfortranarray(X)):
        for threads in (1, 2, 3):
            want = assert_exact(trees, matrix, threads)
    assert len(np.unique(want)) > 500


@pytest.mark.parametrize("variant", ["portable", "avx2"])
def test_row_counts_around_the_block_size_and_strided_input(model, variant):
    """0, 1 and BLOCK +- 1 rows (the last block is padded with copies of its last row), slices
    starting inside a block, C and Fortran order, one row of a Fortran matrix, strided views."""
    trees = trees_for(model, variant)
    X = odd_rows(model, np.random.default_rng(6), 400)
    empty = trees.predict_proba(X[:0])
    assert empty.shape == (0,) and empty.dtype == np.float64 and trees.raw(X[:0]).shape == (0, 1)
    for n in (1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK - 1, 2 * BLOCK + 1, 3 * BLOCK + 5):
        for start in (0, 3, BLOCK, BLOCK + 6):
            part = X[start : start + n]
            assert_exact(trees, part)
            assert_exact(trees, np.asfortranarray(part))
    F = np.asfortranarray(X)
    assert_exact(trees, F[7:8])  # one row of a Fortran matrix
    assert_exact(trees, X[::3], threads=2)  # views that are neither C nor Fortran: copied
    assert_exact(trees, F[::2])
    assert_exact(trees, np.asfortranarray(X[:, ::-1])[:, ::-1])


@pytest.mark.parametrize(
    ("name", "n_num", "n_cat", "params"),
    [
        ("numeric only", 6, 0, {}),
        ("categorical only", 0, 3, {}),
        ("no splits at all", 6, N_CAT, {"min_samples_leaf": 5000}),
    ],
)
def test_models_of_one_kind_of_split_or_none(name, n_num, n_cat, params):
    """The kernel's tables are empty for a kind of split the model does not have."""
    rng = np.random.default_rng(7)
    X = make_data(rng, 6000, n_num=n_num, n_cat=n_cat)
    classifier = fit(X, n_cat=n_cat, max_iter=15, **params)
    nodes = np.concatenate([t.nodes for it in classifier._predictors for t in it])
    inner = nodes[~nodes["is_leaf"].astype(bool)]
    if name == "no splits at all":
        assert len(inner) == 0
    else:
        assert (
            len(inner)
            and inner["is_categorical"].all() == (n_num == 0)
            and inner["is_categorical"].any() == (n_cat > 0)
        )
    test = make_data(rng, 1001, n_num=n_num, n_cat=n_cat)
    if n_cat:
        test[rng.random(len(test)) < 0.1, 0] = -3.0
    for variant in ("portable", "avx2"):
        if variant == "avx2" and not batch_trees._compiled("portable").lib.cpu_has_avx2():
            continue
        want = assert_exact(batch_trees.NativeTrees(classifier, batch_trees._compiled(variant)), test, 2)
        assert (len(np.unique(want)) == 1) == (name == "no splits at all")


def test_the_avx2_build_is_used_where_the_cpu_has_it_and_the_portable_one_if_it_fails(
    model, tmp_path, monkeypatch
):
    X = odd_rows(model, np.random.default_rng(8), 999)
    batch_trees.release()
    monkeypatch.setattr(batch_trees.tempfile, "tempdir", str(tmp_path))  # a fresh cache
    try:
        has_avx2 = bool(batch_trees._compiled("portable").lib.cpu_has_avx2())
        trees = batch_trees.NativeTrees.of(model)
        assert trees is not None and trees.variant == ("avx2" if has_avx2 else "portable")
        assert_exact(trees, X)
        batch_trees.release()
        monkeypatch.setitem(batch_trees.VARIANTS, "avx2", ["-mavx2", "--no-such-compiler-option"])
        trees = batch_trees.NativeTrees.of(model)
        assert trees is not None and trees.variant == "portable"
        assert_exact(trees, X)
        assert batch_trees._compiled("avx2") is None
    finally:
        batch_trees.release()  # the next user loads the kernel from the real temp directory again


def test_the_kernel_is_never_loaded_from_a_directory_others_can_write(model, tmp_path, monkeypatch):
    """The compiled libraries are loaded from <tmp>/ml_platform-<uid>: if that directory is
    writable by others (someone could have put a library there), the kernel is not used at all.
    (Moved here from test_batch_scoring.py: there are two builds now.)"""
    shared = tmp_path / f"ml_platform-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    batch_trees.release()
    try:
        monkeypatch.setattr(batch_trees.tempfile, "tempdir", str(tmp_path))
        assert batch_trees.NativeTrees.of(model) is None
        assert not list(shared.iterdir())  # nothing compiled into it either
        shared.chmod(0o700)
        batch_trees.release()
        trees = batch_trees.NativeTrees.of(model)
        assert trees is not None  # a private one is used
        built = sorted(p.name.split("_")[2] for p in shared.iterdir())
        assert built == sorted({"portable", trees.variant})  # the portable build answers the CPU check
        assert all(p.suffix == ".so" for p in shared.iterdir())
    finally:
        batch_trees.release()


def test_categorical_columns_anywhere_with_any_whole_number_categories():
    """scikit-learn encodes categorical columns itself before its trees read them: the categorical
    columns go first, each value becomes its position among the fitted categories, any other
    value NaN. Categories with gaps ({0, 3, 7, 250}) in columns 2 and 5 score exactly, values that
    are no category (fractional, negative, >= 256, huge) go the missing way."""
    rng = np.random.default_rng(9)
    n = 6000
    X = rng.normal(size=(n, 7))
    X[:, 2] = rng.choice([0.0, 3.0, 7.0, 250.0], n)
    X[:, 5] = rng.integers(0, 40, n) * 2.0  # even codes only
    X[rng.random(X.shape) < 0.08] = np.nan
    y = (np.nan_to_num(X[:, 0]) + (X[:, 2] == 3) - (X[:, 5] % 4 == 0) + 0.3 * rng.normal(size=n)) > 0.3
    classifier = HistGradientBoostingClassifier(max_iter=30, categorical_features=[2, 5], random_state=0).fit(
        X, y.astype(int)
    )
    test = X[:2000].copy()
    for column in (2, 5):
        values = test[:, column]
        odd = rng.random(len(test))
        values[odd < 0.3] = rng.choice(
            [1.0, 3.5, 7.0000001, -3.0, 256.0, 300.0, 1e9, 1e300], (odd < 0.3).sum()
        )
    trees = batch_trees.NativeTrees.of(classifier)
    assert trees is not None
    want = assert_exact(trees, test, threads=2)
    assert len(np.unique(want)) > 200
    assert_exact(trees, np.asfortranarray(test))


@pytest.mark.parametrize("categories", [[0.0, 1.5, 3.0], [0.0, 1.0, 300.0], [-1.0, 0.0, 1.0]])
def test_categories_the_kernel_cannot_read_are_declined(categories):
    """Categories that are not whole numbers in [0, 256): the kernel declines the model (the caller
    scores it with scikit-learn)."""
    rng = np.random.default_rng(10)
    X = rng.normal(size=(3000, 3))
    X[:, 1] = rng.choice(categories, 3000)
    y = ((X[:, 0] + (X[:, 1] == categories[1])) > 0.5).astype(int)
    classifier = HistGradientBoostingClassifier(max_iter=5, categorical_features=[1]).fit(X, y)
    assert batch_trees.NativeTrees.of(classifier) is None
    with pytest.raises(ValueError, match="not whole numbers"):
        batch_trees.NativeTrees(classifier, batch_trees._compiled("portable"))
