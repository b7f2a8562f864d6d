// Shared by attention.cl and decode.cl (the host prepends this file).
//
// Compile-time defines (chosen per device by the host):
//   VEC       keys processed per step, the float vector width: 4, 8 or 16
//   ROWS      query rows per work-item
//   KV_SPACE  address space the K/V tiles are read from: __global, or __local when staged
//   KV_TYPE   storage of the K/V rows accumulate_pv and the decode kernel read: 0 fp32, 1 fp16
//             (vload_half, core OpenCL 1.2), 2 bf16 (upper half of an fp32, widened by a shift)
//
// Contract (README "The contract"): Q [B,Hq,Nq,D], K [B,Hkv,Nk,D], V [B,Hkv,Nk,Dv], O [B,Hq,Nq,Dv],
// LSE [B,Hq,Nq]; query i sits at key position i + Nk - Nq (bottom-right causal); window (L, R) with
// -1 = unbounded; masks additive (float) or boolean (uchar, 0 = hidden); empty rows give O = 0, LSE = -inf.

#ifndef VEC
#define VEC 16
#endif
#ifndef ROWS
#define ROWS 4
#endif
#ifndef KV_SPACE
#define KV_SPACE __global
#endif

#ifndef KV_TYPE
#define KV_TYPE 0
#endif

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define floatV CAT(float, VEC)
#define intV CAT(int, VEC)
#define ucharV CAT(uchar, VEC)
#define vloadV CAT(vload, VEC)
#define vstoreV CAT(vstore, VEC)
#define convert_intV CAT(convert_int, VEC)
#define as_floatV CAT(as_float, VEC)
#define as_intV CAT(as_int, VEC)
#define UNROLL _Pragma("unroll")
/* Helpers must inline: the unrolled loops rely on constant indices into private arrays. */
#define INLINE inline __attribute__((always_inline))

// Typed K/V element loads, widened to fp32: KV_LOADV reads VEC consecutive elements at index i,
// KV_LOAD1 one element.
#if KV_TYPE == 1
#define kv_t half
#define KV_LOADV(p, i) CAT(vload_half, VEC)(0, (p) + (i))
#define KV_LOAD1(p, i) vload_half(0, (p) + (i))
#elif KV_TYPE == 2
#define kv_t ushort
#define KV_LOADV(p, i) as_floatV(CAT(convert_uint, VEC)(vloadV(0, (p) + (i))) << 16)
#define KV_LOAD1(p, i) as_float((uint)((p)[i]) << 16)
#else
#define kv_t float
#define KV_LOADV(p, i) vloadV(0, (p) + (i))
#define KV_LOAD1(p, i) ((p)[i])
#endif

#if VEC == 16
#define LANE_IDS ((intV)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15))
#elif VEC == 8
#define LANE_IDS ((intV)(0, 1, 2, 3, 4, 5, 6, 7))
#elif VEC == 4
#define LANE_IDS ((intV)(0, 1, 2, 3))
#else
#error "VEC must be 4, 8 or 16"
#endif

/// Problem parameters shared by every kernel (passed by value).
typedef struct {
    int B, Hq, Hkv, Nq, Nk, D, Dv;
    int NkPad;        // keys in the re-laid K, a multiple of VEC
    float scale;
    float softcap;    // 0: off
    int causal;
    int winLeft, winRight;   // -1: unbounded
    int maskKind;     // 0 none, 1 additive float, 2 boolean
    int maskBatchStride, maskHeadStride;
    int kStrideB, kStrideH, kStrideS;   // K element strides (batch, head, sequence) as the decode kernel reads it
    int vStrideB, vStrideH, vStrideS;   // V likewise
    int qStrideB, qStrideH, qStrideS;   // Q (fp32) as the flash kernel reads it
    int oStrideB, oStrideH, oStrideS;   // O (fp32) as the flash kernel writes it
} Params;

