"""Batch scoring's tree predictor: scikit-learn's HistGradientBoosting prediction, bit for bit,
in a small C kernel compiled on first use (the system C compiler, `cc`), run on several threads.

Why: on this platform's default model (200 trees of 31 leaves) scikit-learn's `predict_proba`
costs ~11 µs a row on one core (its per-node loop carries every node field and re-enters each
tree for every row); that alone would be 110 core-seconds for a 10M-row day. The kernel walks
the same trees with the same rule, `_predictor.pyx`'s `_predict_one_from_raw_data`:

* NaN -> the node's missing side; a categorical split: a negative value is missing, a value in
  the node's left bitset goes left, another known category goes right, an unknown one is missing;
  a numeric split: `x <= threshold` goes left;
* the raw score starts at the baseline (`zeros + baseline`, as sklearn does) and adds each tree's
  leaf value in tree order (float64 additions in the same order give the same bits);
* the probability is the classifier's own loss link (`_loss.predict_proba`) on that raw score.

So the scores are identical, not close: `NativeTrees.of` checks it on a sample before it is used
(`batch.py` checks it again on the day's first chunk), and returns None where it cannot serve a
model (no C compiler, another classifier, more than one tree per iteration): the caller then
uses scikit-learn itself. The compiled library is cached in the temp directory under a hash of
the source and flags (`-O2 -ffp-contract=off`: no fused or reordered arithmetic).
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

_C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

/* Nodes of all trees, flattened; a tree's nodes start at root[t]; children are global indices. */
void predict_raw(
    const double *X, int64_t n_rows, int64_t row_stride, int64_t col_stride,
    int64_t n_trees, const int64_t *root,
    const int64_t *feature, const double *threshold, const int64_t *left, const int64_t *right,
    const uint8_t *missing_left, const uint8_t *is_leaf, const uint8_t *is_categorical,
    const int64_t *bitset_idx, const uint32_t *left_bitsets, const uint32_t *known_bitsets,
    const int64_t *f_idx_map, const double *value, double *raw)
{
    const int64_t BLOCK = 256;  /* rows per pass over the trees: their inputs stay in cache */
    /* X[r, f] = X[r * row_stride + f * col_stride] (C or Fortran order) */
    for (int64_t r0 = 0; r0 < n_rows; r0 += BLOCK) {
        int64_t r1 = r0 + BLOCK < n_rows ? r0 + BLOCK : n_rows;
        for (int64_t t = 0; t < n_trees; t++) {
            for (int64_t r = r0; r < r1; r++) {
                const double *x = X + r * row_stride;
                int64_t node = root[t];
                while (!is_leaf[node]) {
                    double v = x[feature[node] * col_stride];
                    int go_left;
                    if (isnan(v)) {
                        go_left = missing_left[node];
                    } else if (is_categorical[node]) {
                        if (v < 0) {
                            go_left = missing_left[node];
                        } else {
                            uint8_t c = (uint8_t)v;
                            const uint32_t *lb = left_bitsets + 8 * bitset_idx[node];
                            const uint32_t *kb = known_bitsets + 8 * f_idx_map[feature[node]];
                            if ((lb[c / 32] >> (c % 32)) & 1u) go_left = 1;
                            else if ((kb[c / 32] >> (c % 32)) & 1u) go_left = 0;
                            else go_left = missing_left[node];
                        }
                    } else {
                        go_left = v <= threshold[node];
                    }
                    node = go_left ? left[node] : right[node];
                }
                raw[r] += value[node];
            }
        }
    }
}
"""
_FLAGS = ["-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC"]
_lock = threading.Lock()
_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _compiled() -> ctypes.CDLL | None:
    """The kernel, compiled once per source and flags (cached in the temp directory)."""
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
        target = Path(tempfile.gettempdir()) / f"ml_platform_batch_trees_{digest}.so"
        try:
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


class NativeTrees:
    """A fitted binary HistGradientBoostingClassifier's trees for the C kernel:
    `predict_proba(X)` = `classifier.predict_proba(X)[:, 1]`, exactly, on `threads` threads."""

    def __init__(self, classifier: Any, library: ctypes.CDLL):
        self.classifier = classifier
        self._lib = library
        predictors = [tree for iteration in classifier._predictors for tree in iteration]
        roots, offset, bitset_offset = [], 0, 0
        parts: dict[str, list[np.ndarray]] = {
            k: []
            for k in (
                "feature",
                "threshold",
                "left",
                "right",
                "missing_left",
                "is_leaf",
                "is_categorical",
                "bitset_idx",
                "value",
            )
        }
        bitsets = []
        for tree in predictors:
            nodes = tree.nodes
            roots.append(offset)
            parts["feature"].append(nodes["feature_idx"].astype(np.int64))
            parts["threshold"].append(nodes["num_threshold"].astype(np.float64))
            parts["left"].append(nodes["left"].astype(np.int64) + offset)
            parts["right"].append(nodes["right"].astype(np.int64) + offset)
            parts["missing_left"].append(nodes["missing_go_to_left"].astype(np.uint8))
            parts["is_leaf"].append(nodes["is_leaf"].astype(np.uint8))
            parts["is_categorical"].append(nodes["is_categorical"].astype(np.uint8))
            parts["bitset_idx"].append(nodes["bitset_idx"].astype(np.int64) + bitset_offset)
            parts["value"].append(nodes["value"].astype(np.float64))
            cat = np.asarray(tree.raw_left_cat_bitsets, dtype=np.uint32).reshape(-1, 8)
            bitsets.append(cat)
            bitset_offset += len(cat)
            offset += len(nodes)
        self._arrays = {k: np.ascontiguousarray(np.concatenate(v)) for k, v in parts.items()}
        self._roots = np.asarray(roots, dtype=np.int64)
        self._left_bitsets = np.ascontiguousarray(
            np.concatenate(bitsets) if bitsets else np.zeros((1, 8)), dtype=np.uint32
        )
        known, f_idx_map = classifier._bin_mapper.make_known_categories_bitsets()
        self._known = np.ascontiguousarray(known if len(known) else np.zeros((1, 8)), dtype=np.uint32)
        self._f_idx_map = np.ascontiguousarray(f_idx_map, dtype=np.int64)
        self.n_features = int(classifier.n_features_in_)

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
        trees = cls(classifier, library)
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

        def ptr(arr: np.ndarray, offset: int = 0) -> ctypes.c_void_p:
            return ctypes.c_void_p(int(arr.ctypes.data) + int(offset))

        i64 = ctypes.c_int64
        self._lib.predict_raw(
            ptr(X, lo * X.strides[0]),
            i64(int(hi - lo)),
            i64(X.strides[0] // 8),
            i64(X.strides[1] // 8),
            i64(len(self._roots)),
            ptr(self._roots),
            ptr(a["feature"]),
            ptr(a["threshold"]),
            ptr(a["left"]),
            ptr(a["right"]),
            ptr(a["missing_left"]),
            ptr(a["is_leaf"]),
            ptr(a["is_categorical"]),
            ptr(a["bitset_idx"]),
            ptr(self._left_bitsets),
            ptr(self._known),
            ptr(self._f_idx_map),
            ptr(a["value"]),
            ptr(raw, lo * raw.strides[0]),
        )


def release() -> None:
    """Forget the loaded kernel (tests that simulate a missing compiler)."""
    global _library
    with _lock, contextlib.suppress(Exception):
        _library = False
