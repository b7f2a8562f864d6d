// The kernels, written once over 16-lane vectors (Clang/GCC vector extensions) and compiled by each
// kernels_<isa>.c under that instruction set's target attribute. Before including this file a
// variant defines AK_SUFFIX (the name suffix), AK_ISA, AK_NAME and AK_HAS_FMA.
//
// Not a public header: included only by the variant files.

#include <math.h>
#include <string.h>

#include "attention_cpu.h"

// 64-byte vectors passed between the static inline helpers below would have a different calling
// convention without AVX-512; the helpers never cross a translation unit (every variant compiles
// all of them under its own target attribute), so the warning does not apply.
#pragma clang diagnostic ignored "-Wpsabi"

#define AK_CAT2(a, b) a##_##b
#define AK_CAT(a, b) AK_CAT2(a, b)
#define AK_FN(name) AK_CAT(ak_##name, AK_SUFFIX)

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v2f __attribute__((vector_size(8)));
typedef uint8_t v16b __attribute__((vector_size(16)));
// Unaligned, aliasing views for loads and stores.
typedef float v16f_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint8_t v16b_u __attribute__((vector_size(16), aligned(1), may_alias));

#ifndef AK_HAS_SCALEF
#define AK_HAS_SCALEF 0
#endif

#if AK_HAS_FMA
#define AK_FMA(a, b, c) __builtin_elementwise_fma((a), (b), (c))
#else
#define AK_FMA(a, b, c) ((a) * (b) + (c))
#endif

static inline v16f load16(const float *p) { return *(const v16f_u *)p; }
static inline void store16(float *p, v16f v) { *(v16f_u *)p = v; }
/// Every lane x (a broadcast: `(v16f){0} + x` would cost an addition per call, 0 + x not being x for -0).
static inline v16f splat(float x) { return (v16f){x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
/// mask ? a : b, lane-wise (mask lanes are all ones or all zeros).
static inline v16f select16(v16i mask, v16f a, v16f b) {
    return (v16f)((mask & (v16i)a) | (~mask & (v16i)b));
}

/// The largest lane; NaN lanes are not taken unless all are NaN (IEEE maxNum).
static inline float hmax16(v16f v) {
    v8f a = __builtin_elementwise_max(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
    v4f b = __builtin_elementwise_max(__builtin_shufflevector(a, a, 0, 1, 2, 3), __builtin_shufflevector(a, a, 4, 5, 6, 7));
    v2f c = __builtin_elementwise_max(__builtin_shufflevector(b, b, 0, 1), __builtin_shufflevector(b, b, 2, 3));
    return fmaxf(c[0], c[1]);
}

/// The sum of the lanes by halving: a fixed order, so results are deterministic.
static inline float hsum16(v16f v) {
    v8f a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
            __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    v2f c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

/// The lane sums of four vectors at once, [sum a, sum b, sum c, sum d]: the halving of `hsum16`
/// with the four interleaved, so the shuffles are shared (a fixed order: deterministic).
static inline v4f hsum16x4(v16f a, v16f b, v16f c, v16f d) {
#define AK_FOLD(v) (__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + \
                    __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15))
    const v8f a8 = AK_FOLD(a), b8 = AK_FOLD(b), c8 = AK_FOLD(c), d8 = AK_FOLD(d);
#undef AK_FOLD
    const v8f ab = __builtin_shufflevector(a8, b8, 0, 8, 1, 9, 2, 10, 3, 11) +
                   __builtin_shufflevector(a8, b8, 4, 12, 5, 13, 6, 14, 7, 15);
    const v8f cd = __builtin_shufflevector(c8, d8, 0, 8, 1, 9, 2, 10, 3, 11) +
                   __builtin_shufflevector(c8, d8, 4, 12, 5, 13, 6, 14, 7, 15);
    const v8f abcd = __builtin_shufflevector(ab, cd, 0, 1, 8, 9, 2, 3, 10, 11) +
                     __builtin_shufflevector(ab, cd, 4, 5, 12, 13, 6, 7, 14, 15);
    return __builtin_shufflevector(abcd, abcd, 0, 1, 2, 3) + __builtin_shufflevector(abcd, abcd, 4, 5, 6, 7);
}

/// e^x, relative error below 2e-7 over the normal range. Cody-Waite reduction x = k ln2 + r,
/// a degree-6 polynomial in r, 2^k built in the exponent bits (split in two halves so that k = 128
/// does not overflow). x < -87.3 (and -inf) gives exactly 0, NaN stays NaN, x > 88.7 gives +inf.
static inline v16f exp16(v16f x) {
    const v16f low = splat(-87.3f);
    v16i tiny = x < low;  // false for NaN
    // Lanes below `low` (the -inf of masked or padding scores) are computed as e^0 and replaced
    // by 0 at the end: computing them near the bottom of the range would make subnormal
    // intermediates, which cost a microcode assist per instruction on many x86 cores.
    v16f xc = select16(tiny, splat(0.0f), x);
    xc = select16(xc > splat(88.7f), splat(88.7f), xc);
    const v16f magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    v16f t = AK_FMA(xc, splat(1.44269504f), magic);
    v16f k = t - magic;
    v16f r = AK_FMA(k, splat(-0.693359375f), xc);
    r = AK_FMA(k, splat(2.1219444e-4f), r);
    v16f p = splat(1.98756915e-4f);
    p = AK_FMA(p, r, splat(1.39819995e-3f));
    p = AK_FMA(p, r, splat(8.3334519e-3f));
    p = AK_FMA(p, r, splat(4.16657959e-2f));
    p = AK_FMA(p, r, splat(1.66666655e-1f));
    p = AK_FMA(p, r, splat(5.00000012e-1f));
    p = AK_FMA(p, r * r, r + 1.0f);
#if AK_HAS_SCALEF
    // p * 2^k in one instruction (vscalefps), tiny lanes zeroed by its mask.
    return (v16f)_mm512_maskz_scalef_ps(_mm512_cmp_ps_mask((__m512)x, (__m512)low, _CMP_NLT_UQ), (__m512)p,
                                        (__m512)k);
#else
    v16i ki = (v16i)t - 0x4B400000;
    v16i k1 = ki >> 1;
    v16i k2 = ki - k1;
    v16f s1 = (v16f)((k1 + 127) << 23);
    v16f s2 = (v16f)((k2 + 127) << 23);
    return select16(tiny, splat(0.0f), p * s1 * s2);
#endif
}

/// e^(s - m) for the softmax step, where s <= m (or s is -inf or NaN). With vscalefps: d = s - m
/// = k ln2 + r (Cody-Waite), e^r by a degree-5 polynomial with p(0) = 1 exactly (relative error
/// below 2e-7 over the range), times 2^k in one instruction; 0 for d < -86.6 (no subnormal
/// results), NaN kept. Elsewhere: `exp16(s - m)`.
static inline v16f exp_shifted16(v16f s, v16f m) {
#if AK_HAS_SCALEF
    const v16f d = s - m;
    const __mmask16 keep = _mm512_cmp_ps_mask((__m512)d, _mm512_set1_ps(-86.6f), _CMP_NLT_UQ);
    const v16f k = (v16f)_mm512_roundscale_ps((__m512)(d * splat(1.44269504f)),
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v16f r = AK_FMA(k, splat(-0.693359375f), d);
    r = AK_FMA(k, splat(2.1219444e-4f), r);
    v16f p = splat(8.290239610e-3f);
    p = AK_FMA(p, r, splat(4.189778119e-2f));
    p = AK_FMA(p, r, splat(1.666763574e-1f));
    p = AK_FMA(p, r, splat(4.999915063e-1f));
    p = AK_FMA(p, r, splat(9.999997020e-1f));
    p = AK_FMA(p, r, splat(1.0f));
    return (v16f)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)k);
#else
    return exp16(s - m);
#endif
}

/// tanh(x) = 1 - 2 / (e^(2|x|) + 1) with the sign restored; absolute error below 1e-6.
static inline v16f tanh16(v16f x) {
    v16i negative = x < splat(0.0f);
    v16f ax = select16(negative, -x, x);
    v16i saturated = ax > splat(9.0f);  // tanh rounds to 1 in fp32 beyond 9
    v16f e = exp16(2.0f * select16(saturated, splat(9.0f), ax));
    v16f t = select16(saturated, splat(1.0f), 1.0f - 2.0f / (e + 1.0f));
    return select16(negative, -t, t);
}

static inline ptrdiff_t round16(ptrdiff_t n) { return (n + 15) & ~(ptrdiff_t)15; }

static void scale_row(float *row, ptrdiff_t count, float factor) {
    ptrdiff_t c = 0;
    for (; c + 16 <= count; c += 16) store16(row + c, load16(row + c) * factor);
    for (; c < count; c++) row[c] *= factor;
}

static void AK_FN(softcap)(float *scores, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t width, float cap) {
    const float inverse = 1.0f / cap;
    const ptrdiff_t padded = round16(width);
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = scores + r * ld;
        for (ptrdiff_t c = 0; c < padded; c += 16) store16(row + c, cap * tanh16(load16(row + c) * inverse));
    }
}

