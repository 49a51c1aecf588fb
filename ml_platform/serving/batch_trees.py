"""Batch scoring's tree predictor: scikit-learn's HistGradientBoosting prediction, bit for bit,
in a small C kernel compiled on first use (the system C compiler, `cc`), run on several threads.

Why: on this platform's default model (200 trees of 31 leaves) scikit-learn's `predict_proba`
costs ~11-14 µs a row on one core (a branchy walk down every tree for every row). The kernel:
~1.4 µs (the AVX2 build; ~1.7-2.4 portable; the row-at-a-time kernel before it 4.5 in the same
run of bench/tree_kernel.py). It decides every split by `_predictor.pyx`'s rule:

* NaN -> the node's missing side; a categorical split: a negative value is missing, a value in
  the node's left bitset goes left, another known category goes right, an unknown one is missing;
  a numeric split: `x <= threshold` goes left; categorical values are first mapped as
  scikit-learn's own encoder maps them (`_model_columns`);

but finds each tree's leaf the QuickScorer way (Lucchese et al., SIGIR 2015) instead of walking:
a tree's leaves are numbered left to right and a row keeps one 64-bit mask per tree of the leaves
still possible; every node whose split sends the row right clears the leaves of its left subtree;
the leaf reached is the lowest bit left (the leaves left of it are each cut off by a node on its
path that goes right; nothing clears it). Per numeric feature, the nodes are sorted by threshold,
so the nodes that go right for a value x are a prefix (threshold < x); per categorical feature
and code (or missing) the nodes that go right are known in advance. The kernel does this for 8
rows at a time with vector instructions (`batch_trees_kernel` describes it). Then, as
scikit-learn does:

* the raw score starts at the baseline (`zeros + baseline`) and adds each tree's leaf value in
  tree order (float64 additions in the same order give the same bits);
* the probability is the classifier's own loss link (`_loss.predict_proba`) on that raw score.

So the scores are identical, not close: `NativeTrees.of` can check it on a sample before use
(`batch_columns` checks it on the day's first chunk), and returns None where it cannot serve a
model (no C compiler, another classifier, more than one tree per iteration, a tree of more than
64 leaves, categories that are not whole numbers in [0, 256)): the caller then uses scikit-learn.
Two builds of the source: "avx2" (`-mavx2`), used only where the CPU reports AVX2
(`__builtin_cpu_supports`, asked of the other build), and "portable" (the compiler's default
target), used otherwise or if the AVX2 build fails; cached in a private directory of the user
(<tmp>/ml_platform-<uid>, mode 0700) under a hash of the source and flags (`-O3
-ffp-contract=off -fno-fast-math`: no fused or reordered arithmetic).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ml_platform.serving.batch_trees_kernel import C_SOURCE

_log = logging.getLogger(__name__)

MAX_LEAVES = 64  # leaves of one tree: one bit each in a uint64
BLOCK = 8  # rows the kernel scores together (live masks: BLOCK per tree)
_MISSING_SLOT = 256  # a categorical value that is no category (NaN, negative, fractional, >= 256)
_ALL = np.uint64(2**64 - 1)

_FLAGS = ["-O3", "-ffp-contract=off", "-fno-fast-math", f"-DBLOCK={BLOCK}", "-shared", "-fPIC"]
VARIANTS = {"avx2": ["-mavx2"], "portable": []}  # each build's extra flags
_lock = threading.Lock()
_built: dict[str, Kernel | None] = {}  # variant -> its library (None: could not build)
_best: Kernel | None | bool = False  # False: not chosen yet


@dataclass(frozen=True)
class Kernel:
    lib: ctypes.CDLL
    variant: str  # "avx2" or "portable"


def _compiled(variant: str | None = None) -> Kernel | None:
    """The kernel: `variant`, or by default the fastest this CPU runs (AVX2 where it has it, else
    the portable build); None if it cannot be built."""
    global _best
    with _lock:
        if variant is not None:
            return _build(variant)
        if _best is False:
            portable = _build("portable")
            best = portable
            if portable is not None and portable.lib.cpu_has_avx2():
                best = _build("avx2") or portable
            if best is not None:
                _log.debug("batch tree kernel: the %s build", best.variant)
            _best = best
        return _best


def _build(variant: str) -> Kernel | None:
    """Compile (once per source and flags, cached in `_cache_dir()`) and load one build."""
    if variant in _built:
        return _built[variant]
    _built[variant] = None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        _log.warning("no C compiler found: batch scoring uses scikit-learn's tree predictor")
        return None
    flags = [*_FLAGS, *VARIANTS[variant]]
    digest = hashlib.sha256((C_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    try:
        target = _cache_dir() / f"batch_trees_{variant}_{digest}.so"
        if not target.exists():
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "trees.c"
                src.write_text(C_SOURCE)
                out = Path(tmp) / "trees.so"
                subprocess.run(
                    [compiler, *flags, str(src), "-o", str(out), "-lm"],
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
            "could not build the batch tree kernel (%s build: %s %s)%s",
            variant,
            exc,
            detail.decode(errors="replace")[:500],
            ": using scikit-learn" if variant == "portable" else ": using the portable build",
        )
        return None
    lib.predict_raw.restype = None
    lib.cpu_has_avx2.restype = ctypes.c_int
    _built[variant] = Kernel(lib, variant)
    return _built[variant]


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

    def __init__(self, classifier: Any, kernel: Kernel):
        self.classifier = classifier
        self._kernel = kernel
        self.variant = kernel.variant
        self.n_features = int(classifier.n_features_in_)
        columns, code_of_slot = _model_columns(classifier)
        known, f_idx_map = classifier._bin_mapper.make_known_categories_bitsets()
        codes = np.arange(256)
        numeric: dict[int, list[tuple[float, int, int]]] = {}  # feature -> (threshold, tree, mask)
        missing_right: dict[int, dict[int, int]] = {}  # feature -> tree -> mask: NaN goes right
        categorical: dict[int, dict[int, np.ndarray]] = {}  # feature -> tree -> mask per slot
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
                    code = code_of_slot[feature]  # a value that is no category: missing
                    right_of_slot = np.where(code >= 0, right[np.maximum(code, 0)], not missing_left)
                    per_slot = categorical.setdefault(feature, {}).setdefault(
                        t, np.full(_MISSING_SLOT + 1, _ALL)
                    )
                    per_slot[right_of_slot] &= np.uint64(mask)
                else:
                    numeric.setdefault(feature, []).append((float(nodes["num_threshold"][node]), t, mask))
                    if not missing_left:
                        per_tree = missing_right.setdefault(feature, {})
                        per_tree[t] = per_tree.get(t, 2**64 - 1) & mask
        self.n_trees = len(trees)
        if self.n_trees * BLOCK >= 2**31:
            raise ValueError(f"{self.n_trees} trees (the kernel's int32 offsets take fewer)")
        num_features = sorted(numeric)
        by_threshold = [sorted(numeric[f], key=lambda e: e[0]) for f in num_features]
        nan_lists = [sorted(missing_right.get(f, {}).items()) for f in num_features]
        # per categorical feature: a table [distinct slot row][tree using the feature] of masks
        cat_features: list[int] = []
        cat_trees: list[list[int]] = []
        cat_rows: list[np.ndarray] = []  # slot -> offset of its row in cat_keep
        cat_tables: list[np.ndarray] = []
        for f in sorted(categorical):
            used = [t for t, per_slot in sorted(categorical[f].items()) if (per_slot != _ALL).any()]
            if used:
                table, row_of_slot = np.unique(
                    np.stack([categorical[f][t] for t in used], axis=1), axis=0, return_inverse=True
                )
                cat_rows.append(sum(x.size for x in cat_tables) + row_of_slot.reshape(-1) * len(used))
                cat_features.append(f)
                cat_trees.append(used)
                cat_tables.append(table.reshape(-1))
        self._n_num, self._n_cat = len(num_features), len(cat_features)
        self._arrays = {
            "num_feature": _array([columns[f] for f in num_features], np.int64),
            "num_off": _offsets(by_threshold),
            "num_thr": _array([e[0] for lst in by_threshold for e in lst], np.float64),
            "num_pos": _array([e[1] * BLOCK for lst in by_threshold for e in lst], np.int32),
            "num_keep": _array([e[2] for lst in by_threshold for e in lst], np.uint64),
            "nan_off": _offsets(nan_lists),
            "nan_pos": _array([t * BLOCK for lst in nan_lists for t, _ in lst], np.int32),
            "nan_keep": _array([m for lst in nan_lists for _, m in lst], np.uint64),
            "cat_feature": _array([columns[f] for f in cat_features], np.int64),
            "cat_off": _offsets(cat_trees),
            "cat_pos": _array([t * BLOCK for used in cat_trees for t in used], np.int32),
            "cat_row": _array(np.concatenate(cat_rows) if cat_rows else [], np.int64),
            "cat_keep": _array(np.concatenate(cat_tables) if cat_tables else [], np.uint64),
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
        kernel = _compiled()
        if kernel is None:
            return None
        try:
            trees = cls(classifier, kernel)
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
        live = _aligned_words(max(self.n_trees, 1) * BLOCK)  # this call's scratch

        def ptr(arr: np.ndarray, offset: int = 0) -> ctypes.c_void_p:
            return ctypes.c_void_p(int(arr.ctypes.data) + int(offset))

        i64 = ctypes.c_int64
        self._kernel.lib.predict_raw(
            ptr(X, lo * X.strides[0]),
            i64(int(hi - lo)),
            i64(X.strides[0] // 8),
            i64(X.strides[1] // 8),
            i64(self.n_trees),
            i64(self._n_num),
            *(ptr(a[k]) for k in ("num_feature", "num_off", "num_thr", "num_pos", "num_keep")),
            *(ptr(a[k]) for k in ("nan_off", "nan_pos", "nan_keep")),
            i64(self._n_cat),
            *(ptr(a[k]) for k in ("cat_feature", "cat_off", "cat_pos", "cat_row", "cat_keep")),
            *(ptr(a[k]) for k in ("leaf_off", "leaf_value")),
            ptr(live),
            ptr(raw, lo * raw.strides[0]),
        )


def _model_columns(classifier: Any) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(the model-matrix column of each of the trees' features, a categorical feature's code for
    each slot 0..256 or -1: missing). scikit-learn (1.5+) passes categorical columns through its own
    OrdinalEncoder first (`_preprocessor`: the categorical columns first, each value replaced by
    its position among the fitted categories, any other value by NaN); the kernel reads the
    matrix as given, so a slot is mapped to that code. Categories that are not whole numbers in
    [0, 256), or no preprocessor for categorical features (older scikit-learn): ValueError."""
    n = int(classifier.n_features_in_)
    pre = getattr(classifier, "_preprocessor", None)
    if pre is None:
        if classifier.is_categorical_ is not None and np.any(classifier.is_categorical_):
            raise ValueError("categorical features without scikit-learn's preprocessor (not supported)")
        return np.arange(n), {}
    columns = np.concatenate(
        [np.arange(n)[cols] for name, _, cols in pre.transformers_ if name in ("encoder", "numerical")]
    )
    first = pre.output_indices_["encoder"].start
    if sorted(columns.tolist()) != list(range(n)) or first != 0:
        raise ValueError("scikit-learn's preprocessor has an unexpected layout")
    code_of_slot: dict[int, np.ndarray] = {}
    for j, categories in enumerate(pre.named_transformers_["encoder"].categories_):
        values = np.asarray(categories, dtype=np.float64)
        values = values[~np.isnan(values)]
        if not np.all((values >= 0) & (values < _MISSING_SLOT) & (values == np.round(values))):
            raise ValueError(f"feature {j}: categories that are not whole numbers in [0, 256)")
        code = np.full(_MISSING_SLOT + 1, -1, dtype=np.int64)
        code[values.astype(np.int64)] = np.arange(len(values))
        code_of_slot[first + j] = code
    return columns, code_of_slot


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


def _aligned_words(n: int) -> np.ndarray:
    """n uint64 starting on a 64-byte boundary (the kernel's vector loads want 32)."""
    buf = np.empty(n + 8, dtype=np.uint64)
    skip = (-int(buf.ctypes.data) % 64) // 8
    return buf[skip : skip + n]


def _offsets(lists) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([[0], np.cumsum([len(x) for x in lists])]).astype(np.int64))


def release() -> None:
    """Forget the loaded kernels (tests that simulate a missing compiler or another directory)."""
    global _best
    with _lock, contextlib.suppress(Exception):
        _built.clear()
        _best = False
