// Split-KV decode (flash-decoding) for few query rows and long keys (the host prepends common.cl).
//
// Work-item (split, b * Hkv + kvh) takes every query row that reads K/V head kvh: the G = Hq / Hkv
// heads of the group times Nq queries, at most ROWS rows, contiguous in Q and O. It walks keys
// [split * splitLen, (split + 1) * splitLen) in K's natural layout (no transposed copy: decode is
// bound by reading K and V once) and writes a normalised partial O and its log-sum-exp. K and V are
// read in place through their strides and storage type (KV_TYPE: fp32, fp16, bf16), so a strided or
// fp16 cache is never copied; Q is dense fp32 (the host converts it first when it is not).
// decode_merge then combines the splits exactly: O = sum_s e^(lse_s - M) O_s / sum_s e^(lse_s - M).

/// dots[r][t] = q_r . k for every row r (K in natural layout: a dot product over D, reduced).
INLINE void key_dots(__global const kv_t *kRow, __global const float *qRows, const int *qOffset, int D, float *dots, int t) {
    floatV acc[ROWS];
    float tail[ROWS];
    UNROLL for (int r = 0; r < ROWS; r++) {
        acc[r] = (floatV)(0.0f);
        tail[r] = 0.0f;
    }
    int c = 0;
    for (; c + VEC <= D; c += VEC) {
        const floatV kv = KV_LOADV(kRow, c);
        UNROLL for (int r = 0; r < ROWS; r++) acc[r] = fma(vloadV(0, qRows + qOffset[r] + c), kv, acc[r]);
    }
    for (; c < D; c++) {
        const float kc = KV_LOAD1(kRow, c);
        UNROLL for (int r = 0; r < ROWS; r++) tail[r] = fma(qRows[qOffset[r] + c], kc, tail[r]);
    }
    UNROLL for (int r = 0; r < ROWS; r++) dots[r * VEC + t] = hsum(acc[r]) + tail[r];
}

// CPU devices (the host passes CPU_PREFETCH): Clang's prefetch builtin, which PoCL turns into
// prefetch instructions (OpenCL's `prefetch` is a no-op there). The kernel walks K and V as two
// streams per work-item; prefetching them ahead keeps more misses in flight than the hardware
// prefetcher alone. Into L2 (prefetcht1), as the CPU backend does for steps of more than 16 lines:
// L1 prefetches fill its miss buffers (decode-32k fp32 on PoCL, 2-core Zen 5: 13.5-13.8 ms with L1
// prefetches, 10.2 ms with L2 ones; fp16 the same within the noise).
#if CPU_PREFETCH
#define HOST_PREFETCH(p) __builtin_prefetch((const void *)(ulong)(p), 0, 2)
#endif

#if ROWS <= 4
/// key_dots for four keys at once (rows t .. t + 3 of the block, kStride apart): each Q chunk is
/// loaded once for the four keys and the 4 x ROWS sums are reduced four at a time.
INLINE void key_dots4(__global const kv_t *kRow, long kStride, __global const float *qRows, const int *qOffset, int D,
                      float *dots, int t) {
    floatV acc[ROWS][4];
    UNROLL for (int r = 0; r < ROWS; r++) UNROLL for (int u = 0; u < 4; u++) acc[r][u] = (floatV)(0.0f);
    int c = 0;
    for (; c + VEC <= D; c += VEC) {
        floatV kv[4];
        UNROLL for (int u = 0; u < 4; u++) kv[u] = KV_LOADV(kRow + u * kStride, c);
        UNROLL for (int r = 0; r < ROWS; r++) {
            const floatV qv = vloadV(0, qRows + qOffset[r] + c);
            UNROLL for (int u = 0; u < 4; u++) acc[r][u] = fma(qv, kv[u], acc[r][u]);
        }
    }
    UNROLL for (int r = 0; r < ROWS; r++) {
        float4 d4 = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
        for (int e = c; e < D; e++) {
            const float qe = qRows[qOffset[r] + e];
            d4 += qe * (float4)(KV_LOAD1(kRow, e), KV_LOAD1(kRow + kStride, e), KV_LOAD1(kRow + 2 * kStride, e),
                                KV_LOAD1(kRow + 3 * kStride, e));
        }
        vstore4(d4, 0, dots + r * VEC + t);
    }
}
#endif