static void AK_FN(clip_row)(float *row, ptrdiff_t width, ptrdiff_t lo, ptrdiff_t hi) {
    if (lo <= 0 && hi >= width - 1) return;
    // Offsets clamped into int32 range: beyond [-1, width] they all act alike.
    const int32_t lo32 = (int32_t)(lo < -1 ? -1 : lo > width ? width : lo);
    const int32_t hi32 = (int32_t)(hi < -1 ? -1 : hi > width ? width : hi);
    const v16i lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const v16f minus_inf = splat(-INFINITY);
    ptrdiff_t c = 0;
    for (; c + 16 <= width; c += 16) {
        v16i idx = lanes + (int32_t)c;
        v16i hidden = (idx < lo32) | (idx > hi32);
        store16(row + c, select16(hidden, minus_inf, load16(row + c)));
    }
    for (; c < width; c++)
        if (c < lo32 || c > hi32) row[c] = -INFINITY;
}

static void AK_FN(add_row)(float *row, const float *mask, ptrdiff_t width) {
    ptrdiff_t c = 0;
    for (; c + 16 <= width; c += 16) store16(row + c, load16(row + c) + load16(mask + c));
    for (; c < width; c++) row[c] += mask[c];
}

static void AK_FN(select_row)(float *row, const uint8_t *allowed, ptrdiff_t width) {
    const v16f minus_inf = splat(-INFINITY);
    ptrdiff_t c = 0;
    for (; c + 16 <= width; c += 16) {
        v16i m = __builtin_convertvector(*(const v16b_u *)(allowed + c), v16i);
        store16(row + c, select16(m == 0, minus_inf, load16(row + c)));
    }
    for (; c < width; c++)
        if (allowed[c] == 0) row[c] = -INFINITY;
}

static void AK_FN(softmax_update)(float *scores, ptrdiff_t ld, ptrdiff_t rows, ptrdiff_t width, float *row_max,
                                  float *row_sum, float *out, ptrdiff_t ldo, ptrdiff_t dv) {
    const ptrdiff_t padded = round16(width);
    const v16i lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *row = scores + r * ld;
        v16f vmax = splat(-INFINITY);
        for (ptrdiff_t c = 0; c < padded; c += 16) {
            v16f s = load16(row + c);
            if (c + 16 > width) {
                // The padding past `width` becomes -inf in one vector store (scalar stores read back
                // as a vector would stall store forwarding: short rows are common in decode).
                s = select16(lanes + (int32_t)c >= (int32_t)width, splat(-INFINITY), s);
                store16(row + c, s);
            }
            vmax = select16(s > vmax, s, vmax);
        }
        const float old = row_max[r];
        const float block = hmax16(vmax);
        const float now = block > old ? block : old;
        if (now == -INFINITY) {
            // Nothing visible yet. A NaN score hidden behind -inf maxima must still poison the row.
            for (ptrdiff_t c = 0; c < width; c++)
                if (isnan(row[c])) row_sum[r] = NAN;
            memset(row, 0, (size_t)padded * sizeof(float));
            continue;
        }
        if (old != now && old != -INFINITY) {
            const float alpha = expf(old - now);
            row_sum[r] *= alpha;
            scale_row(out + r * ldo, dv, alpha);
        }
        row_max[r] = now;
        const v16f m = splat(now);
        v16f sum = splat(0.0f);
        for (ptrdiff_t c = 0; c < padded; c += 16) {
            v16f e = exp_shifted16(load16(row + c), m);
            sum += e;
            store16(row + c, e);
        }
        row_sum[r] += hsum16(sum);
    }
}

// ---- Storage-type conversions ----

/// fp16 bits -> fp32, exact (portable bit manipulation; the vector paths use F16C where present).
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const uint32_t exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    uint32_t bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | mantissa << 13;
    } else if (exponent == 0) {
        float magnitude = (float)mantissa * 0x1p-24f;
        return sign ? -magnitude : magnitude;
    } else {
        bits = sign | (exponent + 112) << 23 | mantissa << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/// fp32 -> fp16 bits, round to nearest even; overflow to Inf; NaN quiet with its top payload bits.
static inline uint16_t float_to_half(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000);
    const int exponent = (int)((bits >> 23) & 0xFF);
    const uint32_t mantissa = bits & 0x7FFFFF;
    if (exponent == 0xFF) return sign | (mantissa ? (uint16_t)(0x7E00 | (mantissa >> 13)) : 0x7C00);
    const int e = exponent - 112;
    if (e >= 0x1F) return sign | 0x7C00;
    if (e <= 0) {
        if (e < -10) return sign;
        const uint32_t significand = mantissa | 0x800000, shift = (uint32_t)(14 - e);
        const uint32_t kept = significand >> shift, half = 1u << (shift - 1), rest = significand & ((1u << shift) - 1);
        return sign | (uint16_t)((rest > half || (rest == half && (kept & 1))) ? kept + 1 : kept);
    }
    const uint32_t combined = (uint32_t)e << 10 | mantissa >> 13, rest = mantissa & 0x1FFF;
    return sign | (uint16_t)((rest > 0x1000 || (rest == 0x1000 && (combined & 1))) ? combined + 1 : combined);
}

static inline float bf16_to_float(uint16_t b) {
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFF) > 0x7F800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

typedef uint16_t v16u16_u __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t v16u32 __attribute__((vector_size(64)));
#if AK_HAS_F16C
typedef _Float16 v16h_u __attribute__((vector_size(32), aligned(2), may_alias));
#endif

static inline void load_row_f16(const uint16_t *src, float *dst, ptrdiff_t cols) {
    ptrdiff_t c = 0;
#if AK_HAS_F16C
    for (; c + 16 <= cols; c += 16) store16(dst + c, __builtin_convertvector(*(const v16h_u *)(src + c), v16f));
#endif
    for (; c < cols; c++) dst[c] = half_to_float(src[c]);
}

static inline void load_row_bf16(const uint16_t *src, float *dst, ptrdiff_t cols) {
    ptrdiff_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        v16u32 wide = __builtin_convertvector(*(const v16u16_u *)(src + c), v16u32) << 16;
        store16(dst + c, (v16f)wide);
    }
    for (; c < cols; c++) dst[c] = bf16_to_float(src[c]);
}

