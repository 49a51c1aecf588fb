"""Exact, fast statistics for drift detection: the two-sample Kolmogorov-Smirnov test on sorted
arrays, the chi-square test of homogeneity, Jensen-Shannon distance, the two-proportion test, PSI,
multiple-testing corrections and the histogram a plot needs. Plain numpy/scipy, no pandas.

Two-sample KS without `searchsorted`: `scipy.stats.ks_2samp` evaluates both ECDFs at every pooled
point with two binary searches of 2n keys (about 1 s per column at 1M + 1M rows). Here both samples
are sorted first (numpy's SIMD sort: ~10 ms per million floats), merged with a stable argsort (a
timsort of two runs is one linear merge), and n1*n2*(F1 - F2) is a running sum of +n2 (a reference
point) and -n1 (a current point) over the merged order: exact integers, so the statistic equals
scipy's to the last bit but for one rounding. Ties are handled as scipy does (both ECDFs are
evaluated after the last of a run of equal values). The p-value is scipy's own: for samples of at
most 10,000 values (where `method='auto'` computes the exact distribution) scipy computes it, for
larger ones it is the same `kstwo.sf(D, round(n1*n2/(n1+n2)))` scipy's asymptotic branch uses, with
the one slow branch of `kstwo.sf` summed faster (`kstwo_sf`: relative difference < 1e-8).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy import special, stats

KS_EXACT_MAX_N = 10_000  # scipy's MAX_AUTO_N: at or below, method='auto' computes the exact p-value
CORRECTIONS = ("holm", "bh", "bonferroni", "none")
PSI_EPSILON = 1e-4  # share floor in PSI, so an empty bin on one side does not make it infinite


# ----------------------------------------------------------------------------- Kolmogorov-Smirnov
def ks_statistic_sorted(a: np.ndarray, b: np.ndarray, blocks: int | None = None) -> float:
    """sup |F_a - F_b| of two sorted, NaN-free, non-empty 1-D arrays (ints or floats).

    Exact. Large samples are cut into `blocks` ranges at reference values (default ~250 reference
    values per block): n1*n2*(F_a - F_b) is known exactly at every cut from two searchsorted calls
    with a few thousand keys, and inside a block it can move by at most +n2 per reference value and
    -n1 per current value. Only the blocks whose bound could beat the largest gap already seen are
    merged point by point (usually a few percent of the rows)."""
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError(f"ks_statistic_sorted needs two non-empty samples, got sizes {n1} and {n2}")
    if blocks is None:
        blocks = n1 // 256
    if blocks < 16:
        top, bottom = _merged_extremes(a, b, n1, n2, np.zeros(1, dtype=np.int64), np.array([n1]), np.array([n2]))
        return max(top, -bottom, 0) / (n1 * n2)
    cuts = a[np.linspace(0, n1 - 1, blocks).round().astype(np.int64)]
    cuts = cuts[np.concatenate([cuts[1:] != cuts[:-1], [True]])]  # distinct, the last is a[-1]
    ia = np.searchsorted(a, cuts, side="right").astype(np.int64)
    ib = np.searchsorted(b, cuts, side="right").astype(np.int64)
    at_cut = ia * n2 - ib * n1  # n1*n2*(F_a - F_b) at each cut value (an attained value)
    best = max(int(at_cut.max()), -int(at_cut.min()), 0)
    start_a, start_b = np.concatenate([[0], ia[:-1]]), np.concatenate([[0], ib[:-1]])
    before = np.concatenate([[0], at_cut[:-1]])  # the running value just before each block
    len_a, len_b = ia - start_a, ib - start_b
    may_beat = (before + len_a * n2 > best) | (before - len_b * n1 < -best)
    # a block holding only its cut value (discrete data) has one attained value: the one at the cut
    only_cut = ((len_a == 0) | (a[np.minimum(start_a, n1 - 1)] == cuts)) & \
               ((len_b == 0) | (b[np.minimum(start_b, n2 - 1)] == cuts))
    open_blocks = np.flatnonzero(may_beat & ~only_cut)
    if len(open_blocks):
        top, bottom = _merged_extremes(a, b, n1, n2, before[open_blocks], start_a[open_blocks],
                                       start_b[open_blocks], len_a[open_blocks], len_b[open_blocks])
        best = max(best, top, -bottom)
    # after the last cut (= max of a) only current values remain: the gap shrinks monotonically to 0
    return best / (n1 * n2)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated np.arange(start, start + length) for each pair."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def _merged_extremes(a, b, n1, n2, before, start_a, start_b, len_a=None, len_b=None) -> tuple[int, int]:
    """(max, min) of n1*n2*(F_a - F_b) over the points of the given blocks (value ranges that do not
    overlap, in order), evaluated after the last of each run of equal values, as scipy does; `before`
    is the exact running value at each block's start. With len_a/len_b None: one block, all points."""
    if len_a is None:
        part_a, part_b = a, b
        block_a = block_b = None
    else:
        part_a, part_b = a[_ranges(start_a, len_a)], b[_ranges(start_b, len_b)]
    pooled = np.concatenate([part_a, part_b])
    na = len(part_a)
    order = np.argsort(pooled, kind="stable")  # sorted runs, blocks in value order: one linear merge
    scaled = np.cumsum(np.where(order < na, np.int64(n2), np.int64(-n1)))
    if len_a is not None:
        block_a = np.repeat(np.arange(len(len_a)), len_a)
        block_b = np.repeat(np.arange(len(len_b)), len_b)
        block = np.concatenate([block_a, block_b])[order]
        prior = np.cumsum(len_a * n2 - len_b * n1) - (len_a * n2 - len_b * n1)  # selected blocks before
        scaled += (before - prior)[block]
    merged = pooled[order]
    tie = merged[1:] == merged[:-1]
    if tie.any():
        keep = np.ones(len(merged), dtype=bool)
        keep[:-1] = ~tie
        scaled = scaled[keep]
    return int(scaled.max()), int(scaled.min())