/// The dot products of a block of jn <= VEC keys (rows kStride apart from kBlock) into dots, zero
/// past jn. On CPU devices, for a full block with `kNext` (the next block's first K row, nNext
/// rows; NULL when there is none), the K rows half a block ahead and this block's V rows (read
/// right after) are prefetched while the dot products run, a few lines per key: a burst of
/// prefetches would stall on full miss buffers.
INLINE void block_dots(__global const kv_t *kBlock, long kStride, __global const kv_t *vBlock, long vStride, int jn,
                       __global const kv_t *kNext, int nNext, __global const float *qRows, const int *qOffset, int D,
                       int Dv, float *dots) {
    if (jn < VEC) {
        for (int t = 0; t < VEC; t++) {
            if (t < jn) {
                key_dots(kBlock + (long)t * kStride, qRows, qOffset, D, dots, t);
            } else {
                UNROLL for (int r = 0; r < ROWS; r++) dots[r * VEC + t] = 0.0f;
            }
        }
        return;
    }
    for (int t = 0; t < VEC; t += 4) {
#ifdef HOST_PREFETCH
        if (kNext) {
            UNROLL for (int u = t; u < t + 4; u++) {
                const int ahead = u + VEC / 2;
                __global const char *kr = (__global const char *)(ahead < VEC ? kBlock + (long)ahead * kStride
                                                                              : kNext + (long)min(ahead - VEC, nNext - 1) * kStride);
                __global const char *vr = (__global const char *)(vBlock + (long)u * vStride);
                for (int e = 0; e < D * (int)sizeof(kv_t); e += 64) HOST_PREFETCH(kr + e);
                for (int e = 0; e < Dv * (int)sizeof(kv_t); e += 64) HOST_PREFETCH(vr + e);
            }
        }
#endif
#if ROWS <= 4
        key_dots4(kBlock + (long)t * kStride, kStride, qRows, qOffset, D, dots, t);
#else
        UNROLL for (int u = t; u < t + 4; u++) key_dots(kBlock + (long)u * kStride, qRows, qOffset, D, dots, u);
#endif
    }
}

// Batches of sequences (SequenceBatch), one launch for all: BATCH_FORM 1 (cache lengths: sequence b
// sees keys [0, lengths[b]) of its cache) or 2 (paged: key j of sequence b is row j % pageSize of page
// blockTable[b * maxPages + j / pageSize]; the K/V batch stride steps pages). Blocks of keys never
// cross a page, so each block's rows stay one stride apart.
#ifndef BATCH_FORM
#define BATCH_FORM 0
#endif
#if BATCH_FORM
#define BATCH_ARGS , __global const int *lengths, __global const int *blockTable, int pageSize, int maxPages
#else
#define BATCH_ARGS
#endif
#if BATCH_FORM == 2
#define KEY_ROW(j) (k + (long)blockTable[b * maxPages + (j) / pageSize] * p.kStrideB + (long)kvh * p.kStrideH + \
                    (long)((j) % pageSize) * p.kStrideS)
#define VALUE_ROW(j) (v + (long)blockTable[b * maxPages + (j) / pageSize] * p.vStrideB + (long)kvh * p.vStrideH + \
                      (long)((j) % pageSize) * p.vStrideS)
#define BLOCK_KEYS(j0, jEnd) min(min(VEC, (jEnd) - (j0)), pageSize - (j0) % pageSize)
#else
#define KEY_ROW(j) (kHead + (long)(j) * p.kStrideS)
#define VALUE_ROW(j) (vHead + (long)(j) * p.vStrideS)
#define BLOCK_KEYS(j0, jEnd) min(VEC, (jEnd) - (j0))
#endif

