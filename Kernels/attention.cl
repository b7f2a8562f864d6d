// Prefill / general flash-attention kernel (the host prepends common.cl).
//
// Each work-item owns ROWS consecutive query rows of one (batch, head); a work-group owns
// get_local_size(0) * ROWS consecutive rows. Keys are walked KB = KBV * VEC at a time (KBV vectors:
// 4 on CPUs, so that the softmax's reductions, its rescaling of O and O's loads and stores in P V come
// once per 4 VEC keys, and the score product has ROWS x KBV independent accumulators; 1 when K/V tiles
// are staged in local memory):
//   1. S = Q K^T for KB keys, with K re-laid on the device in key blocks (kt: [B, Hkv, NkPad/VEC, D, VEC])
//      so that VEC keys are one vector load, each query element one broadcast multiply-add, and a
//      step reads one contiguous D x VEC tile (one stream for the prefetcher, not D);
//   2. scale, softcap, causal/window bounds and mask (only on blocks that need them);
//   3. online softmax per row (running max m and sum l; O rows rescaled when m moves);
//   4. O += P V, accumulated in the output rows in global memory.
// Q (fp32) and O (fp32) are addressed through their strides (any layout, in place); V through its
// strides and storage type (KV_TYPE) unless it is staged in local memory (then the host gives dense fp32).
// Key blocks no row can see are never visited. With USE_LOCAL the work-group stages each step's
// K^T and V tiles in local memory (GPUs); without it every work-item reads them through the
// cache (CPUs: PoCL vectorises the explicit float vectors, and local memory only adds copies).

#ifndef USE_LOCAL
#define USE_LOCAL 0
#endif
#ifndef KBV
#define KBV 1
#endif
#if USE_LOCAL && KBV != 1
#error "local-memory staging takes one vector of keys per step (KBV 1)"
#endif
#define KB (KBV * VEC)
// Storage of the K rows transpose_keys reads (the flash kernel itself reads fp32 only).
#ifndef K_TYPE
#define K_TYPE 0
#endif
#if K_TYPE == 1
#define k_t half
#define K_LOAD1(p, i) vload_half(0, (p) + (i))
#elif K_TYPE == 2
#define k_t ushort
#define K_LOAD1(p, i) as_float((uint)((p)[i]) << 16)
#else
#define k_t float
#define K_LOAD1(p, i) ((p)[i])
#endif

/// kt[b, h, j / VEC, c, j % VEC] = k[b, h, j, c] for j < Nk, 0 for Nk <= j < NkPad, reading K through
/// its strides (sB, sH, sS) and storage type. Global size (D, NkPad, B*Hkv): consecutive work-items
/// read one K row contiguously, whatever the distance between rows.
__kernel void transpose_keys(__global const k_t *k, __global float *kt, int Nk, int D, int NkPad, int Hkv,
                             int sB, int sH, int sS) {
    const int c = get_global_id(0), j = get_global_id(1);
    const long bh = get_global_id(2);
    if (j >= NkPad || c >= D) return;
    const long source = (bh / Hkv) * sB + (bh % Hkv) * sH + (long)j * sS + c;
    kt[((bh * (NkPad / VEC) + j / VEC) * D + c) * VEC + j % VEC] = j < Nk ? K_LOAD1(k, source) : 0.0f;
}

