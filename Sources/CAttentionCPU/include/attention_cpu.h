// The CPU hot loops of AttentionKit, compiled once per instruction set and chosen at run time.
//
// Every variant implements the same table of functions with the same results up to rounding
// (the baseline variant rounds a*b+c twice where the others fuse it). The Swift side picks a
// table once (`ak_cpu_kernels_for`), after `ak_cpu_supports` has confirmed that both the CPU and
// the operating system support the instruction set.
//
// Conventions: counts and strides are element counts (`ptrdiff_t`); a "tile" is `rows` rows
// `ld` floats apart, and `ld` is at least `width` rounded up to a multiple of 16 (the kernels
// work on whole 16-float vectors and may write the padding).
#ifndef ATTENTION_CPU_H
#define ATTENTION_CPU_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#pragma clang assume_nonnull begin

/// Instruction sets with a kernel variant. The numeric values are stable.
enum {
    AK_ISA_BASELINE = 0,  ///< x86-64 baseline (SSE2), no FMA
    AK_ISA_AVX2 = 1,      ///< AVX2 + FMA + F16C
    AK_ISA_AVX512 = 2,    ///< AVX-512 F/BW/VL/DQ (+ AVX2, FMA, F16C)
    AK_ISA_NEON = 3,      ///< aarch64 Advanced SIMD (the aarch64 baseline)
};

/// Storage types of rows the conversion kernels read and write. The numeric values are stable.
enum {
    AK_DTYPE_F32 = 0,   ///< IEEE binary32
    AK_DTYPE_F16 = 1,   ///< IEEE binary16
    AK_DTYPE_BF16 = 2,  ///< bfloat16 (upper half of binary32)
};