/// Global size (numSplits, B * Hkv). oPart: [numSplits, B*Hq*Nq, Dv], lsePart: [numSplits, B*Hq*Nq].
__kernel void decode_partial(__global const float *q, __global const kv_t *k, __global const kv_t *v,
                             __global const float *maskF, __global const uchar *maskB,
                             __global float *oPart, __global float *lsePart, const Params params,
                             int splitLen, int numSplits BATCH_ARGS) {
    const int split = get_global_id(0);
    const int bk = get_global_id(1);
    if (split >= numSplits || bk >= params.B * params.Hkv) return;
    const int b = bk / params.Hkv, kvh = bk % params.Hkv;
    Params p = params;
#if BATCH_FORM
    p.Nk = lengths[b];  // each sequence is its own problem over its own keys
#endif
    const int G = p.Hq / p.Hkv;
    const int rows = min(G * p.Nq, ROWS);
    const long totalRows = (long)p.B * p.Hq * p.Nq;
    const long rowBase = ((long)b * p.Hq + (long)kvh * G) * p.Nq;
    __global const float *qRows = q + rowBase * p.D;
    __global float *oRows = oPart + ((long)split * totalRows + rowBase) * p.Dv;
    __global float *lseRows = lsePart + (long)split * totalRows + rowBase;
    __global const kv_t *kHead = k + (long)b * p.kStrideB + (long)kvh * p.kStrideH;
    __global const kv_t *vHead = v + (long)b * p.vStrideB + (long)kvh * p.vStrideH;

    // Rows hold queries 0 .. Nq-1 of each head: the union range is [lo(0), hi(Nq-1)].
    const int2 first = visible_range(p, 0), last = visible_range(p, p.Nq - 1);
    const int jBegin = max(split * splitLen, first.x);
    const int jEnd = min(min(p.Nk, (split + 1) * splitLen), last.y + 1);
    const int fullLo = last.x, fullHi = first.y;

    long maskRows[ROWS];
    int qOffset[ROWS];
    float m[ROWS], l[ROWS];
    int poisoned[ROWS];
    float P[ROWS * VEC];
    float dots[ROWS * VEC];
    UNROLL for (int r = 0; r < ROWS; r++) {
        const int rr = min(r, rows - 1);
        maskRows[r] = (long)b * p.maskBatchStride + (long)(kvh * G + rr / p.Nq) * p.maskHeadStride + (long)(rr % p.Nq) * p.Nk;
        qOffset[r] = rr * p.D;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        poisoned[r] = 0;
    }
    for (int t = 0; t < ROWS * VEC; t++) P[t] = 0.0f;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < p.Dv; c++) oRows[r * p.Dv + c] = 0.0f;

    for (int j0 = jBegin, jn = 0; j0 < jEnd; j0 += jn) {
        jn = BLOCK_KEYS(j0, jEnd);
        // The block's first K and V rows (one table lookup per block: it never crosses a page).
        __global const kv_t *kBlock = KEY_ROW(j0);
        __global const kv_t *vBlock = VALUE_ROW(j0);
        const int more = jn == VEC && j0 + VEC < jEnd;
        block_dots(kBlock, p.kStrideS, vBlock, p.vStrideS, jn, more ? KEY_ROW(j0 + VEC) : 0,
                   more ? BLOCK_KEYS(j0 + VEC, jEnd) : 0, qRows, qOffset, p.D, p.Dv, dots);
        const int needsMasking = p.maskKind != 0 || j0 < fullLo || j0 + VEC - 1 > fullHi || j0 + VEC > p.Nk;
        const intV inSplit = LANE_IDS < (intV)(jn);
        for (int r = 0; r < rows; r++) {
            floatV s = finish_scores(p, vloadV(0, dots + r * VEC), r % p.Nq, j0, needsMasking, maskF, maskB, maskRows[r]);
            s = select((floatV)(-INFINITY), s, inSplit);
            float alpha;
            softmax_block(&s, 1, &m[r], &l[r], &alpha, &poisoned[r]);
            if (alpha != 1.0f) scale_row(oRows + r * p.Dv, p.Dv, alpha);
            vstoreV(s, 0, P + r * VEC);
        }
        accumulate_pv(oRows, p.Dv, rows, P, VEC, vBlock, p.vStrideS, jn, p.Dv);
    }
    for (int r = 0; r < rows; r++)
        finish_row(oRows + r * p.Dv, p.Dv, lseRows + r, m[r], l[r], poisoned[r] || isnan(l[r]));
}