/// Global size (roundUp(ceil(Nq / ROWS), local size), B * Hq); local size (WG, 1).
__kernel void flash_attention(__global const float *q, __global const float *kt, __global const kv_t *v,
                              __global const float *maskF, __global const uchar *maskB,
                              __global float *o, __global float *lse, const Params p
#if USE_LOCAL
                              , __local float *ktTile, __local float *vTile
#endif
) {
    const int bh = get_global_id(1);
    const int b = bh / p.Hq, h = bh % p.Hq;
    const int kvh = h / (p.Hq / p.Hkv);
    const int r0 = get_global_id(0) * ROWS;
    const int nrows = clamp(p.Nq - r0, 0, ROWS);
#if USE_LOCAL
    // Every work-item of the group walks the same keys (the barriers need it).
    const int firstRow = get_group_id(0) * get_local_size(0) * ROWS;
    const int lastRow = min(p.Nq, firstRow + (int)get_local_size(0) * ROWS) - 1;
    if (firstRow > lastRow) return;  // a whole group past the end: uniform, safe before barriers
#else
    if (nrows == 0) return;
    const int firstRow = r0, lastRow = r0 + nrows - 1;
#endif
    // Visible ranges grow with i: the union is [lo(first), hi(last)]; all rows see [lo(last), hi(first)].
    const int2 first = visible_range(p, firstRow), last = visible_range(p, lastRow);
    const int lo = first.x, hi = last.y;
    const int fullLo = last.x, fullHi = first.y;

    const long rowBase = (long)bh * p.Nq + r0;
    __global const float *qRows = q + (long)b * p.qStrideB + (long)h * p.qStrideH + (long)r0 * p.qStrideS;
    __global float *oRows = o + (long)b * p.oStrideB + (long)h * p.oStrideH + (long)r0 * p.oStrideS;
    const long kvHead = (long)b * p.Hkv + kvh;
    __global const float *ktHead = kt + kvHead * p.D * p.NkPad;
    __global const kv_t *vHead = v + (long)b * p.vStrideB + (long)kvh * p.vStrideH;

    long maskRows[ROWS];
    int qOffset[ROWS];
    UNROLL for (int r = 0; r < ROWS; r++) qOffset[r] = min(r, max(nrows, 1) - 1) * p.qStrideS;
    // Each row's Q as a pointer (no index arithmetic in the product loop).
    __global const float *qRowPtr[ROWS];
    UNROLL for (int r = 0; r < ROWS; r++) qRowPtr[r] = qRows + qOffset[r];
    float m[ROWS], l[ROWS];
    int poisoned[ROWS];
    float P[ROWS * KB];
    for (int r = 0; r < ROWS; r++) {
        maskRows[r] = (long)b * p.maskBatchStride + (long)h * p.maskHeadStride + (long)min(r0 + r, p.Nq - 1) * p.Nk;
        m[r] = -INFINITY;
        l[r] = 0.0f;
        poisoned[r] = 0;
    }
    for (int t = 0; t < ROWS * KB; t++) P[t] = 0.0f;
    for (int r = 0; r < nrows; r++)
        for (int c = 0; c < p.Dv; c++) oRows[r * p.oStrideS + c] = 0.0f;

    // Blocks start at multiples of KB (the host pads the re-laid K to a multiple of KB with zeros).
    for (int j0 = lo - lo % KB; j0 <= hi; j0 += KB) {
        const int jn = min(KB, p.Nk - j0);
#if USE_LOCAL
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int idx = get_local_id(0); idx < p.D * VEC; idx += get_local_size(0))
            ktTile[idx] = ktHead[(long)j0 * p.D + idx];
        for (int idx = get_local_id(0); idx < VEC * p.Dv; idx += get_local_size(0))
            vTile[idx] = idx / p.Dv < jn ? KV_LOAD1(vHead, (long)(j0 + idx / p.Dv) * p.vStrideS + idx % p.Dv) : 0.0f;
        barrier(CLK_LOCAL_MEM_FENCE);
        KV_SPACE const float *ktStep = ktTile;
        KV_SPACE const float *vStep = vTile;
        const long vRowStride = p.Dv;
        if (nrows == 0) continue;
#else
        KV_SPACE const float *ktStep = ktHead + (long)j0 * p.D;  // blocks j0 / VEC ..., D x VEC floats each
        KV_SPACE const kv_t *vStep = vHead + (long)j0 * p.vStrideS;
        const long vRowStride = p.vStrideS;
#endif
        floatV dots[ROWS][KBV];
        UNROLL for (int r = 0; r < ROWS; r++) UNROLL for (int u = 0; u < KBV; u++) dots[r][u] = (floatV)(0.0f);
        for (int c = 0; c < p.D; c++) {
            floatV kv[KBV];
            UNROLL for (int u = 0; u < KBV; u++) kv[u] = vloadV(0, ktStep + (u * p.D + c) * VEC);
            UNROLL for (int r = 0; r < ROWS; r++) {
                const floatV qb = (floatV)(qRowPtr[r][c]);
                UNROLL for (int u = 0; u < KBV; u++) dots[r][u] = fma(qb, kv[u], dots[r][u]);
            }
        }
        const int needsMasking = p.maskKind != 0 || j0 < fullLo || j0 + KB - 1 > fullHi || j0 + KB > p.Nk;
        UNROLL for (int r = 0; r < ROWS; r++) {
            if (r < nrows) {
                floatV s[KBV];
                UNROLL for (int u = 0; u < KBV; u++)
                    s[u] = finish_scores(p, dots[r][u], r0 + r, j0 + u * VEC, needsMasking, maskF, maskB, maskRows[r]);
                float alpha;
                softmax_block(s, KBV, &m[r], &l[r], &alpha, &poisoned[r]);
                if (alpha != 1.0f) scale_row(oRows + r * p.oStrideS, p.Dv, alpha);
                UNROLL for (int u = 0; u < KBV; u++) vstoreV(s[u], 0, P + r * KB + u * VEC);
            }
        }
        accumulate_pv(oRows, p.oStrideS, nrows, P, KB, vStep, vRowStride, jn, p.Dv);
    }
    for (int r = 0; r < nrows; r++)
        finish_row(oRows + r * p.oStrideS, p.Dv, lse + rowBase + r, m[r], l[r], poisoned[r] || isnan(l[r]));
}