static inline void store_row_f16(const float *src, uint16_t *dst, ptrdiff_t cols) {
    ptrdiff_t c = 0;
#if AK_HAS_F16C
    for (; c + 16 <= cols; c += 16) *(v16h_u *)(dst + c) = __builtin_convertvector(load16(src + c), v16h_u);
#endif
    for (; c < cols; c++) dst[c] = float_to_half(src[c]);
}

static inline void store_row_bf16(const float *src, uint16_t *dst, ptrdiff_t cols) {
    ptrdiff_t c = 0;
    for (; c + 16 <= cols; c += 16) {
        v16u32 bits = (v16u32)load16(src + c);
        v16u32 rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
        v16u32 quiet = (bits >> 16) | 0x40;
        v16u32 is_nan = (v16u32)((bits & 0x7FFFFFFF) > 0x7F800000);
        *(v16u16_u *)(dst + c) = __builtin_convertvector((is_nan & quiet) | (~is_nan & rounded), v16u16_u);
    }
    for (; c < cols; c++) dst[c] = float_to_bf16(src[c]);
}

/// 16 consecutive elements at index i of a row stored as `dtype`, widened to fp32. With a constant
/// `dtype` (the always-inline bodies below) each case compiles to its own loop.
static inline __attribute__((always_inline)) v16f load16_as(int dtype, const void *row, ptrdiff_t i) {
    if (dtype == AK_DTYPE_F16) {
#if AK_HAS_F16C
        return __builtin_convertvector(*(const v16h_u *)((const uint16_t *)row + i), v16f);
#else
        float tmp[16];
        for (int l = 0; l < 16; l++) tmp[l] = half_to_float(((const uint16_t *)row)[i + l]);
        return load16(tmp);
#endif
    }
    if (dtype == AK_DTYPE_BF16) {
        return (v16f)(__builtin_convertvector(*(const v16u16_u *)((const uint16_t *)row + i), v16u32) << 16);
    }
    return load16((const float *)row + i);
}

static inline __attribute__((always_inline)) float load1_as(int dtype, const void *row, ptrdiff_t i) {
    if (dtype == AK_DTYPE_F16) return half_to_float(((const uint16_t *)row)[i]);
    if (dtype == AK_DTYPE_BF16) return bf16_to_float(((const uint16_t *)row)[i]);
    return ((const float *)row)[i];
}

static inline ptrdiff_t dtype_size(int dtype) { return dtype == AK_DTYPE_F32 ? 4 : 2; }

/// Rows this far ahead are prefetched by the streaming kernels. Rows of one head that are far apart
/// ([B, N, H, D] caches put H·D elements between them) each start a new page, where the hardware
/// prefetcher stops; explicit prefetches keep the stream going.
enum { AK_PREFETCH_ROWS = 8 };

static inline __attribute__((always_inline)) void prefetch_row(const char *row, ptrdiff_t bytes) {
    for (ptrdiff_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 3);
}