/// Global size (totalRows). Combines numSplits partial results per row through their LSEs.
__kernel void decode_merge(__global const float *oPart, __global const float *lsePart,
                           __global float *o, __global float *lse, int totalRows, int Dv, int numSplits) {
    const long row = get_global_id(0);
    if (row >= totalRows) return;
    float M = -INFINITY;
    int poisoned = 0;
    for (int s = 0; s < numSplits; s++) {
        const float x = lsePart[(long)s * totalRows + row];
        if (isnan(x)) poisoned = 1;
        M = fmax(M, x);
    }
    __global float *out = o + row * Dv;
    if (poisoned || M == -INFINITY) {
        for (int c = 0; c < Dv; c++) out[c] = poisoned ? NAN : 0.0f;
        lse[row] = poisoned ? NAN : -INFINITY;
        return;
    }
    float L = 0.0f;
    for (int s = 0; s < numSplits; s++) L += exp(lsePart[(long)s * totalRows + row] - M);
    const float inverse = 1.0f / L;
    for (int c = 0; c < Dv; c++) {
        float acc = 0.0f;
        for (int s = 0; s < numSplits; s++) {
            const float w = exp(lsePart[(long)s * totalRows + row] - M);
            if (w != 0.0f) acc = fma(w, oPart[((long)s * totalRows + row) * Dv + c], acc);
        }
        out[c] = acc * inverse;
    }
    lse[row] = M + log(L);
}

/// Split-KV decode for K/V whose rows of one head are far apart ([B, N, H, D] caches): work-item
/// (split, b) walks its key range VEC keys at a time and, for each step, every K/V head in turn, so
/// that it reads adjacent memory whatever the layout. Each row's running max, sum and NaN flag live in
/// `state` ([B*Hq*Nq, 3] floats, global) between heads; partial O and LSE are written as by
/// decode_partial. Global size (numSplits, B).
__kernel void decode_partial_heads(__global const float *q, __global const kv_t *k, __global const kv_t *v,
                                   __global const float *maskF, __global const uchar *maskB,
                                   __global float *oPart, __global float *lsePart, __global float *state,
                                   const Params params, int splitLen, int numSplits BATCH_ARGS) {
    const int split = get_global_id(0), b = get_global_id(1);
    if (split >= numSplits || b >= params.B) return;
    Params p = params;
#if BATCH_FORM
    p.Nk = lengths[b];  // each sequence is its own problem over its own keys
#endif
    const int G = p.Hq / p.Hkv;
    const int rows = min(G * p.Nq, ROWS);
    const long totalRows = (long)p.B * p.Hq * p.Nq;
    const int2 first = visible_range(p, 0), last = visible_range(p, p.Nq - 1);
    const int jBegin = max(split * splitLen, first.x);
    const int jEnd = min(min(p.Nk, (split + 1) * splitLen), last.y + 1);
    const int fullLo = last.x, fullHi = first.y;
    for (int kvh = 0; kvh < p.Hkv; kvh++) {
        const long rowBase = ((long)b * p.Hq + (long)kvh * G) * p.Nq;
        __global float *oRows = oPart + ((long)split * totalRows + rowBase) * p.Dv;
        for (int r = 0; r < rows; r++) {
            for (int c = 0; c < p.Dv; c++) oRows[r * p.Dv + c] = 0.0f;
            __global float *s = state + ((long)split * totalRows + rowBase + r) * 3;
            s[0] = -INFINITY;
            s[1] = 0.0f;
            s[2] = 0.0f;
        }
    }
    float P[ROWS * VEC];
    float dots[ROWS * VEC];
    for (int t = 0; t < ROWS * VEC; t++) P[t] = 0.0f;
    for (int j0 = jBegin, jn = 0; j0 < jEnd; j0 += jn) {
        jn = BLOCK_KEYS(j0, jEnd);
        const int needsMasking = p.maskKind != 0 || j0 < fullLo || j0 + VEC - 1 > fullHi || j0 + VEC > p.Nk;
        const intV inSplit = LANE_IDS < (intV)(jn);
        for (int kvh = 0; kvh < p.Hkv; kvh++) {
            const long rowBase = ((long)b * p.Hq + (long)kvh * G) * p.Nq;
            __global const float *qRows = q + rowBase * p.D;
            __global float *oRows = oPart + ((long)split * totalRows + rowBase) * p.Dv;
            __global float *rowState = state + ((long)split * totalRows + rowBase) * 3;
            __global const kv_t *kHead = k + (long)b * p.kStrideB + (long)kvh * p.kStrideH;
            __global const kv_t *vHead = v + (long)b * p.vStrideB + (long)kvh * p.vStrideH;
            // The block's first K and V rows of this head (the block never crosses a page).
            __global const kv_t *kBlock = KEY_ROW(j0);
            __global const kv_t *vBlock = VALUE_ROW(j0);
            long maskRows[ROWS];
            int qOffset[ROWS];
            UNROLL for (int r = 0; r < ROWS; r++) {
                const int rr = min(r, rows - 1);
                maskRows[r] = (long)b * p.maskBatchStride + (long)(kvh * G + rr / p.Nq) * p.maskHeadStride
                    + (long)(rr % p.Nq) * p.Nk;
                qOffset[r] = rr * p.D;
            }
            const int more = jn == VEC && j0 + VEC < jEnd;
            block_dots(kBlock, p.kStrideS, vBlock, p.vStrideS, jn, more ? KEY_ROW(j0 + VEC) : 0,
                       more ? BLOCK_KEYS(j0 + VEC, jEnd) : 0, qRows, qOffset, p.D, p.Dv, dots);
            for (int r = 0; r < rows; r++) {
                floatV s = finish_scores(p, vloadV(0, dots + r * VEC), r % p.Nq, j0, needsMasking, maskF, maskB,
                                         maskRows[r]);
                s = select((floatV)(-INFINITY), s, inSplit);
                float m = rowState[r * 3], l = rowState[r * 3 + 1], alpha;
                int poisoned = rowState[r * 3 + 2] != 0.0f;
                softmax_block(&s, 1, &m, &l, &alpha, &poisoned);
                rowState[r * 3] = m;
                rowState[r * 3 + 1] = l;
                rowState[r * 3 + 2] = poisoned ? 1.0f : 0.0f;
                if (alpha != 1.0f) scale_row(oRows + r * p.Dv, p.Dv, alpha);
                vstoreV(s, 0, P + r * VEC);
            }
            accumulate_pv(oRows, p.Dv, rows, P, VEC, vBlock, p.vStrideS, jn, p.Dv);
        }
    }
    for (int kvh = 0; kvh < p.Hkv; kvh++) {
        const long rowBase = ((long)b * p.Hq + (long)kvh * G) * p.Nq;
        __global float *oRows = oPart + ((long)split * totalRows + rowBase) * p.Dv;
        __global float *rowState = state + ((long)split * totalRows + rowBase) * 3;
        for (int r = 0; r < rows; r++)
            finish_row(oRows + r * p.Dv, p.Dv, lsePart + (long)split * totalRows + rowBase + r, rowState[r * 3],
                       rowState[r * 3 + 1], rowState[r * 3 + 2] != 0.0f || isnan(rowState[r * 3 + 1]));
    }
}

