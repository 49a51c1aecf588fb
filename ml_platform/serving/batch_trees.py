"""Batch scoring's tree predictor: scikit-learn's HistGradientBoosting prediction, bit for bit,
in a small C kernel compiled on first use (the system C compiler, `cc`), run on several threads.

Why: on this platform's default model (200 trees of 31 leaves) scikit-learn's `predict_proba`
costs ~11 µs a row on one core (a branchy walk down every tree for every row); that alone would
be 110 core-seconds for a 10M-row day. The kernel takes ~3 µs. It decides every split by the
rule of `_predictor.pyx`'s `_predict_one_from_raw_data`:

* NaN -> the node's missing side; a categorical split: a negative value is missing, a value in
  the node's left bitset goes left, another known category goes right, an unknown one is missing;
  a numeric split: `x <= threshold` goes left;

but finds each tree's leaf the QuickScorer way (Lucchese et al., SIGIR 2015) instead of walking:
a tree's leaves are numbered left to right and a row keeps one 64-bit mask per tree of the leaves
still possible; every node whose split sends the row right clears the leaves of its left subtree;
the leaf reached is the lowest bit left (the leaves left of it are each cut off by a node on its
path that goes right; nothing clears it). Per numeric feature, the nodes are sorted by threshold,
so the nodes that go right for a value x are a prefix (threshold < x); per categorical feature
and code (or missing) the nodes that go right are listed in advance. Then, as scikit-learn does:

* the raw score starts at the baseline (`zeros + baseline`) and adds each tree's leaf value in
  tree order (float64 additions in the same order give the same bits);
* the probability is the classifier's own loss link (`_loss.predict_proba`) on that raw score.

So the scores are identical, not close: `NativeTrees.of` can check it on a sample before use
(`batch_columns` checks it on the day's first chunk), and returns None where it cannot serve a
model (no C compiler, another classifier, more than one tree per iteration, a tree of more than
64 leaves): the caller then uses scikit-learn itself. The compiled library is cached in a
private directory of the user (<tmp>/ml_platform-<uid>, mode 0700) under a hash of the source and
flags (`-O2 -ffp-contract=off`: no fused or reordered arithmetic).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import itertools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)

MAX_LEAVES = 64  # leaves of one tree: one bit each in a uint64
_MISSING_SLOT = 256  # a categorical value that is NaN or negative (codes are 0..255)

_C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* X[r, f] = X[r * row_stride + f * col_stride] (C or Fortran order). live: n_trees words. */
void predict_raw(
    const double *X, int64_t n_rows, int64_t row_stride, int64_t col_stride, int64_t n_trees,
    int64_t n_num, const int64_t *num_feature, const int64_t *num_off, const double *num_thr,
    const int32_t *num_tree, const uint64_t *num_mask,
    const int64_t *nan_off, const int32_t *nan_tree, const uint64_t *nan_mask,
    int64_t n_cat, const int64_t *cat_feature, const int64_t *cat_off, const int32_t *cat_tree,
    const uint64_t *cat_mask, const int64_t *leaf_off, const double *leaf_value,
    uint64_t *live, double *raw)
{
    for (int64_t r = 0; r < n_rows; r++) {
        const double *x = X + r * row_stride;
        for (int64_t t = 0; t < n_trees; t++) live[t] = ~(uint64_t)0;
        for (int64_t i = 0; i < n_num; i++) {
            double v = x[num_feature[i] * col_stride];
            if (isnan(v)) {  /* the nodes whose missing side is right */
                for (int64_t k = nan_off[i]; k < nan_off[i + 1]; k++) live[nan_tree[k]] &= nan_mask[k];
            } else {  /* the nodes with threshold < v (not v <= threshold: right) */
                for (int64_t k = num_off[i]; k < num_off[i + 1] && num_thr[k] < v; k++)
                    live[num_tree[k]] &= num_mask[k];
            }
        }
        for (int64_t i = 0; i < n_cat; i++) {
            double v = x[cat_feature[i] * col_stride];
            int64_t slot = (isnan(v) || v < 0) ? 256 : (int64_t)(uint8_t)v;
            const int64_t *o = cat_off + i * 257 + slot;
            for (int64_t k = o[0]; k < o[1]; k++) live[cat_tree[k]] &= cat_mask[k];
        }
        double s = raw[r];
        for (int64_t t = 0; t < n_trees; t++) s += leaf_value[leaf_off[t] + __builtin_ctzll(live[t])];
        raw[r] = s;
    }
}
"""
_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
_lock = threading.Lock()
_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _compiled() -> ctypes.CDLL | None:
    """The kernel, compiled once per source and flags (cached in `_cache_dir()`)."""
    global _library
    with _lock:
        if _library is not False:
            return _library
        _library = None
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            _log.warning("no C compiler found: batch scoring uses scikit-learn's tree predictor")
            return None
        digest = hashlib.sha256((_C_SOURCE + " ".join(_FLAGS) + compiler).encode()).hexdigest()[:16]
        try:
            target = _cache_dir() / f"batch_trees_{digest}.so"
            if not target.exists():
                with tempfile.TemporaryDirectory() as tmp:
                    src = Path(tmp) / "trees.c"
                    src.write_text(_C_SOURCE)
                    out = Path(tmp) / "trees.so"
                    subprocess.run(
                        [compiler, *_FLAGS, str(src), "-o", str(out), "-lm"],
                        check=True,
                        capture_output=True,
                        timeout=120,
                    )
                    staged = target.with_name(f"{target.name}.{os.getpid()}.tmp")
                    shutil.copyfile(out, staged)
                    os.replace(staged, target)  # atomic: another process may compile it too
            lib = ctypes.CDLL(str(target))  # CDLL: the GIL is released during the call
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            _log.warning(
                "could not build the batch tree kernel (%s %s): using scikit-learn",
                exc,
                detail.decode(errors="replace")[:500],
            )
            return None
        lib.predict_raw.restype = None
        _library = lib
        return lib