typedef struct ak_cpu_kernels {
    /// One of AK_ISA_*.
    int isa;
    /// "baseline", "avx2+fma", "avx512", "neon".
    const char *name;

    /// scores[r][c] = cap * tanh(scores[r][c] / cap) for c < width (and the padding).
    void (*softcap)(float *scores, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t width, float cap);

    /// row[c] = -inf for c < width outside [lo, hi] (offsets into the row; may lie outside it).
    void (*clip_row)(float *row, ptrdiff_t width, ptrdiff_t lo, ptrdiff_t hi);

    /// row[c] += mask[c] for c < width.
    void (*add_row)(float *row, const float *mask, ptrdiff_t width);

    /// row[c] = -inf where allowed[c] == 0, for c < width.
    void (*select_row)(float *row, const uint8_t *allowed, ptrdiff_t width);

    /// One online-softmax step over a score tile: per row, the new running maximum, O and the
    /// running sum rescaled, and P = exp(S - max) written over S (zero past `width`). Rows whose
    /// scores are all -inf stay empty; a NaN among them poisons the running sum.
    void (*softmax_update)(float *scores, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t width, float *row_max,
                           float *row_sum, float *out, ptrdiff_t ldo, ptrdiff_t dv);

    /// scores[r][j] = scale * dot(q[r], k[j]) for r < rows, j < width (d elements each): K, stored
    /// as `k_dtype` (AK_DTYPE_*) with rows `ldk` elements apart, is read once and widened in
    /// registers, each of its rows used by every query row (few-row decode products).
    void (*dot_scores)(ptrdiff_t rows, ptrdiff_t width, const float *q, ptrdiff_t ldq, int k_dtype, const void *k,
                       ptrdiff_t ldk, ptrdiff_t d, float scale, float *scores, ptrdiff_t ld);

    /// out[r] += sum over j < width of p[r][j] * v[j] (dv elements each): V, stored as `v_dtype`
    /// with rows `ldv` elements apart, read once and widened in registers.
    void (*accumulate)(ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld, int v_dtype, const void *v,
                       ptrdiff_t ldv, ptrdiff_t dv, float *out, ptrdiff_t ldo);

    /// `dot_scores` for `groups` head groups in one call: group g reads its query rows at
    /// q + g * q_group, its keys k_group elements after group 0's and writes scores + g * s_group.
    /// Group 0's key rows are k + j * ldk, or, with a row table `k_rows` (width entries), at
    /// k_rows[j] wherever they lie (pages: the table crosses page boundaries, so one call covers
    /// a whole block and its prefetches run ahead into the next page); `k` is then unused.
    /// (Pages and [B, N, H, D] caches hold every head of a run of keys side by side.)
    void (*dot_scores_groups)(ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *q, ptrdiff_t ldq,
                              ptrdiff_t q_group, int k_dtype, const void *k, ptrdiff_t ldk,
                              const void *_Nullable const *_Nullable k_rows, ptrdiff_t k_group, ptrdiff_t d, float scale,
                              float *scores, ptrdiff_t ld, ptrdiff_t s_group);

    /// `accumulate` for `groups` head groups in one call (offsets and row tables as in
    /// `dot_scores_groups`).
    void (*accumulate_groups)(ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld,
                              ptrdiff_t p_group, int v_dtype, const void *v, ptrdiff_t ldv,
                              const void *_Nullable const *_Nullable v_rows, ptrdiff_t v_group, ptrdiff_t dv, float *out,
                              ptrdiff_t ldo, ptrdiff_t o_group);

    /// The end of the online softmax: O /= sum and lse = max + log(sum) per row; rows that saw no
    /// key get zero O and -inf LSE, poisoned rows NaN. `lse` may be NULL.
    void (*finish)(ptrdiff_t rows, float *out, ptrdiff_t ldo, ptrdiff_t dv, const float *row_max,
                   const float *row_sum, float *_Nullable lse);

    /// dst[r][c] = src row r, element c, widened to fp32, for r < rows and c < cols; source rows
    /// are `ld_src` elements apart and stored as `dtype` (AK_DTYPE_*), destination rows `ld_dst`.
    void (*load_rows)(int dtype, const void *src, ptrdiff_t ld_src, ptrdiff_t rows, ptrdiff_t cols, float *dst,
                      ptrdiff_t ld_dst);

    /// dst row r, element c = src[r][c] rounded to `dtype` (nearest, ties to even), r < rows, c < cols.
    void (*store_rows)(int dtype, const float *src, ptrdiff_t ld_src, ptrdiff_t rows, ptrdiff_t cols, void *dst,
                       ptrdiff_t ld_dst);

    /// The sum of `count` floats (a multiple of 64), read with the widest loads: a memory probe.
    float (*read_sum)(const float *data, ptrdiff_t count);

    /// dst[c][j] = K row j, element c, widened to fp32, for c < d and j < width, and 0 for
    /// width <= j < round16(width): a key block transposed for `qk_tile`. K rows are `ldk` elements
    /// apart and stored as `dtype`; dst rows `ld_dst` floats apart (at least round16(width)).
    void (*pack_keys)(int dtype, const void *k, ptrdiff_t ldk, ptrdiff_t width, ptrdiff_t d, float *dst,
                      ptrdiff_t ld_dst);

    /// Query rows packed for `qk_tile` (rows x d floats at dst): each whole group of the variant's
    /// micro-tile height (8 rows on AVX-512, 6 on AVX2, 4 elsewhere) as [d][height], element c of
    /// its rows side by side; the remaining rows after them as plain rows of d. Rows of q are `ldq`
    /// floats apart.
    void (*pack_queries)(ptrdiff_t rows, ptrdiff_t d, const float *q, ptrdiff_t ldq, float *dst);

    /// scores[r][j] = scale * sum over c < d of q[r][c] * kt[c][j], for r < rows and
    /// j < round16(width) (the padding columns get 0 from zero keys), with q packed by
    /// `pack_queries`: register-tiled, for many rows.
    void (*qk_tile)(ptrdiff_t rows, ptrdiff_t width, ptrdiff_t d, const float *qp, const float *kt, ptrdiff_t ldk,
                    float scale, float *scores, ptrdiff_t ld);

    /// out[r][c] += sum over j < width of p[r][j] * v[j][c], for r < rows and c < dv, where dv is a
    /// multiple of 16; V rows are `ldv` elements apart, stored as `v_dtype` and widened in registers:
    /// register-tiled, for many rows.
    void (*pv_tile)(ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld, int v_dtype, const void *v,
                    ptrdiff_t ldv, ptrdiff_t dv, float *out, ptrdiff_t ldo);

    /// y = e^x and y = tanh(x) with the kernels' own approximations (for tests).
    void (*exp)(const float *x, float *y, ptrdiff_t count);
    void (*tanh)(const float *x, float *y, ptrdiff_t count);
} ak_cpu_kernels;

/// 1 when this CPU and the operating system support `isa` (registers saved on context switch)
/// and this build contains its variant; 0 otherwise.
int ak_cpu_supports(int isa);

/// The widest supported instruction set.
int ak_cpu_best_isa(void);

/// The kernels for `isa`, or NULL when `ak_cpu_supports(isa)` is 0.
const ak_cpu_kernels *_Nullable ak_cpu_kernels_for(int isa);

/// Why `isa` is not supported here, as a static string ("" when it is).
const char *ak_cpu_unsupported_reason(int isa);

#pragma clang assume_nonnull end

#ifdef __cplusplus
}
#endif

#endif