/// Global size (rows). The exact merge of two partial results (a then b) of `rows` rows of Dv
/// values into (o, lse), with decode_merge's conventions (0 / -inf for rows neither part saw, NaN
/// for a NaN part); o and lse may be a's buffers. OpenCLBackend.merge folds any number of parts
/// through it, left to right.
__kernel void merge_pair(__global const float *oA, __global const float *lseA, __global const float *oB,
                         __global const float *lseB, __global float *o, __global float *lse, int rows, int Dv) {
    const long row = get_global_id(0);
    if (row >= rows) return;
    const float a = lseA[row], b = lseB[row];
    const float M = fmax(a, b);
    __global float *out = o + row * Dv;
    if (isnan(a) || isnan(b) || M == -INFINITY) {
        const float fill = (isnan(a) || isnan(b)) ? NAN : 0.0f;
        for (int c = 0; c < Dv; c++) out[c] = fill;
        lse[row] = (isnan(a) || isnan(b)) ? NAN : -INFINITY;
        return;
    }
    const float wa = exp(a - M), wb = exp(b - M);
    const float inverse = 1.0f / (wa + wb);
    __global const float *ra = oA + row * Dv;
    __global const float *rb = oB + row * Dv;
    for (int c = 0; c < Dv; c++) {
        float acc = 0.0f;
        if (wa != 0.0f) acc = wa * ra[c];
        if (wb != 0.0f) acc = fma(wb, rb[c], acc);
        out[c] = acc * inverse;
    }
    lse[row] = M + log(wa + wb);
}
