"""The C source of batch scoring's tree kernel (`batch_trees` compiles and loads it; the tables it
reads are built by `batch_trees.NativeTrees`). A separate module only to keep the C apart.

QuickScorer (Lucchese et al., SIGIR 2015) on a block of BLOCK rows at a time (the block-wise,
vectorised form of V-QuickScorer / BWQS): `live[tree * BLOCK + r]` is the mask of tree's leaves
still possible for row r of the block, so one node's threshold, tree and mask are loaded once per
block and applied to all its rows with vector instructions (GCC vector extensions; 4 lanes with
AVX2, 2 otherwise; the AVX2 variant is compiled with -mavx2 and used only where the CPU has it):

* numeric feature: its nodes sorted by threshold; the rows go right at the nodes with
  threshold < x (x <= threshold is left); the scan stops at the first threshold >= the largest
  value in the block (no row goes right beyond it; a binary search finds it); per node, a lane
  compare decides which rows' masks it clears. NaN never compares: a block with NaN also applies
  the feature's missing-right list (one AND-ed mask per tree) to its NaN rows;
* categorical feature: the row's slot (the value if it is a whole number in [0, 256), else 256:
  missing) picks one row of a table [slot][tree using the feature] of AND-ed masks (`batch_trees`
  maps each slot to scikit-learn's code for that value, or to missing; slots with identical rows
  share one), so each (tree, row) is one load and one AND;
* the last block is padded with copies of its last row (their results are dropped);
* the raw score: `raw[r]` (the baseline) plus each tree's leaf in tree order, plain float64
  additions per row (-ffp-contract=off -fno-fast-math), so the same bits as scikit-learn.
"""