def ks_pvalue(statistic: float, a: np.ndarray, b: np.ndarray) -> float:
    """The two-sided p-value `scipy.stats.ks_2samp(a, b)` (method='auto') gives for `statistic`."""
    n1, n2 = len(a), len(b)
    if max(n1, n2) <= KS_EXACT_MAX_N:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # exact -> asymp fallback notice
            return float(stats.ks_2samp(a, b).pvalue)
    m, n = sorted([float(n1), float(n2)], reverse=True)
    en = m * n / (m + n)
    return kstwo_sf(statistic, int(np.round(en)))


def kstwo_sf(d: float, n: int) -> float:
    """`scipy.stats.kstwo.sf(d, n)`, with its slow branch computed faster.

    For n > 140 and 2.2 <= n d^2 < 370 (p between ~1e-2 and ~1e-160, where drift lives at large n)
    scipy returns 2 * smirnov(n, d), summing the Birnbaum-Tingey series term by term in double-double
    precision: ~0.5 s at n = 500,000, per column. `_smirnov_sf` sums the same series in log space
    (exact ends, Simpson's rule over the smooth middle) in ~1 ms; relative difference < 1e-8 for
    n <= 1e6 (the test suite checks it against scipy). Every other branch is scipy's own call."""
    t = n * d
    nx2 = t * d
    if n > 140 and 1.0 < t < n - 1 and (nx2 >= 2.2 or d >= 0.5):
        if nx2 >= 370.0:
            return 0.0
        return float(min(max(2.0 * _smirnov_sf(n, d), 0.0), 1.0))
    return float(np.clip(stats.kstwo.sf(d, n), 0.0, 1.0))


def _smirnov_terms(n: int, x: float, j: np.ndarray) -> np.ndarray:
    """log of the Birnbaum-Tingey terms C(n, j) (1 - x - j/n)^(n-j) (x + j/n)^(j-1)."""
    with np.errstate(divide="ignore"):
        return (-np.log(n + 1.0) - special.betaln(n - j + 1, j + 1)
                + (n - j) * np.log1p(-(x + j / n)) + (j - 1) * np.log(x + j / n))