/// `prefetch_row` into L2 only (prefetcht1).
static inline __attribute__((always_inline)) void prefetch_row_l2(const char *row, ptrdiff_t bytes) {
    for (ptrdiff_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
}

/// The streaming kernels prefetch into L1 only while one step of four keys (every group's rows)
/// needs at most this many lines; more L1 prefetches fill its miss buffers and stall the loads, so
/// larger steps prefetch into L2. Measured on the 2-core Zen 5 machine, decode-32k (Hkv 8, D128):
/// [B, N, H, D] fp16 (128 lines a step) 7.0-11.8 ms with L1 prefetches against 4.5-5.1 ms with L2
/// ones; [B, H, N, D] fp32 (32 lines) 10.8-10.9 against 8.0-8.2 ms; [B, H, N, D] fp16 (16 lines)
/// 4.1-4.8 ms against 5.1-5.3 ms, the one case where L1 wins.
enum { AK_L1_PREFETCH_LINES = 16 };

/// Query rows the streaming kernels keep in registers at once (larger row counts run in chunks).
enum { AK_STREAM_ROWS = 8 };

/// scores[r * ld] = scale * dot(q[r], k_row) for r < n (n a constant after inlining), the K row
/// widened once per 16 elements.
static inline __attribute__((always_inline)) void dot_rows_widened(
    int dtype, const int n, const float *q, ptrdiff_t ldq, const char *k_row, ptrdiff_t d, float scale, float *scores,
    ptrdiff_t ld) {
    const ptrdiff_t vector_end = d & ~(ptrdiff_t)15;
    v16f acc[AK_STREAM_ROWS];
    for (int r = 0; r < n; r++) acc[r] = splat(0.0f);
    ptrdiff_t c = 0;
    for (; c < vector_end; c += 16) {
        const v16f kv = load16_as(dtype, k_row, c);
        for (int r = 0; r < n; r++) acc[r] = AK_FMA(load16(q + r * ldq + c), kv, acc[r]);
    }
    for (int r = 0; r < n; r++) {
        float dot = hsum16(acc[r]);
        for (ptrdiff_t t = c; t < d; t++) dot += q[r * ldq + t] * load1_as(dtype, k_row, t);
        scores[r * ld] = dot * scale;
    }
}

/// The address of key (or value) row j: rows[j] + offset when a row table is given (pages: rows
/// wherever their page lies), else base + j * row_bytes.
static inline __attribute__((always_inline)) const char *row_at(const char *base, ptrdiff_t row_bytes,
                                                                const void *const *rows, ptrdiff_t offset,
                                                                ptrdiff_t j) {
    return rows ? (const char *)rows[j] + offset : base + j * row_bytes;
}

/// Four K rows (j to j + 3, addressed as by `row_at`) against n <= 4 query rows (n a constant
/// after inlining): each Q chunk loaded once for the four keys, the 4n sums reduced four at a time.
static inline __attribute__((always_inline)) void dot4_rows_widened(
    int dtype, const int n, const float *q, ptrdiff_t ldq, const char *base, ptrdiff_t row_bytes,
    const void *const *rows, ptrdiff_t offset, ptrdiff_t j, ptrdiff_t d, float scale, float *scores, ptrdiff_t ld) {
    const ptrdiff_t vector_end = d & ~(ptrdiff_t)15;
    v16f acc[4][4];
    for (int r = 0; r < n; r++)
        for (int t = 0; t < 4; t++) acc[r][t] = splat(0.0f);
    ptrdiff_t c = 0;
    for (; c < vector_end; c += 16) {
        v16f kv[4];
        for (int t = 0; t < 4; t++) kv[t] = load16_as(dtype, row_at(base, row_bytes, rows, offset, j + t), c);
        for (int r = 0; r < n; r++) {
            const v16f qv = load16(q + r * ldq + c);
            for (int t = 0; t < 4; t++) acc[r][t] = AK_FMA(qv, kv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < n; r++) {
        v4f dots = hsum16x4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        for (ptrdiff_t e = c; e < d; e++) {
            const float qe = q[r * ldq + e];
            for (int t = 0; t < 4; t++)
                dots[t] += qe * load1_as(dtype, row_at(base, row_bytes, rows, offset, j + t), e);
        }
        for (int t = 0; t < 4; t++) scores[r * ld + t] = dots[t] * scale;
    }
}

/// The scores of keys j to j + 3 (addressed as by `row_at`) for every query row, four rows at a
/// time (`dot4_rows_widened`: each K chunk widened once per four rows; later passes read the four
/// K rows from L1).
static inline __attribute__((always_inline)) void dot_keys4(int dtype, ptrdiff_t rows, const float *q, ptrdiff_t ldq,
                                                             const char *base, ptrdiff_t row_bytes,
                                                             const void *const *k_rows, ptrdiff_t k_offset, ptrdiff_t j,
                                                             ptrdiff_t d, float scale, float *scores, ptrdiff_t ld) {
    for (ptrdiff_t h = 0; h < rows; h += 4) {
        float *out = scores + h * ld + j;
        const float *qh = q + h * ldq;
#define AK_DOT4(N) dot4_rows_widened(dtype, N, qh, ldq, base, row_bytes, k_rows, k_offset, j, d, scale, out, ld)
        switch (rows - h) {
        case 1: AK_DOT4(1); break;
        case 2: AK_DOT4(2); break;
        case 3: AK_DOT4(3); break;
        default: AK_DOT4(4); break;
        }
#undef AK_DOT4
    }
}

/// The scores of key j alone for every query row, eight rows at a time (the row count a constant
/// in each case, so the accumulators stay in registers).
static inline __attribute__((always_inline)) void dot_key1(int dtype, ptrdiff_t rows, const float *q, ptrdiff_t ldq,
                                                            const char *k_row, ptrdiff_t d, float scale,
                                                            float *scores, ptrdiff_t ld) {
    for (ptrdiff_t r0 = 0; r0 < rows; r0 += AK_STREAM_ROWS) {
        const float *qs = q + r0 * ldq;
        float *out = scores + r0 * ld;
#define AK_DOT1(N) dot_rows_widened(dtype, N, qs, ldq, k_row, d, scale, out, ld)
        switch (rows - r0) {
        case 1: AK_DOT1(1); break;
        case 2: AK_DOT1(2); break;
        case 3: AK_DOT1(3); break;
        case 4: AK_DOT1(4); break;
        case 5: AK_DOT1(5); break;
        case 6: AK_DOT1(6); break;
        case 7: AK_DOT1(7); break;
        default: AK_DOT1(8); break;
        }
#undef AK_DOT1
    }
}

/// Prefetches key rows j + AK_PREFETCH_ROWS to j + AK_PREFETCH_ROWS + count - 1 that are below
/// width, into L1 or (`to_l1` false) into L2.
static inline __attribute__((always_inline)) void prefetch_rows_ahead(const char *base, ptrdiff_t row_bytes,
                                                                      const void *const *rows, ptrdiff_t offset,
                                                                      ptrdiff_t j, int count, ptrdiff_t width,
                                                                      ptrdiff_t used_bytes, int to_l1) {
    for (ptrdiff_t a = j + AK_PREFETCH_ROWS; a < j + AK_PREFETCH_ROWS + count && a < width; a++) {
        const char *row = row_at(base, row_bytes, rows, offset, a);
        if (to_l1)
            prefetch_row(row, used_bytes);
        else
            prefetch_row_l2(row, used_bytes);
    }
}

/// out[r] += sum over t < 4 of w[r][t] * v_t for n <= 4 rows (a constant after inlining), the 4n
/// weights broadcast once into registers, each V chunk (rows j to j + 3, addressed as by
/// `row_at`) widened once.
static inline __attribute__((always_inline)) void accumulate4_rows(int dtype, const int n, const float *w,
                                                                    ptrdiff_t ld, const char *base,
                                                                    ptrdiff_t row_bytes, const void *const *rows,
                                                                    ptrdiff_t offset, ptrdiff_t j, ptrdiff_t dv,
                                                                    float *out, ptrdiff_t ldo) {
    const ptrdiff_t vector_end = dv & ~(ptrdiff_t)15;
    v16f weight[4][4];
    for (int r = 0; r < n; r++)
        for (int t = 0; t < 4; t++) weight[r][t] = splat(w[r * ld + t]);
    ptrdiff_t c = 0;
    for (; c < vector_end; c += 16) {
        v16f x[4];
        for (int t = 0; t < 4; t++) x[t] = load16_as(dtype, row_at(base, row_bytes, rows, offset, j + t), c);
        for (int r = 0; r < n; r++) {
            v16f acc = load16(out + r * ldo + c);
            for (int t = 0; t < 4; t++) acc = AK_FMA(weight[r][t], x[t], acc);
            store16(out + r * ldo + c, acc);
        }
    }
    for (; c < dv; c++) {
        for (int r = 0; r < n; r++) {
            float sum = out[r * ldo + c];
            for (int t = 0; t < 4; t++)
                sum += w[r * ld + t] * load1_as(dtype, row_at(base, row_bytes, rows, offset, j + t), c);
            out[r * ldo + c] = sum;
        }
    }
}

/// out[r] += sum over t < 4 of p[r][j + t] * v_{j+t} for every row: V rows j to j + 3 (addressed as
/// by `row_at`), each V chunk loaded (and widened) once per pass; every output vector is loaded and
/// stored once per four V rows.
static inline __attribute__((always_inline)) void accumulate_keys4(int dtype, ptrdiff_t rows, const float *p,
                                                                    ptrdiff_t ld, const char *base,
                                                                    ptrdiff_t row_bytes, const void *const *v_rows,
                                                                    ptrdiff_t v_offset, ptrdiff_t j, ptrdiff_t dv,
                                                                    float *out, ptrdiff_t ldo) {
    const ptrdiff_t vector_end = dv & ~(ptrdiff_t)15;
    const char *const v4[4] = {row_at(base, row_bytes, v_rows, v_offset, j),
                               row_at(base, row_bytes, v_rows, v_offset, j + 1),
                               row_at(base, row_bytes, v_rows, v_offset, j + 2),
                               row_at(base, row_bytes, v_rows, v_offset, j + 3)};
    if (dtype == AK_DTYPE_F32) {
        // fp32: row by row with the four weights broadcast once (V chunks come from L1).
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float *w = p + r * ld + j;
            const v16f p0 = splat(w[0]), p1 = splat(w[1]), p2 = splat(w[2]), p3 = splat(w[3]);
            float *o = out + r * ldo;
            ptrdiff_t c = 0;
            for (; c < vector_end; c += 16) {
                v16f acc = load16(o + c);
                acc = AK_FMA(p0, load16_as(dtype, v4[0], c), acc);
                acc = AK_FMA(p1, load16_as(dtype, v4[1], c), acc);
                acc = AK_FMA(p2, load16_as(dtype, v4[2], c), acc);
                acc = AK_FMA(p3, load16_as(dtype, v4[3], c), acc);
                store16(o + c, acc);
            }
            for (; c < dv; c++) {
                o[c] += w[0] * load1_as(dtype, v4[0], c) + w[1] * load1_as(dtype, v4[1], c) +
                        w[2] * load1_as(dtype, v4[2], c) + w[3] * load1_as(dtype, v4[3], c);
            }
        }
        return;
    }
    // fp16/bf16: each V chunk widened once per pass of up to four rows, which keep their sixteen
    // weights in registers across the chunks (a second pass reads the four V rows from L1).
    if (rows >= 1 && rows <= 8) {
        for (ptrdiff_t h = 0; h < rows; h += 4) {
            const float *w = p + h * ld + j;
            float *o = out + h * ldo;
#define AK_ACC4(N) accumulate4_rows(dtype, N, w, ld, base, row_bytes, v_rows, v_offset, j, dv, o, ldo)
            switch (rows - h) {
            case 1: AK_ACC4(1); break;
            case 2: AK_ACC4(2); break;
            case 3: AK_ACC4(3); break;
            default: AK_ACC4(4); break;
            }
#undef AK_ACC4
        }
        return;
    }
    ptrdiff_t c = 0;
    for (; c < vector_end; c += 16) {
        const v16f x0 = load16_as(dtype, v4[0], c), x1 = load16_as(dtype, v4[1], c), x2 = load16_as(dtype, v4[2], c),
                   x3 = load16_as(dtype, v4[3], c);
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float *w = p + r * ld + j;
            float *o = out + r * ldo + c;
            v16f acc = load16(o);
            acc = AK_FMA(splat(w[0]), x0, acc);
            acc = AK_FMA(splat(w[1]), x1, acc);
            acc = AK_FMA(splat(w[2]), x2, acc);
            acc = AK_FMA(splat(w[3]), x3, acc);
            store16(o, acc);
        }
    }
    for (; c < dv; c++) {
        const float x0 = load1_as(dtype, v4[0], c), x1 = load1_as(dtype, v4[1], c), x2 = load1_as(dtype, v4[2], c),
                    x3 = load1_as(dtype, v4[3], c);
        for (ptrdiff_t r = 0; r < rows; r++) {
            const float *w = p + r * ld + j;
            out[r * ldo + c] += w[0] * x0 + w[1] * x1 + w[2] * x2 + w[3] * x3;
        }
    }
}

/// out[r] += p[r][j] * v_row for every row (one V row, widened once per chunk).
static inline __attribute__((always_inline)) void accumulate_key1(int dtype, ptrdiff_t rows, const float *p,
                                                                   ptrdiff_t ld, const char *v_row, ptrdiff_t j,
                                                                   ptrdiff_t dv, float *out, ptrdiff_t ldo) {
    const ptrdiff_t vector_end = dv & ~(ptrdiff_t)15;
    ptrdiff_t c = 0;
    for (; c < vector_end; c += 16) {
        const v16f x = load16_as(dtype, v_row, c);
        for (ptrdiff_t r = 0; r < rows; r++) {
            float *o = out + r * ldo + c;
            store16(o, AK_FMA(splat(p[r * ld + j]), x, load16(o)));
        }
    }
    for (; c < dv; c++) {
        const float x = load1_as(dtype, v_row, c);
        for (ptrdiff_t r = 0; r < rows; r++) out[r * ldo + c] += p[r * ld + j] * x;
    }
}

/// Where head group g's rows are, its rows being group_bytes after group 0's: strided rows move the
/// base, a row table moves the offset added to each of its entries (`row_at`).
typedef struct {
    const char *base;
    ptrdiff_t offset;
} ak_group_rows;

static inline __attribute__((always_inline)) ak_group_rows group_rows(const void *base, const void *const *table,
                                                                      ptrdiff_t g, ptrdiff_t group_bytes) {
    const ak_group_rows rows = {(const char *)base + (table ? 0 : g * group_bytes), table ? g * group_bytes : 0};
    return rows;
}

/// Whether the group kernels prefetch into L1: one step of four keys over every group needs at most
/// AK_L1_PREFETCH_LINES lines.
static inline __attribute__((always_inline)) int prefetch_to_l1(ptrdiff_t groups, ptrdiff_t used_bytes) {
    return groups * 4 * ((used_bytes + 63) / 64) <= AK_L1_PREFETCH_LINES;
}

/// The scores of `groups` head groups (`dot_scores_groups`; one group: `dot_scores`). Each K element
/// is loaded (and widened) once per four query rows and used by all of them: four keys at a time,
/// their sums reduced together, the last keys one at a time; keys outermost, and for each four keys
/// every group's rows in turn. Where the groups' rows of one key lie side by side ([B, N, H, D]
/// caches, pages) memory is then read in address order; walking one group's rows over a whole block
/// and then the next group's (rows H·D elements apart) streamed at 13-19 GB/s against 33 GB/s in
/// address order on the 2-core Zen 5 machine.
static inline __attribute__((always_inline)) void dot_groups_body(
    int dtype, ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *q, ptrdiff_t ldq, ptrdiff_t q_group,
    const void *k, ptrdiff_t ldk, const void *const *k_rows, ptrdiff_t k_group_bytes, ptrdiff_t d, float scale,
    float *scores, ptrdiff_t ld, ptrdiff_t s_group) {
    const ptrdiff_t row_bytes = ldk * dtype_size(dtype), used_bytes = d * dtype_size(dtype);
    const int to_l1 = prefetch_to_l1(groups, used_bytes);
    ptrdiff_t j = 0;
    for (; j + 4 <= width; j += 4) {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const ak_group_rows kg = group_rows(k, k_rows, g, k_group_bytes);
            prefetch_rows_ahead(kg.base, row_bytes, k_rows, kg.offset, j, 4, width, used_bytes, to_l1);
            dot_keys4(dtype, rows, q + g * q_group, ldq, kg.base, row_bytes, k_rows, kg.offset, j, d, scale,
                      scores + g * s_group, ld);
        }
    }
    for (; j < width; j++) {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const ak_group_rows kg = group_rows(k, k_rows, g, k_group_bytes);
            dot_key1(dtype, rows, q + g * q_group, ldq, row_at(kg.base, row_bytes, k_rows, kg.offset, j), d, scale,
                     scores + g * s_group + j, ld);
        }
    }
}