C_SOURCE = r"""
#include <stdint.h>
#include <math.h>

#ifndef BLOCK
#define BLOCK 8
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#define W 4
#else
#define W 2
#endif
#define NV (BLOCK / W)
typedef double vd __attribute__((vector_size(8 * W)));
typedef uint64_t vu __attribute__((vector_size(8 * W)));

int cpu_has_avx2(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
#else
    return 0;
#endif
}

static inline vd splat_d(double v) { vd out; for (int j = 0; j < W; j++) out[j] = v; return out; }
static inline vu splat_u(uint64_t v) { vu out; for (int j = 0; j < W; j++) out[j] = v; return out; }

/* l AND (keep where c, all ones elsewhere); c is all ones or zero per lane */
static inline vu clear(vu l, vu c, vu keep)
{
#if defined(__AVX2__)  /* one blend (GCC would turn keep | ~c into two instructions) */
    __m256d ones = _mm256_castsi256_pd(_mm256_set1_epi64x(-1));
    return (vu)_mm256_and_si256((__m256i)l, _mm256_castpd_si256(_mm256_blendv_pd(ones, (__m256d)keep, (__m256d)c)));
#else
    return l & (keep | ~c);
#endif
}

/* the first k in [lo, hi) with thr[k] >= v (thr ascending; hi if none) */
static int64_t first_ge(const double *thr, int64_t lo, int64_t hi, double v)
{
    while (lo < hi) {
        int64_t mid = lo + ((hi - lo) >> 1);
        if (thr[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* X[r, f] = X[r * row_stride + f * col_stride] (C or Fortran order). *_pos: tree * BLOCK.
   live: n_trees * BLOCK words, aligned to 32 bytes. raw[r] holds the baseline on entry. */
void predict_raw(
    const double *X, int64_t n_rows, int64_t row_stride, int64_t col_stride, int64_t n_trees,
    int64_t n_num, const int64_t *num_feature, const int64_t *num_off, const double *num_thr,
    const int32_t *num_pos, const uint64_t *num_keep,
    const int64_t *nan_off, const int32_t *nan_pos, const uint64_t *nan_keep,
    int64_t n_cat, const int64_t *cat_feature, const int64_t *cat_off, const int32_t *cat_pos,
    const int64_t *cat_row, const uint64_t *cat_keep,
    const int64_t *leaf_off, const double *leaf_value, uint64_t *live, double *raw)
{
    for (int64_t r0 = 0; r0 < n_rows; r0 += BLOCK) {
        int64_t nb = n_rows - r0 < BLOCK ? n_rows - r0 : BLOCK;  /* rows in this block */
        const double *xb = X + r0 * row_stride;
        for (int64_t t = 0; t < n_trees * NV; t++) ((vu *)live)[t] = splat_u(~(uint64_t)0);
        for (int64_t i = 0; i < n_num; i++) {
            const double *col = xb + num_feature[i] * col_stride;
            union { vd v[NV]; double d[BLOCK]; } x;
            double hi = -INFINITY;
            int n_nan = 0;
            for (int r = 0; r < BLOCK; r++) {
                double v = col[(r < nb ? r : nb - 1) * row_stride];
                x.d[r] = v;
                n_nan += isnan(v) != 0;
                hi = v > hi ? v : hi;  /* NaN never counts */
            }
            int64_t end = first_ge(num_thr, num_off[i], num_off[i + 1], hi);
            for (int64_t k = num_off[i]; k < end; k++) {  /* threshold < x: right */
                vd thr = splat_d(num_thr[k]);
                vu keep = splat_u(num_keep[k]);
                vu *l = (vu *)(live + num_pos[k]);
                for (int j = 0; j < NV; j++) l[j] = clear(l[j], (vu)(thr < x.v[j]), keep);
            }
            if (n_nan == BLOCK) {  /* every row NaN: the missing-right nodes clear them all */
                for (int64_t k = nan_off[i]; k < nan_off[i + 1]; k++) {
                    vu keep = splat_u(nan_keep[k]);
                    vu *l = (vu *)(live + nan_pos[k]);
                    for (int j = 0; j < NV; j++) l[j] &= keep;
                }
            } else if (n_nan) {
                vu nan[NV];
                for (int j = 0; j < NV; j++) nan[j] = (vu)(x.v[j] != x.v[j]);
                for (int64_t k = nan_off[i]; k < nan_off[i + 1]; k++) {
                    vu keep = splat_u(nan_keep[k]);
                    vu *l = (vu *)(live + nan_pos[k]);
                    for (int j = 0; j < NV; j++) l[j] = clear(l[j], nan[j], keep);
                }
            }
        }
        for (int64_t i = 0; i < n_cat; i++) {
            const double *col = xb + cat_feature[i] * col_stride;
            const uint64_t *row[BLOCK];  /* each row's table row: one mask per tree using i */
            for (int r = 0; r < BLOCK; r++) {
                double v = col[(r < nb ? r : nb - 1) * row_stride];
                /* a whole number in [0, 256) is its own slot; anything else (NaN, negative,
                   fractional, larger) is no category scikit-learn's encoder knows: missing */
                int64_t slot = (v >= 0 && v < 256 && v == (double)(int64_t)v) ? (int64_t)v : 256;
                row[r] = cat_keep + cat_row[i * 257 + slot];
            }
            const int32_t *pos = cat_pos + cat_off[i];
            for (int64_t j = 0, n = cat_off[i + 1] - cat_off[i]; j < n; j++) {
                uint64_t *l = live + pos[j];
                for (int r = 0; r < BLOCK; r++) l[r] &= row[r][j];
            }
        }
        double s[BLOCK];
        for (int r = 0; r < BLOCK; r++) s[r] = raw[r0 + (r < nb ? r : 0)];
        for (int64_t t = 0; t < n_trees; t++) {  /* tree order: the same additions as sklearn */
            const double *leaf = leaf_value + leaf_off[t];
            const uint64_t *l = live + t * BLOCK;
            for (int r = 0; r < BLOCK; r++) s[r] += leaf[__builtin_ctzll(l[r])];
        }
        for (int r = 0; r < nb; r++) raw[r0 + r] = s[r];
    }
}
"""