def _smirnov_sf(n: int, x: float, edge: int = 1024, points: int = 2048) -> float:
    """P(D+_n >= x) = x * sum_j terms(j), j = 0 .. floor(n (1 - x)): the first and last `edge` terms
    exactly, the middle (smooth: it varies on a scale of ~sqrt(n)) by composite Simpson over
    2 * `points` intervals plus the Euler-Maclaurin end correction."""
    last = int(np.floor(n * (1 - x)))
    if last + 1 <= 2 * edge + 4 * points:
        logs = _smirnov_terms(n, x, np.arange(0, last + 1, dtype=np.float64))
        top = logs.max()
        return float(x * np.exp(top) * np.exp(logs - top).sum())
    head = _smirnov_terms(n, x, np.arange(0, edge, dtype=np.float64))
    tail = _smirnov_terms(n, x, np.arange(last - edge + 1, last + 1, dtype=np.float64))
    a, b, k = float(edge), float(last - edge), 2 * points
    grid = _smirnov_terms(n, x, np.linspace(a, b, k + 1))
    top = max(head.max(), tail.max(), grid.max())
    g = np.exp(grid - top)
    weights = np.ones(k + 1)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    middle = (b - a) / k / 3 * float((weights * g).sum()) + (g[0] + g[-1]) / 2  # no BLAS dot (threads)
    total = np.exp(head - top).sum() + np.exp(tail - top).sum() + middle
    return float(x * np.exp(top) * total)