/// P·V for `groups` head groups (`accumulate_groups`; one group: `accumulate`), four keys at a time
/// and keys outermost, as `dot_groups_body`.
static inline __attribute__((always_inline)) void accumulate_groups_body(
    int dtype, ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld, ptrdiff_t p_group,
    const void *v, ptrdiff_t ldv, const void *const *v_rows, ptrdiff_t v_group_bytes, ptrdiff_t dv, float *out,
    ptrdiff_t ldo, ptrdiff_t o_group) {
    const ptrdiff_t row_bytes = ldv * dtype_size(dtype), used_bytes = dv * dtype_size(dtype);
    const int to_l1 = prefetch_to_l1(groups, used_bytes);
    ptrdiff_t j = 0;
    for (; j + 4 <= width; j += 4) {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const ak_group_rows vg = group_rows(v, v_rows, g, v_group_bytes);
            prefetch_rows_ahead(vg.base, row_bytes, v_rows, vg.offset, j, 4, width, used_bytes, to_l1);
            accumulate_keys4(dtype, rows, p + g * p_group, ld, vg.base, row_bytes, v_rows, vg.offset, j, dv,
                             out + g * o_group, ldo);
        }
    }
    for (; j < width; j++) {
        for (ptrdiff_t g = 0; g < groups; g++) {
            const ak_group_rows vg = group_rows(v, v_rows, g, v_group_bytes);
            accumulate_key1(dtype, rows, p + g * p_group, ld, row_at(vg.base, row_bytes, v_rows, vg.offset, j), j,
                            dv, out + g * o_group, ldo);
        }
    }
}

// The group kernels below call the bodies with a literal NULL row table when there is none, so
// that the strided instantiation computes row addresses without the table test (row_at folds).
// One group (a key-range pass over a [B, H, N, D] head, MQA) gets its own instantiation with the
// group loop folded away: through the general one it ran about 10% slower (MQA fp16 decode
// 1.9-2.5 against 1.7-2.3 ms, alternated).
#define AK_DOT_BODY(DT, ROWS)                                                                                          \
    do {                                                                                                               \
        if (groups == 1)                                                                                               \
            dot_groups_body(DT, 1, rows, width, q, ldq, 0, k, ldk, ROWS, 0, d, scale, scores, ld, 0);                  \
        else                                                                                                           \
            dot_groups_body(DT, groups, rows, width, q, ldq, q_group, k, ldk, ROWS, k_bytes, d, scale, scores, ld,     \
                            s_group);                                                                                  \
    } while (0)
#define AK_ACC_BODY(DT, ROWS)                                                                                          \
    do {                                                                                                               \
        if (groups == 1)                                                                                               \
            accumulate_groups_body(DT, 1, rows, width, p, ld, 0, v, ldv, ROWS, 0, dv, out, ldo, 0);                    \
        else                                                                                                           \
            accumulate_groups_body(DT, groups, rows, width, p, ld, p_group, v, ldv, ROWS, v_bytes, dv, out, ldo,       \
                                   o_group);                                                                           \
    } while (0)