/// Visible key range [lo, hi] of query i under causal and window rules (empty when lo > hi).
INLINE int2 visible_range(const Params p, int i) {
    int pos = i + p.Nk - p.Nq;
    int lo = 0, hi = p.Nk - 1;
    if (p.causal) hi = min(hi, pos);
    if (p.winLeft >= 0) lo = max(lo, pos - p.winLeft);
    if (p.winRight >= 0) hi = min(hi, pos + p.winRight);
    return (int2)(lo, hi);
}

INLINE float hmax(floatV x) {
#if VEC == 16
    float8 a = fmax(x.lo, x.hi);
    float4 b = fmax(a.lo, a.hi);
#elif VEC == 8
    float4 b = fmax(x.lo, x.hi);
#else
    float4 b = x;
#endif
    float2 c = fmax(b.lo, b.hi);
    return fmax(c.x, c.y);
}

INLINE float hsum(floatV x) {
#if VEC == 16
    float8 a = x.lo + x.hi;
    float4 b = a.lo + a.hi;
#elif VEC == 8
    float4 b = x.lo + x.hi;
#else
    float4 b = x;
#endif
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

/// The lane sums of four vectors, (hsum(a), hsum(b), hsum(c), hsum(d)) in the same halving order,
/// with the four interleaved so that the shuffles are shared.
INLINE float4 hsum4(floatV a, floatV b, floatV c, floatV d) {
#if VEC == 16
    const float8 a8 = a.lo + a.hi, b8 = b.lo + b.hi, c8 = c.lo + c.hi, d8 = d.lo + d.hi;
    const float8 ab = (float8)(a8.lo, b8.lo) + (float8)(a8.hi, b8.hi);
    const float8 cd = (float8)(c8.lo, d8.lo) + (float8)(c8.hi, d8.hi);
#elif VEC == 8
    const float8 ab = (float8)(a.lo, b.lo) + (float8)(a.hi, b.hi);
    const float8 cd = (float8)(c.lo, d.lo) + (float8)(c.hi, d.hi);
#else
    const float8 ab = (float8)(a, b), cd = (float8)(c, d);
#endif
    const float8 x = (float8)(ab.s01, ab.s45, cd.s01, cd.s45) + (float8)(ab.s23, ab.s67, cd.s23, cd.s67);
    return x.even + x.odd;
}

/// e^x on VEC lanes for x <= 0 (the softmax's s - max), relative error below 2e-7: Cody-Waite
/// reduction, degree-6 polynomial, 2^k built in the exponent bits in one step (x >= -87.3 gives
/// k >= -126, a normal power of two). Lanes below -87.3 (and -inf) give exactly 0, NaN stays NaN,
/// no libm call (PoCL scalarises the vector `exp`). Positive x is outside its contract.
INLINE floatV vexp(floatV x) {
    const intV tiny = x < (floatV)(-87.3f);
    const floatV t = fma(x, (floatV)(1.44269504f), (floatV)(12582912.0f));
    const floatV k = t - (floatV)(12582912.0f);
    floatV r = fma(k, (floatV)(-0.693359375f), x);
    r = fma(k, (floatV)(2.12194440e-4f), r);
    floatV poly = (floatV)(1.9875691500e-4f);
    poly = fma(poly, r, (floatV)(1.3981999507e-3f));
    poly = fma(poly, r, (floatV)(8.3334519073e-3f));
    poly = fma(poly, r, (floatV)(4.1665795894e-2f));
    poly = fma(poly, r, (floatV)(1.6666665459e-1f));
    poly = fma(poly, r, (floatV)(5.0000001201e-1f));
    poly = fma(poly, r * r, r + (floatV)(1.0f));
    // as_int(t) - 0x4B400000 = k; (k + 127) << 23 = 2^k.
    const floatV twoK = as_floatV((as_intV(t) - (intV)(0x4B400000 - 127)) << 23);
    return select(poly * twoK, (floatV)(0.0f), tiny);
}

/// Turns raw dot products of one row into scores for keys j0 .. j0+VEC-1: scale, softcap,
/// visibility and mask (-inf where hidden). `maskRow` points at the row's mask entries for key 0.
INLINE floatV finish_scores(const Params p, floatV dots, int i, int j0, int needsMasking,
                            __global const float *maskF, __global const uchar *maskB, long maskRow) {
    floatV s = dots * p.scale;
    if (p.softcap > 0.0f) s = p.softcap * tanh(s / p.softcap);
    if (!needsMasking) return s;
    int2 range = visible_range(p, i);
    intV j = (intV)(j0) + LANE_IDS;
    intV visible = (j >= (intV)(range.x)) & (j <= (intV)(range.y)) & (j < (intV)(p.Nk));
    if (p.maskKind != 0) {
        if (j0 + VEC <= p.Nk) {
            if (p.maskKind == 1) {
                s += vloadV(0, maskF + maskRow + j0);
            } else {
                visible &= convert_intV(vloadV(0, maskB + maskRow + j0)) != (intV)(0);
            }
        } else {
            float extra[VEC];
            int allowed[VEC];
            for (int t = 0; t < VEC; t++) {
                int jj = j0 + t;
                extra[t] = (p.maskKind == 1 && jj < p.Nk) ? maskF[maskRow + jj] : 0.0f;
                allowed[t] = (p.maskKind == 2 && jj < p.Nk) ? (maskB[maskRow + jj] != 0) : 1;
            }
            s += vloadV(0, extra);
            visible &= vloadV(0, allowed) != (intV)(0);
        }
    }
    return select((floatV)(-INFINITY), s, visible);
}

/// Online-softmax update of one row with a block of n score vectors (n a constant after inlining),
/// in place: s becomes P = exp(s - m_new), m and l are updated, and `alpha` receives the factor the
/// row's accumulated output must be multiplied by. One maximum, one sum and one rescaling factor
/// for the whole block. NaN scores are not looked for lane by lane: fmax passes over them, so
/// exp(NaN - m_new) = NaN reaches l (and O), and the row ends poisoned through isnan(l) (the callers
/// pass `poisoned || isnan(l)` to finish_row); only a block that leaves the maximum at -inf, where
/// P is all zero, is searched for NaN.
INLINE void softmax_block(floatV *s, const int n, float *m, float *l, float *alpha, int *poisoned) {
    floatV top = s[0];
    UNROLL for (int u = 1; u < n; u++) top = fmax(top, s[u]);
    const float mNew = fmax(*m, hmax(top));
    if (mNew == -INFINITY) {
        intV nan = isnan(s[0]);
        UNROLL for (int u = 1; u < n; u++) nan |= isnan(s[u]);
        if (any(nan)) *poisoned = 1;
        *alpha = 1.0f;
        UNROLL for (int u = 0; u < n; u++) s[u] = (floatV)(0.0f);
        return;
    }
    *alpha = (*m == -INFINITY) ? 0.0f : (*m == mNew ? 1.0f : exp(*m - mNew));
    floatV sum = (floatV)(0.0f);
    UNROLL for (int u = 0; u < n; u++) {
        s[u] = vexp(s[u] - mNew);
        sum += s[u];
    }
    *l = *l * *alpha + hsum(sum);
    *m = mNew;
}

/// out[0..n) *= factor
INLINE void scale_row(__global float *out, int n, float factor) {
    int c = 0;
    for (; c + VEC <= n; c += VEC) vstoreV(vloadV(0, out + c) * factor, 0, out + c);
    for (; c < n; c++) out[c] *= factor;
}

/// One key t of P·V on output columns [c, c + VEC) of ROWS rows: acc[r] += P[r][t] * v[t][c ..].
INLINE void pv_key(floatV *acc, const float *P, const int pStride, KV_SPACE const kv_t *v, long vStride, int t, int c) {
    const floatV vv = KV_LOADV(v, t * vStride + c);
    UNROLL for (int r = 0; r < ROWS; r++) acc[r] = fma((floatV)(P[r * pStride + t]), vv, acc[r]);
}

/// pv_key on two column vectors at once, [c, c + VEC) into acc and [c + VEC, c + 2 VEC) into acc2
/// (each P broadcast used twice).
INLINE void pv_key2(floatV *acc, floatV *acc2, const float *P, const int pStride, KV_SPACE const kv_t *v, long vStride,
                    int t, int c) {
    const floatV vv = KV_LOADV(v, t * vStride + c);
    const floatV vv2 = KV_LOADV(v, t * vStride + c + VEC);
    UNROLL for (int r = 0; r < ROWS; r++) {
        const floatV pb = (floatV)(P[r * pStride + t]);
        acc[r] = fma(pb, vv, acc[r]);
        acc2[r] = fma(pb, vv2, acc2[r]);
    }
}

/// out[r][0..Dv) += sum over t < jn of P[r * pStride + t] * v[t][0..Dv), for rows r < nrows (row
/// stride outStride), with P a private ROWS x pStride array (pStride a multiple of VEC, a constant
/// after inlining) and v rows vStride apart. Full blocks (jn == pStride) are unrolled VEC keys at a
/// time so that P and the accumulators stay in registers. Output columns go two vectors at a time
/// where they can and ROWS <= 8 (2 x ROWS independent FMA chains; more rows would not fit the
/// registers); every element still sums its keys in order t = 0, 1, ..., so the result is the same
/// bits either way.
INLINE void accumulate_pv(__global float *out, int outStride, int nrows, const float *P, const int pStride,
                          KV_SPACE const kv_t *v, long vStride, int jn, int Dv) {
    int c = 0;
#if ROWS <= 8
    for (; c + 2 * VEC <= Dv; c += 2 * VEC) {
        floatV acc[ROWS], acc2[ROWS];
        UNROLL for (int r = 0; r < ROWS; r++) {
            acc[r] = (r < nrows) ? vloadV(0, out + r * outStride + c) : (floatV)(0.0f);
            acc2[r] = (r < nrows) ? vloadV(0, out + r * outStride + c + VEC) : (floatV)(0.0f);
        }
        if (jn == pStride) {
            for (int t0 = 0; t0 < pStride; t0 += VEC)
                UNROLL for (int dt = 0; dt < VEC; dt++) pv_key2(acc, acc2, P, pStride, v, vStride, t0 + dt, c);
        } else {
            for (int t = 0; t < jn; t++) pv_key2(acc, acc2, P, pStride, v, vStride, t, c);
        }
        UNROLL for (int r = 0; r < ROWS; r++) {
            if (r < nrows) {
                vstoreV(acc[r], 0, out + r * outStride + c);
                vstoreV(acc2[r], 0, out + r * outStride + c + VEC);
            }
        }
    }
#endif
    for (; c + VEC <= Dv; c += VEC) {
        floatV acc[ROWS];
        UNROLL for (int r = 0; r < ROWS; r++) acc[r] = (r < nrows) ? vloadV(0, out + r * outStride + c) : (floatV)(0.0f);
        if (jn == pStride) {
            for (int t0 = 0; t0 < pStride; t0 += VEC)
                UNROLL for (int dt = 0; dt < VEC; dt++) pv_key(acc, P, pStride, v, vStride, t0 + dt, c);
        } else {
            for (int t = 0; t < jn; t++) pv_key(acc, P, pStride, v, vStride, t, c);
        }
        UNROLL for (int r = 0; r < ROWS; r++)
            if (r < nrows) vstoreV(acc[r], 0, out + r * outStride + c);
    }
    for (; c < Dv; c++) {
        for (int r = 0; r < nrows; r++) {
            float acc = out[r * outStride + c];
            for (int t = 0; t < jn; t++) acc = fma(P[r * pStride + t], KV_LOAD1(v, t * vStride + c), acc);
            out[r * outStride + c] = acc;
        }
    }
}

/// Final normalisation of one row: O /= l, LSE = m + log l; empty rows O = 0, LSE = -inf;
/// poisoned rows (NaN seen) O = LSE = NaN.
INLINE void finish_row(__global float *out, int Dv, __global float *lse, float m, float l, int poisoned) {
    if (poisoned) {
        for (int c = 0; c < Dv; c++) out[c] = NAN;
        *lse = NAN;
    } else if (m == -INFINITY) {
        for (int c = 0; c < Dv; c++) out[c] = 0.0f;
        *lse = -INFINITY;
    } else {
        scale_row(out, Dv, 1.0f / l);
        *lse = m + log(l);
    }
}