def ks_2samp_sorted(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(statistic, p-value) of the two-sided two-sample KS test on sorted, NaN-free arrays."""
    d = ks_statistic_sorted(a, b)
    return d, ks_pvalue(d, a, b)


# ----------------------------------------------------------------------------- categories
def chi2_homogeneity(reference: np.ndarray, current: np.ndarray) -> tuple[float, float, int]:
    """(statistic, p-value, dof) of Pearson's chi-square test on the 2 x K table of category counts,
    without continuity correction: `scipy.stats.chi2_contingency([reference, current],
    correction=False)`. Categories must be nonzero on at least one side; K = 1 gives (0, 1, 0)."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if ref.shape != cur.shape or ref.ndim != 1:
        raise ValueError(f"chi2_homogeneity needs two count vectors of one length, got {ref.shape} and {cur.shape}")
    if np.any((ref + cur) <= 0):
        raise ValueError("chi2_homogeneity: every category needs a count on at least one side")
    n1, n2 = ref.sum(), cur.sum()
    dof = len(ref) - 1
    if dof <= 0 or n1 == 0 or n2 == 0:
        return 0.0, 1.0, max(dof, 0)
    total = ref + cur
    n = n1 + n2
    e1, e2 = total * (n1 / n), total * (n2 / n)
    statistic = float(np.sum((ref - e1) ** 2 / e1) + np.sum((cur - e2) ** 2 / e2))
    return statistic, float(stats.chi2.sf(statistic, dof)), dof


def jensen_shannon(reference: np.ndarray, current: np.ndarray, *, debias: bool = True) -> float:
    """Jensen-Shannon distance (base 2, in [0, 1]) between two category count vectors.

    With `debias`, the divergence two samples of these sizes drawn from one distribution show by
    chance, (K - 1) * (1/n1 + 1/n2) / (8 ln 2) bits for K categories, is subtracted before the square
    root (floored at 0): without it a column with hundreds of rare categories looks drifted at small n."""
    ref = np.asarray(reference, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    n1, n2 = ref.sum(), cur.sum()
    if n1 <= 0 or n2 <= 0:
        raise ValueError(f"jensen_shannon needs counts on both sides, got totals {n1} and {n2}")
    p, q = ref / n1, cur / n2
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_p = np.where(p > 0, p * np.log2(p / m), 0.0)
        kl_q = np.where(q > 0, q * np.log2(q / m), 0.0)
    divergence = float(0.5 * kl_p.sum() + 0.5 * kl_q.sum())
    if debias:
        k = int(np.count_nonzero(ref + cur))
        divergence -= (k - 1) * (1 / n1 + 1 / n2) / (8 * math.log(2))
    return math.sqrt(min(max(divergence, 0.0), 1.0))


def psi(reference_shares: np.ndarray, current_shares: np.ndarray, epsilon: float = PSI_EPSILON) -> float:
    """Population stability index sum((q - p) ln(q / p)) over bins, shares floored at `epsilon`."""
    p = np.maximum(np.asarray(reference_shares, dtype=np.float64), epsilon)
    q = np.maximum(np.asarray(current_shares, dtype=np.float64), epsilon)
    return float(np.sum((q - p) * np.log(q / p)))


# ----------------------------------------------------------------------------- null share
def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p) of the pooled two-proportion z-test of x1/n1 against x2/n2 (the 2 x 2
    chi-square test without continuity correction: p = chi2.sf(z**2, 1)). No variance: (0, 1)."""
    if n1 <= 0 or n2 <= 0:
        raise ValueError(f"two_proportion_test needs n1, n2 > 0, got {n1} and {n2}")
    pooled = (x1 + x2) / (n1 + n2)
    variance = pooled * (1 - pooled) * (1 / n1 + 1 / n2)
    if variance <= 0:
        return 0.0, 1.0
    z = (x2 / n2 - x1 / n1) / math.sqrt(variance)
    return z, float(stats.chi2.sf(z * z, 1))


# ----------------------------------------------------------------------------- many columns
def adjust_pvalues(pvalues: list[float] | np.ndarray, method: str) -> np.ndarray:
    """p-values adjusted for testing them together: Holm (family-wise error), Benjamini-Hochberg
    (false discovery rate), Bonferroni, or none. Same order as given."""
    if method not in CORRECTIONS:
        raise ValueError(f"correction {method!r} is not one of {CORRECTIONS}")
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0 or method == "none":
        return p.copy()
    if method == "bonferroni":
        return np.minimum(p * m, 1.0)
    if method == "bh":
        return np.asarray(stats.false_discovery_control(p, method="bh"), dtype=np.float64)
    order = np.argsort(p, kind="stable")  # holm: step-down, monotone
    stepped = np.maximum.accumulate(np.minimum(p[order] * (m - np.arange(m)), 1.0))
    out = np.empty(m)
    out[order] = stepped
    return out


# ----------------------------------------------------------------------------- histograms
def quantile_edges(sorted_finite: np.ndarray, bins: int) -> np.ndarray:
    """Up to `bins` + 1 distinct bin edges at the quantiles of a sorted, finite, non-empty array
    (first edge its minimum, last its maximum); fewer when values repeat."""
    n = len(sorted_finite)
    if n == 0:
        return np.empty(0)
    positions = np.round(np.linspace(0, n - 1, bins + 1)).astype(np.int64)
    return np.unique(sorted_finite[positions])


def bin_counts_sorted(sorted_values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of a sorted array in [below edges[0]] + the bins [e0, e1), ..., [e_k-1, e_k] (the last
    one closed) + [above edges[-1]]: len(edges) + 1 counts."""
    left = np.searchsorted(sorted_values, edges, side="left")
    right_of_last = np.searchsorted(sorted_values, edges[-1], side="right")
    inner = np.diff(left).astype(np.int64)
    inner[-1] += right_of_last - left[-1]  # close the last bin on the right
    return np.concatenate([[left[0]], inner, [len(sorted_values) - right_of_last]]).astype(np.int64)


def value_counts_sorted(sorted_values: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many times each of `values` occurs in a sorted array."""
    return (np.searchsorted(sorted_values, values, side="right")
            - np.searchsorted(sorted_values, values, side="left")).astype(np.int64)