// BODY(storage type, row table) with both as constants: one instantiation per type and per
// table / no table.
#define AK_DISPATCH(DTYPE, TABLE, BODY)                                                                                \
    switch (DTYPE) {                                                                                                   \
    case AK_DTYPE_F16:                                                                                                 \
        if (TABLE) BODY(AK_DTYPE_F16, TABLE); else BODY(AK_DTYPE_F16, NULL);                                           \
        break;                                                                                                         \
    case AK_DTYPE_BF16:                                                                                                \
        if (TABLE) BODY(AK_DTYPE_BF16, TABLE); else BODY(AK_DTYPE_BF16, NULL);                                         \
        break;                                                                                                         \
    default:                                                                                                           \
        if (TABLE) BODY(AK_DTYPE_F32, TABLE); else BODY(AK_DTYPE_F32, NULL);                                           \
        break;                                                                                                         \
    }

static void AK_FN(dot_scores_groups)(ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *q, ptrdiff_t ldq,
                                     ptrdiff_t q_group, int k_dtype, const void *k, ptrdiff_t ldk,
                                     const void *const *k_rows, ptrdiff_t k_group, ptrdiff_t d, float scale,
                                     float *scores, ptrdiff_t ld, ptrdiff_t s_group) {
    const ptrdiff_t k_bytes = k_group * dtype_size(k_dtype);
    AK_DISPATCH(k_dtype, k_rows, AK_DOT_BODY)
}

static void AK_FN(accumulate_groups)(ptrdiff_t groups, ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld,
                                     ptrdiff_t p_group, int v_dtype, const void *v, ptrdiff_t ldv,
                                     const void *const *v_rows, ptrdiff_t v_group, ptrdiff_t dv, float *out,
                                     ptrdiff_t ldo, ptrdiff_t o_group) {
    const ptrdiff_t v_bytes = v_group * dtype_size(v_dtype);
    AK_DISPATCH(v_dtype, v_rows, AK_ACC_BODY)
}

#undef AK_DOT_BODY
#undef AK_ACC_BODY
#undef AK_DISPATCH

static void AK_FN(dot_scores)(ptrdiff_t rows, ptrdiff_t width, const float *q, ptrdiff_t ldq, int k_dtype,
                              const void *k, ptrdiff_t ldk, ptrdiff_t d, float scale, float *scores, ptrdiff_t ld) {
    switch (k_dtype) {
    case AK_DTYPE_F16:
        dot_groups_body(AK_DTYPE_F16, 1, rows, width, q, ldq, 0, k, ldk, NULL, 0, d, scale, scores, ld, 0);
        break;
    case AK_DTYPE_BF16:
        dot_groups_body(AK_DTYPE_BF16, 1, rows, width, q, ldq, 0, k, ldk, NULL, 0, d, scale, scores, ld, 0);
        break;
    default:
        dot_groups_body(AK_DTYPE_F32, 1, rows, width, q, ldq, 0, k, ldk, NULL, 0, d, scale, scores, ld, 0);
        break;
    }
}

static void AK_FN(accumulate)(ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld, int v_dtype,
                              const void *v, ptrdiff_t ldv, ptrdiff_t dv, float *out, ptrdiff_t ldo) {
    switch (v_dtype) {
    case AK_DTYPE_F16:
        accumulate_groups_body(AK_DTYPE_F16, 1, rows, width, p, ld, 0, v, ldv, NULL, 0, dv, out, ldo, 0);
        break;
    case AK_DTYPE_BF16:
        accumulate_groups_body(AK_DTYPE_BF16, 1, rows, width, p, ld, 0, v, ldv, NULL, 0, dv, out, ldo, 0);
        break;
    default:
        accumulate_groups_body(AK_DTYPE_F32, 1, rows, width, p, ld, 0, v, ldv, NULL, 0, dv, out, ldo, 0);
        break;
    }
}

static void AK_FN(finish)(ptrdiff_t rows, float *out, ptrdiff_t ldo, ptrdiff_t dv, const float *row_max,
                          const float *row_sum, float *lse) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float m = row_max[r], l = row_sum[r];
        float *o = out + r * ldo;
        if (m == -INFINITY && !isnan(l)) {
            // No visible key: exactly zero output and -inf log-sum-exp.
            memset(o, 0, (size_t)dv * sizeof(float));
            if (lse) lse[r] = -INFINITY;
        } else if (m == -INFINITY) {
            for (ptrdiff_t c = 0; c < dv; c++) o[c] = NAN;
            if (lse) lse[r] = NAN;
        } else {
            scale_row(o, dv, 1.0f / l);
            if (lse) lse[r] = m + logf(l);
        }
    }
}

static float AK_FN(read_sum)(const float *data, ptrdiff_t count) {
    v16f a = splat(0.0f), b = a, c = a, d = a;
    for (ptrdiff_t i = 0; i + 64 <= count; i += 64) {
        a += load16(data + i);
        b += load16(data + i + 16);
        c += load16(data + i + 32);
        d += load16(data + i + 48);
    }
    return hsum16(a + b + c + d);
}

static inline __attribute__((always_inline)) void map16(v16f (*f)(v16f), const float *x, float *y, ptrdiff_t count) {
    ptrdiff_t i = 0;
    for (; i + 16 <= count; i += 16) store16(y + i, f(load16(x + i)));
    if (i < count) {
        float tail[16] = {0};
        memcpy(tail, x + i, (size_t)(count - i) * sizeof(float));
        store16(tail, f(load16(tail)));
        memcpy(y + i, tail, (size_t)(count - i) * sizeof(float));
    }
}

static void AK_FN(load_rows)(int dtype, const void *src, ptrdiff_t ld_src, ptrdiff_t rows, ptrdiff_t cols,
                             float *dst, ptrdiff_t ld_dst) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        float *out = dst + r * ld_dst;
        switch (dtype) {
        case AK_DTYPE_F16: load_row_f16((const uint16_t *)src + r * ld_src, out, cols); break;
        case AK_DTYPE_BF16: load_row_bf16((const uint16_t *)src + r * ld_src, out, cols); break;
        default: memcpy(out, (const float *)src + r * ld_src, (size_t)cols * sizeof(float)); break;
        }
    }
}

static void AK_FN(store_rows)(int dtype, const float *src, ptrdiff_t ld_src, ptrdiff_t rows, ptrdiff_t cols,
                              void *dst, ptrdiff_t ld_dst) {
    for (ptrdiff_t r = 0; r < rows; r++) {
        const float *in = src + r * ld_src;
        switch (dtype) {
        case AK_DTYPE_F16: store_row_f16(in, (uint16_t *)dst + r * ld_dst, cols); break;
        case AK_DTYPE_BF16: store_row_bf16(in, (uint16_t *)dst + r * ld_dst, cols); break;
        default: memcpy((float *)dst + r * ld_dst, in, (size_t)cols * sizeof(float)); break;
        }
    }
}

// MARK: Register-tiled products (prefill)
//
// S = scale * Q K^T and O += P V for blocks of many query rows, instead of two SGEMM calls: K is
// transposed once per key block (`pack_keys`, widened from fp16/bf16 on the way) so that a step of
// the score micro-tile is one contiguous load of keys per 16 columns and one broadcast per query
// row; V rows are read as they are. Micro-tiles keep every accumulator in a register: 8 rows x 32
// keys (scores) and 6 rows x 64 values (P V) with AVX-512's 32 zmm registers, 6 x 16 and 6 x 16
// with AVX2's 16 ymm registers, 4 x 16 elsewhere.