def _cache_dir() -> Path:
    """A directory only this user can write (the library is loaded from it: another user must not
    be able to put one there): <tmp>/ml_platform-<uid>, mode 0700, checked to be ours."""
    path = Path(tempfile.gettempdir()) / f"ml_platform-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{path} is not a private directory of this user; not loading a library from it")
    return path


class NativeTrees:
    """A fitted binary HistGradientBoostingClassifier's trees for the C kernel:
    `predict_proba(X)` = `classifier.predict_proba(X)[:, 1]`, exactly, on `threads` threads."""

    def __init__(self, classifier: Any, library: ctypes.CDLL):
        self.classifier = classifier
        self._lib = library
        self.n_features = int(classifier.n_features_in_)
        known, f_idx_map = classifier._bin_mapper.make_known_categories_bitsets()
        codes = np.arange(256)
        numeric: dict[int, list[tuple[float, int, int]]] = {}  # feature -> (threshold, tree, mask)
        missing_right: dict[int, list[tuple[int, int]]] = {}  # feature -> (tree, mask): NaN goes right
        categorical: dict[int, list[list[tuple[int, int]]]] = {}  # feature -> per slot (tree, mask)
        leaf_values: list[np.ndarray] = []
        trees = [tree for iteration in classifier._predictors for tree in iteration]
        for t, tree in enumerate(trees):
            nodes = tree.nodes
            leaves, left_ranges = _leaf_order(nodes)
            if len(leaves) > MAX_LEAVES:
                raise ValueError(f"tree {t} has {len(leaves)} leaves (the kernel takes at most {MAX_LEAVES})")
            leaf_values.append(nodes["value"][leaves].astype(np.float64))
            for node, (lo, hi) in left_ranges.items():
                mask = ~(((1 << (hi - lo)) - 1) << lo) & (2**64 - 1)  # every leaf but the left subtree's
                feature, missing_left = (
                    int(nodes["feature_idx"][node]),
                    bool(nodes["missing_go_to_left"][node]),
                )
                if nodes["is_categorical"][node]:
                    bits = tree.raw_left_cat_bitsets[nodes["bitset_idx"][node]].astype(np.int64)
                    in_left = (bits[codes >> 5] >> (codes & 31)) & 1
                    known_bits = known[f_idx_map[feature]].astype(np.int64)
                    is_known = (known_bits[codes >> 5] >> (codes & 31)) & 1
                    # right: a known category outside the left set; an unknown one goes the missing way
                    right = (in_left == 0) & ((is_known == 1) | (not missing_left))
                    slots = categorical.setdefault(feature, [[] for _ in range(_MISSING_SLOT + 1)])
                    for code in np.flatnonzero(right):
                        slots[code].append((t, mask))
                    if not missing_left:
                        slots[_MISSING_SLOT].append((t, mask))
                else:
                    numeric.setdefault(feature, []).append((float(nodes["num_threshold"][node]), t, mask))
                    if not missing_left:
                        missing_right.setdefault(feature, []).append((t, mask))
        self.n_trees = len(trees)
        num_features = sorted(numeric)
        by_threshold = [sorted(numeric[f], key=lambda e: e[0]) for f in num_features]
        nan_lists = [missing_right.get(f, []) for f in num_features]
        cat_features = sorted(categorical)
        cat_lists = [slot for f in cat_features for slot in categorical[f]]
        self._arrays = {
            "num_feature": _array(num_features, np.int64),
            "num_off": _offsets(by_threshold),
            "num_thr": _array([e[0] for lst in by_threshold for e in lst], np.float64),
            "num_tree": _array([e[1] for lst in by_threshold for e in lst], np.int32),
            "num_mask": _array([e[2] for lst in by_threshold for e in lst], np.uint64),
            "nan_off": _offsets(nan_lists),
            "nan_tree": _array([e[0] for lst in nan_lists for e in lst], np.int32),
            "nan_mask": _array([e[1] for lst in nan_lists for e in lst], np.uint64),
            "cat_feature": _array(cat_features, np.int64),
            "cat_off": _offsets(cat_lists),
            "cat_tree": _array([e[0] for lst in cat_lists for e in lst], np.int32),
            "cat_mask": _array([e[1] for lst in cat_lists for e in lst], np.uint64),
            "leaf_off": _offsets(leaf_values)[:-1],
            "leaf_value": _array(np.concatenate(leaf_values) if leaf_values else [], np.float64),
        }

    @classmethod
    def of(cls, classifier: Any, check: np.ndarray | None = None) -> NativeTrees | None:
        """The kernel for `classifier`, or None where it cannot score it exactly (not a binary
        HistGradientBoostingClassifier, no compiler, or a sample `check` (a model matrix) scored
        differently from scikit-learn)."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        if (
            not isinstance(classifier, HistGradientBoostingClassifier)
            or classifier.n_trees_per_iteration_ != 1
        ):
            return None
        library = _compiled()
        if library is None:
            return None
        try:
            trees = cls(classifier, library)
        except ValueError as exc:
            _log.warning("batch tree kernel: %s; using scikit-learn", exc)
            return None
        if check is not None and len(check):
            mismatch = trees.mismatch(check)
            if mismatch:
                _log.warning("batch tree kernel differs from scikit-learn (%s): using scikit-learn", mismatch)
                return None
        return trees

    def mismatch(self, X: np.ndarray) -> str | None:
        """None if the kernel's probabilities for the model matrix X equal scikit-learn's bit for
        bit, else how many rows differ."""
        ours = self.predict_proba(X, threads=1)
        theirs = np.asarray(self.classifier.predict_proba(X)[:, 1], dtype=np.float64)
        differ = int(np.sum(ours != theirs))
        return f"{differ} of {len(X)} rows" if differ else None

    def raw(self, X: np.ndarray, threads: int = 1) -> np.ndarray:
        """The raw scores (baseline + every tree's leaf, in order), shape (n, 1) as sklearn's."""
        X = np.asarray(X, dtype=np.float64)
        if not (X.flags.c_contiguous or X.flags.f_contiguous):
            X = np.ascontiguousarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(
                f"model matrix has shape {X.shape}, the classifier reads {self.n_features} columns"
            )
        raw = np.zeros((len(X), 1), dtype=self.classifier._baseline_prediction.dtype)
        raw += self.classifier._baseline_prediction
        flat = raw[:, 0]  # (n, 1) C-contiguous: its column is contiguous too
        bounds = np.linspace(0, len(X), max(1, min(threads, len(X) // 1000 or 1)) + 1).astype(np.int64)
        parts = list(itertools.pairwise(bounds.tolist()))
        if len(parts) == 1:
            self._call(X, flat, 0, len(X))
        else:
            with ThreadPoolExecutor(max_workers=len(parts)) as pool:
                for future in [pool.submit(self._call, X, flat, lo, hi) for lo, hi in parts]:
                    future.result()
        return raw

    def predict_proba(self, X: np.ndarray, threads: int = 1) -> np.ndarray:
        """P(class 1) for each row of the model matrix X: `classifier.predict_proba(X)[:, 1]`."""
        return np.asarray(self.classifier._loss.predict_proba(self.raw(X, threads))[:, 1], dtype=np.float64)

    def _call(self, X: np.ndarray, raw: np.ndarray, lo: int, hi: int) -> None:
        a = self._arrays
        live = np.empty(max(self.n_trees, 1), dtype=np.uint64)  # this call's scratch

        def ptr(arr: np.ndarray, offset: int = 0) -> ctypes.c_void_p:
            return ctypes.c_void_p(int(arr.ctypes.data) + int(offset))

        i64 = ctypes.c_int64
        self._lib.predict_raw(
            ptr(X, lo * X.strides[0]),
            i64(int(hi - lo)),
            i64(X.strides[0] // 8),
            i64(X.strides[1] // 8),
            i64(self.n_trees),
            i64(len(a["num_feature"])),
            *(ptr(a[k]) for k in ("num_feature", "num_off", "num_thr", "num_tree", "num_mask")),
            *(ptr(a[k]) for k in ("nan_off", "nan_tree", "nan_mask")),
            i64(len(a["cat_feature"])),
            *(
                ptr(a[k])
                for k in ("cat_feature", "cat_off", "cat_tree", "cat_mask", "leaf_off", "leaf_value")
            ),
            ptr(live),
            ptr(raw, lo * raw.strides[0]),
        )


def _leaf_order(nodes: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[int, int]]]:
    """(the tree's leaf nodes from left to right, internal node -> [first, end) of its left
    subtree's leaves in that order)."""
    leaves: list[int] = []
    left_ranges: dict[int, tuple[int, int]] = {}
    stack: list[tuple[int, int]] = [(0, 0)]  # (node, 0: enter / 1: left done, right next)
    starts: dict[int, int] = {}
    while stack:
        node, state = stack.pop()
        if nodes["is_leaf"][node]:
            leaves.append(node)
        elif state == 0:
            starts[node] = len(leaves)
            stack.append((node, 1))
            stack.append((int(nodes["left"][node]), 0))
        else:
            left_ranges[node] = (starts[node], len(leaves))
            stack.append((int(nodes["right"][node]), 0))
    return np.asarray(leaves, dtype=np.int64), left_ranges


def _array(values, dtype) -> np.ndarray:
    out = np.ascontiguousarray(np.asarray(values, dtype=dtype))
    return out if len(out) else np.zeros(1, dtype=dtype)  # a valid pointer even when empty


def _offsets(lists) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64))


def release() -> None:
    """Forget the loaded kernel (tests that simulate a missing compiler)."""
    global _library
    with _lock, contextlib.suppress(Exception):
        _library = False