#if AK_TILE_CLASS == 2
#define AK_QK_ROWS 8
#define AK_QK_VECS 2
#define AK_PV_ROWS 6
#define AK_PV_VECS 4
#elif AK_TILE_CLASS == 1
#define AK_QK_ROWS 6
#define AK_QK_VECS 1
#define AK_PV_ROWS 6
#define AK_PV_VECS 1
#else
#define AK_QK_ROWS 4
#define AK_QK_VECS 1
#define AK_PV_ROWS 4
#define AK_PV_VECS 1
#endif

/// scores[r][j0 + 16v + t] for r < mr, v < nv (mr, nv constants after inlining). Element c of
/// query row r is at q[c * ldc + r * ldr]: packed rows (ldc = AK_QK_ROWS, ldr = 1) put the mr
/// broadcasts of one step at fixed offsets from one pointer; plain rows have ldc = 1, ldr = d.
static inline __attribute__((always_inline)) void qk_micro(const int mr, const int nv, ptrdiff_t d, const float *q,
                                                            const ptrdiff_t ldc, const ptrdiff_t ldr,
                                                            const float *kt, ptrdiff_t ldk, float scale, float *s,
                                                            ptrdiff_t ld) {
    v16f acc[AK_QK_ROWS][AK_QK_VECS];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) acc[r][v] = splat(0.0f);
    for (ptrdiff_t c = 0; c < d; c++) {
        const float *k_row = kt + c * ldk;
        v16f kv[AK_QK_VECS];
        for (int v = 0; v < nv; v++) kv[v] = load16(k_row + 16 * v);
        for (int r = 0; r < mr; r++) {
            const v16f qb = splat(q[c * ldc + r * ldr]);
            for (int v = 0; v < nv; v++) acc[r][v] = AK_FMA(qb, kv[v], acc[r][v]);
        }
    }
    const v16f factor = splat(scale);
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < nv; v++) store16(s + r * ld + 16 * v, acc[r][v] * factor);
}

/// Rows [0, rows) of the score tile for keys [j0, j0 + 16 nv) (nv a constant after inlining), from
/// queries packed by `pack_queries`.
static inline __attribute__((always_inline)) void qk_columns(const int nv, ptrdiff_t rows, ptrdiff_t d,
                                                              const float *qp, const float *kt, ptrdiff_t ldk,
                                                              float scale, float *s, ptrdiff_t ld) {
    ptrdiff_t r = 0;
    for (; r + AK_QK_ROWS <= rows; r += AK_QK_ROWS)
        qk_micro(AK_QK_ROWS, nv, d, qp + r * d, AK_QK_ROWS, 1, kt, ldk, scale, s + r * ld, ld);
    for (; r < rows; r++) qk_micro(1, nv, d, qp + r * d, 1, d, kt, ldk, scale, s + r * ld, ld);
}

static void AK_FN(pack_queries)(ptrdiff_t rows, ptrdiff_t d, const float *q, ptrdiff_t ldq, float *dst) {
    ptrdiff_t r = 0;
    for (; r + AK_QK_ROWS <= rows; r += AK_QK_ROWS, dst += AK_QK_ROWS * d) {
        for (ptrdiff_t c = 0; c < d; c++)
            for (int i = 0; i < AK_QK_ROWS; i++) dst[c * AK_QK_ROWS + i] = q[(r + i) * ldq + c];
    }
    for (; r < rows; r++, dst += d) memcpy(dst, q + r * ldq, (size_t)d * sizeof(float));
}

static void AK_FN(qk_tile)(ptrdiff_t rows, ptrdiff_t width, ptrdiff_t d, const float *qp, const float *kt,
                           ptrdiff_t ldk, float scale, float *scores, ptrdiff_t ld) {
    const ptrdiff_t cols = round16(width);
    ptrdiff_t j = 0;
    // Key-column outer loop: one micro-tile's d x 16nv slice of K^T stays in L1 across all rows.
    for (; j + 16 * AK_QK_VECS <= cols; j += 16 * AK_QK_VECS)
        qk_columns(AK_QK_VECS, rows, d, qp, kt + j, ldk, scale, scores + j, ld);
    for (; j < cols; j += 16) qk_columns(1, rows, d, qp, kt + j, ldk, scale, scores + j, ld);
}

// A 16 x 16 transpose in registers: four butterfly stages, each swapping the off-diagonal b x b
// blocks of every 2b x 2b block (b = 8, 4, 2, 1), two shuffles per pair of rows.
#ifndef AK_T8_LO
#define AK_T8_LO(a, c) __builtin_shufflevector(a, c, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
#define AK_T8_HI(a, c) __builtin_shufflevector(a, c, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)
#define AK_T4_LO(a, c) __builtin_shufflevector(a, c, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
#define AK_T4_HI(a, c) __builtin_shufflevector(a, c, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31)
#define AK_T2_LO(a, c) __builtin_shufflevector(a, c, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
#define AK_T2_HI(a, c) __builtin_shufflevector(a, c, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31)
#define AK_T1_LO(a, c) __builtin_shufflevector(a, c, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#define AK_T1_HI(a, c) __builtin_shufflevector(a, c, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31)
#endif

static inline __attribute__((always_inline)) void transpose16(v16f m[16]) {
    // Every pair written out (constant indices only): a loop here was left rolled by the compiler,
    // which then kept the 16 vectors on the stack (perf: pack_keys at 13% of the score product's time
    // on prefill-512).
#define AK_SWAP(b, i, j)                                                                                               \
    do {                                                                                                               \
        const v16f a_ = m[i], c_ = m[j];                                                                               \
        m[i] = AK_T##b##_LO(a_, c_);                                                                                   \
        m[j] = AK_T##b##_HI(a_, c_);                                                                                   \
    } while (0)
#define AK_STAGE(b, i0, i1, i2, i3, i4, i5, i6, i7)                                                                    \
    AK_SWAP(b, i0, i0 + b);                                                                                            \
    AK_SWAP(b, i1, i1 + b);                                                                                            \
    AK_SWAP(b, i2, i2 + b);                                                                                            \
    AK_SWAP(b, i3, i3 + b);                                                                                            \
    AK_SWAP(b, i4, i4 + b);                                                                                            \
    AK_SWAP(b, i5, i5 + b);                                                                                            \
    AK_SWAP(b, i6, i6 + b);                                                                                            \
    AK_SWAP(b, i7, i7 + b)
    AK_STAGE(8, 0, 1, 2, 3, 4, 5, 6, 7);
    AK_STAGE(4, 0, 1, 2, 3, 8, 9, 10, 11);
    AK_STAGE(2, 0, 1, 4, 5, 8, 9, 12, 13);
    AK_STAGE(1, 0, 2, 4, 6, 8, 10, 12, 14);
#undef AK_STAGE
#undef AK_SWAP
}

/// 16 keys x 16 head-dimension elements, transposed into dst (rows `ld_dst` apart); keys past
/// `keys` (the block's end) are zero. `keys` is the constant 16 for whole blocks after inlining.
static inline __attribute__((always_inline)) void pack16(int dtype, const char *k, ptrdiff_t row_bytes,
                                                          ptrdiff_t keys, ptrdiff_t c0, float *dst, ptrdiff_t ld_dst) {
    v16f m[16];
#pragma clang loop unroll(full)
    for (int t = 0; t < 16; t++) m[t] = t < keys ? load16_as(dtype, k + t * row_bytes, c0) : splat(0.0f);
    transpose16(m);
#pragma clang loop unroll(full)
    for (int c = 0; c < 16; c++) store16(dst + c * ld_dst, m[c]);
}

/// One 16-key group of pack_keys (dtype, and keys when 16, constants after inlining).
static inline __attribute__((always_inline)) void pack_group(int dtype, const char *rows, ptrdiff_t row_bytes,
                                                              ptrdiff_t keys, ptrdiff_t vector_end, float *dst,
                                                              ptrdiff_t ld_dst) {
    for (ptrdiff_t c0 = 0; c0 < vector_end; c0 += 16) pack16(dtype, rows, row_bytes, keys, c0, dst + c0 * ld_dst, ld_dst);
}

static void AK_FN(pack_keys)(int dtype, const void *k, ptrdiff_t ldk, ptrdiff_t width, ptrdiff_t d, float *dst,
                             ptrdiff_t ld_dst) {
    const ptrdiff_t row_bytes = ldk * dtype_size(dtype);
    const ptrdiff_t vector_end = d & ~(ptrdiff_t)15;
    for (ptrdiff_t j0 = 0; j0 < width; j0 += 16) {
        const char *rows = (const char *)k + j0 * row_bytes;
        const ptrdiff_t keys = width - j0 < 16 ? width - j0 : 16;
        float *out = dst + j0;
        if (keys == 16) {
            switch (dtype) {
            case AK_DTYPE_F16: pack_group(AK_DTYPE_F16, rows, row_bytes, 16, vector_end, out, ld_dst); break;
            case AK_DTYPE_BF16: pack_group(AK_DTYPE_BF16, rows, row_bytes, 16, vector_end, out, ld_dst); break;
            default: pack_group(AK_DTYPE_F32, rows, row_bytes, 16, vector_end, out, ld_dst); break;
            }
        } else {
            switch (dtype) {
            case AK_DTYPE_F16: pack_group(AK_DTYPE_F16, rows, row_bytes, keys, vector_end, out, ld_dst); break;
            case AK_DTYPE_BF16: pack_group(AK_DTYPE_BF16, rows, row_bytes, keys, vector_end, out, ld_dst); break;
            default: pack_group(AK_DTYPE_F32, rows, row_bytes, keys, vector_end, out, ld_dst); break;
            }
        }
        // Head-dimension elements past the last whole vector: one at a time.
        for (ptrdiff_t c = vector_end; c < d; c++) {
            float *tail = dst + c * ld_dst + j0;
            for (ptrdiff_t t = 0; t < 16; t++) tail[t] = t < keys ? load1_as(dtype, rows + t * row_bytes, c) : 0.0f;
        }
    }
}

/// out[r][16v + t] += sum_j p[r][j] v[j][16v + t] for r < mr, v < nv (constants after inlining);
/// V rows stored as `dtype` (a constant after inlining), widened in registers.
static inline __attribute__((always_inline)) void pv_micro(const int dtype, const int mr, const int nv,
                                                            ptrdiff_t width, const float *p, ptrdiff_t ld,
                                                            const char *v, ptrdiff_t row_bytes, float *out,
                                                            ptrdiff_t ldo) {
    v16f acc[AK_PV_ROWS][AK_PV_VECS];
    for (int r = 0; r < mr; r++)
        for (int x = 0; x < nv; x++) acc[r][x] = load16(out + r * ldo + 16 * x);
    for (ptrdiff_t j = 0; j < width; j++) {
        const char *v_row = v + j * row_bytes;
        v16f vv[AK_PV_VECS];
        for (int x = 0; x < nv; x++) vv[x] = load16_as(dtype, v_row, 16 * x);
        for (int r = 0; r < mr; r++) {
            const v16f pb = splat(p[r * ld + j]);
            for (int x = 0; x < nv; x++) acc[r][x] = AK_FMA(pb, vv[x], acc[r][x]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int x = 0; x < nv; x++) store16(out + r * ldo + 16 * x, acc[r][x]);
}

/// Output columns [c0, c0 + 16 nv) for every row (dtype and nv constants after inlining).
static inline __attribute__((always_inline)) void pv_columns(const int dtype, const int nv, ptrdiff_t rows,
                                                              ptrdiff_t width, const float *p, ptrdiff_t ld,
                                                              const char *v, ptrdiff_t row_bytes, float *out,
                                                              ptrdiff_t ldo) {
    ptrdiff_t r = 0;
    for (; r + AK_PV_ROWS <= rows; r += AK_PV_ROWS)
        pv_micro(dtype, AK_PV_ROWS, nv, width, p + r * ld, ld, v, row_bytes, out + r * ldo, ldo);
    for (; r < rows; r++) pv_micro(dtype, 1, nv, width, p + r * ld, ld, v, row_bytes, out + r * ldo, ldo);
}

static inline __attribute__((always_inline)) void pv_tile_body(const int dtype, ptrdiff_t rows, ptrdiff_t width,
                                                                const float *p, ptrdiff_t ld, const void *v,
                                                                ptrdiff_t ldv, ptrdiff_t dv, float *out,
                                                                ptrdiff_t ldo) {
    const ptrdiff_t size = dtype_size(dtype), row_bytes = ldv * size;
    const char *base = (const char *)v;
    ptrdiff_t c = 0;
    for (; c + 16 * AK_PV_VECS <= dv; c += 16 * AK_PV_VECS)
        pv_columns(dtype, AK_PV_VECS, rows, width, p, ld, base + c * size, row_bytes, out + c, ldo);
    switch ((dv - c) / 16) {
#if AK_PV_VECS > 3
    case 3: pv_columns(dtype, 3, rows, width, p, ld, base + c * size, row_bytes, out + c, ldo); break;
#endif
#if AK_PV_VECS > 2
    case 2: pv_columns(dtype, 2, rows, width, p, ld, base + c * size, row_bytes, out + c, ldo); break;
#endif
    default:
        for (; c < dv; c += 16) pv_columns(dtype, 1, rows, width, p, ld, base + c * size, row_bytes, out + c, ldo);
        break;
    }
}

static void AK_FN(pv_tile)(ptrdiff_t rows, ptrdiff_t width, const float *p, ptrdiff_t ld, int v_dtype, const void *v,
                           ptrdiff_t ldv, ptrdiff_t dv, float *out, ptrdiff_t ldo) {
    switch (v_dtype) {
    case AK_DTYPE_F16: pv_tile_body(AK_DTYPE_F16, rows, width, p, ld, v, ldv, dv, out, ldo); break;
    case AK_DTYPE_BF16: pv_tile_body(AK_DTYPE_BF16, rows, width, p, ld, v, ldv, dv, out, ldo); break;
    default: pv_tile_body(AK_DTYPE_F32, rows, width, p, ld, v, ldv, dv, out, ldo); break;
    }
}

static void AK_FN(exp)(const float *x, float *y, ptrdiff_t count) { map16(exp16, x, y, count); }
static void AK_FN(tanh)(const float *x, float *y, ptrdiff_t count) { map16(tanh16, x, y, count); }

const ak_cpu_kernels AK_CAT(ak_kernels, AK_SUFFIX) = {
    .isa = AK_ISA,
    .name = AK_NAME,
    .softcap = AK_FN(softcap),
    .clip_row = AK_FN(clip_row),
    .add_row = AK_FN(add_row),
    .select_row = AK_FN(select_row),
    .softmax_update = AK_FN(softmax_update),
    .dot_scores = AK_FN(dot_scores),
    .accumulate = AK_FN(accumulate),
    .dot_scores_groups = AK_FN(dot_scores_groups),
    .accumulate_groups = AK_FN(accumulate_groups),
    .finish = AK_FN(finish),
    .load_rows = AK_FN(load_rows),
    .store_rows = AK_FN(store_rows),
    .read_sum = AK_FN(read_sum),
    .pack_keys = AK_FN(pack_keys),
    .pack_queries = AK_FN(pack_queries),
    .qk_tile = AK_FN(qk_tile),
    .pv_tile = AK_FN(pv_tile),
    .exp = AK_FN(exp),
    .tanh = AK_FN(tanh),
};
