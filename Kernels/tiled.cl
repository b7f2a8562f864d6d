// FlashAttention-2-shaped kernel for GPUs (the host prepends common.cl).
//
// A work-group owns BR query rows of one unit: one (batch, head), or, for short queries under GQA,
// every head of one K/V group (headsPerUnit = G: row r is query r % Nq of head r / Nq of the group,
// so one K/V tile serves all of them). It walks its keys in tiles of BC:
//   1. the K tile (BC keys x D) is loaded cooperatively and coalesced (consecutive work-items read
//      consecutive elements of a row, whatever its storage type), transposed into local memory;
//   2. S = Q K^T: the group's items form TY x TX; item (ty, tx) owns rows ty*RM .. ty*RM+RM-1 and
//      keys tx, tx+TX, ...: RM x RN scores in private memory, Q (pre-scaled by scale * log2 e) from
//      local memory;
//   3. the V tile replaces the K tile in local memory while the row maxima are reduced across the TX
//      items of a row (local memory, or sub-group shuffles where the device has them);
//   4. online softmax in base 2 (exp2), P through local memory, and O += P V into the item's RM x DN
//      accumulators (private memory, value columns tx, tx+TX, ...);
//   5. after the last tile the row sums are reduced once, and O and LSE written once.
// Masking runs only on tiles that need it (boundary of causal/window ranges, key tails, masks); tiles
// no row of the group can see are never visited. With SPLIT (key splits, get_group_id(2)) each group
// covers keys [split * splitLen, (split + 1) * splitLen) and writes a normalised partial O and LSE for
// decode_merge (decode.cl), which combines splits exactly.
//
// Compile-time defines (chosen per device by the host, OpenCLKernelConfig.GPUTiles):
//   BR, BC   rows per group, keys per tile;  TX  items across a row;  WG  items per group
//   DVCAP    value columns the accumulators hold (a power of two >= Dv; DN = DVCAP / TX per item)
//   KV_TYPE  storage of K and V (common.cl);  SPLIT 0/1;  BATCH_FORM 0/1/2 (as decode.cl)
//   SUBGROUPS 1: row reductions by cl_intel_subgroups shuffles (a sub-group is exactly one row's TX
//             items); 0: through local memory (portable OpenCL 1.2)
// Local memory (host-sized arguments): qTile D*BR, kvTile max(D*(BC+1), BC*Dv), pTile BR*BC,
// rowMax BR*TX floats.

#define TY (WG / TX)
#define RM (BR / TY)
#define RN (BC / TX)
#define DN (DVCAP / TX)
#define KPAD (BC + 1)
#define LOG2E 1.44269504088896341f
#define LN2 0.693147180559945309f

#ifndef SPLIT
#define SPLIT 0
#endif
#ifndef SUBGROUPS
#define SUBGROUPS 0
#endif
#ifndef BATCH_FORM
#define BATCH_FORM 0
#endif

#if SUBGROUPS
#pragma OPENCL EXTENSION cl_intel_subgroups : enable
#define GROUP_ATTRIBUTES __attribute__((reqd_work_group_size(WG, 1, 1))) __attribute__((intel_reqd_sub_group_size(TX)))
#else
#define GROUP_ATTRIBUTES __attribute__((reqd_work_group_size(WG, 1, 1)))
#endif

#if BATCH_FORM
#define BATCH_ARGS , __global const int *lengths, __global const int *blockTable, int pageSize, int maxPages
#else
#define BATCH_ARGS
#endif
// Element offset of key row j of K/V head kvh in sequence b (pages looked up through the block table).
#if BATCH_FORM == 2
#define ROW_OFFSET(sB, sH, sS, j) \
    ((long)blockTable[b * maxPages + (j) / pageSize] * (sB) + (long)kvh * (sH) + (long)((j) % pageSize) * (sS))
#else
#define ROW_OFFSET(sB, sH, sS, j) ((long)b * (sB) + (long)kvh * (sH) + (long)(j) * (sS))
#endif

/// The maximum of x over the TX items of this item's row (every one of them gets it). `slot` is this
/// item's rowMax entry for the row; the local variant needs the group's barrier.
INLINE float row_max(float x, __local float *rowMax, int slot, int tx) {
#if SUBGROUPS
    for (int offset = TX / 2; offset > 0; offset >>= 1) x = fmax(x, intel_sub_group_shuffle_xor(x, (uint)offset));
    return x;
#else
    rowMax[slot] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    float result = rowMax[slot - tx];
    for (int t = 1; t < TX; t++) result = fmax(result, rowMax[slot - tx + t]);
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
#endif
}

/// The sum of x over the TX items of this item's row, in the same fixed order on every item.
INLINE float row_sum(float x, __local float *rowMax, int slot, int tx) {
#if SUBGROUPS
    for (int offset = 1; offset < TX; offset <<= 1) x += intel_sub_group_shuffle_xor(x, (uint)offset);
    return x;
#else
    rowMax[slot] = x;
    barrier(CLK_LOCAL_MEM_FENCE);
    float result = rowMax[slot - tx];
    for (int t = 1; t < TX; t++) result += rowMax[slot - tx + t];
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
#endif
}

/// Global size (rowBlocks * WG, units, splits); local size (WG, 1, 1). A unit is (b, h) when
/// headsPerUnit is 1, else (b, K/V head) with its headsPerUnit = G heads.
__kernel GROUP_ATTRIBUTES void flash_tiled(
    __global const float *q, __global const kv_t *k, __global const kv_t *v, __global const float *maskF,
    __global const uchar *maskB, __global float *o, __global float *lse, const Params params, int headsPerUnit,
    int splitLen, __local float *qTile, __local float *kvTile, __local float *pTile, __local float *rowMax BATCH_ARGS) {
    const int lid = get_local_id(0);
    const int tx = lid % TX, ty = lid / TX;
    const int unit = get_group_id(1);
    const int split = get_group_id(2);
    Params p = params;
    const int unitsPerBatch = p.Hq / headsPerUnit;
    const int b = unit / unitsPerBatch;
    const int firstHead = (unit % unitsPerBatch) * headsPerUnit;
    const int kvh = firstHead / (p.Hq / p.Hkv);
#if BATCH_FORM
    p.Nk = lengths[b];  // each sequence is its own problem over its own keys
#endif
    const int unitRows = headsPerUnit * p.Nq;
    const int row0 = get_group_id(0) * BR;
    if (row0 >= unitRows) return;  // uniform over the group
    const int rowEnd = min(unitRows, row0 + BR);

    // Queries of the group's rows: a run of one head's queries, or every query when it spans heads.
    const int spansHeads = (row0 / p.Nq) != ((rowEnd - 1) / p.Nq);
    const int qFirst = spansHeads ? 0 : row0 % p.Nq, qLast = spansHeads ? p.Nq - 1 : (rowEnd - 1) % p.Nq;
    const int2 firstRange = visible_range(p, qFirst), lastRange = visible_range(p, qLast);
    int jBegin = firstRange.x, jEnd = min(p.Nk, lastRange.y + 1);
    const int fullLo = lastRange.x, fullHi = firstRange.y;
#if SPLIT
    jBegin = max(jBegin, split * splitLen);
    jEnd = min(jEnd, (split + 1) * splitLen);
#endif
    const float qScale = p.softcap > 0.0f ? p.scale : p.scale * LOG2E;

    // Q tile, transposed ([d][row]) and scaled. Rows past the end repeat the last row, so that the
    // items holding them compute exactly its values: should a driver take the write guard at the end
    // as uniform across the group (PoCL 3.1 did), their stray writes still store the right numbers.
    for (int idx = lid; idx < BR * p.D; idx += WG) {
        const int r = idx / p.D, c = idx % p.D;
        const int row = min(row0 + r, rowEnd - 1);
        const int h = firstHead + row / p.Nq, i = row % p.Nq;
        qTile[c * BR + r] = q[(long)b * p.qStrideB + (long)h * p.qStrideH + (long)i * p.qStrideS + c] * qScale;
    }

    // This item's rows: head, query index, mask row.
    int rowHead[RM], rowQuery[RM];
    long maskRow[RM];
    UNROLL for (int i = 0; i < RM; i++) {
        const int row = min(row0 + ty * RM + i, rowEnd - 1);
        rowHead[i] = firstHead + row / p.Nq;
        rowQuery[i] = row % p.Nq;
        maskRow[i] = (long)b * p.maskBatchStride + (long)rowHead[i] * p.maskHeadStride + (long)rowQuery[i] * p.Nk;
    }
    float m[RM], l[RM], acc[RM][DN];
    int poisoned[RM];
    UNROLL for (int i = 0; i < RM; i++) {
        m[i] = -INFINITY;
        l[i] = 0.0f;
        poisoned[i] = 0;
        UNROLL for (int n = 0; n < DN; n++) acc[i][n] = 0.0f;
    }

    for (int j0 = jBegin; j0 < jEnd; j0 += BC) {
        const int jn = min(BC, jEnd - j0);
        // 1. K tile, transposed: kvTile[d * KPAD + key].
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int idx = lid; idx < BC * p.D; idx += WG) {
            const int t = idx / p.D, c = idx % p.D;
            kvTile[c * KPAD + t] = t < jn ? KV_LOAD1(k, ROW_OFFSET(p.kStrideB, p.kStrideH, p.kStrideS, j0 + t) + c)
                                          : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        // 2. Scores of the item's RM x RN sub-tile.
        float s[RM][RN];
        UNROLL for (int i = 0; i < RM; i++) UNROLL for (int j = 0; j < RN; j++) s[i][j] = 0.0f;
        for (int c = 0; c < p.D; c++) {
            float qv[RM], kv[RN];
            UNROLL for (int i = 0; i < RM; i++) qv[i] = qTile[c * BR + ty * RM + i];
            UNROLL for (int j = 0; j < RN; j++) kv[j] = kvTile[c * KPAD + tx + j * TX];
            UNROLL for (int i = 0; i < RM; i++) UNROLL for (int j = 0; j < RN; j++) s[i][j] = fma(qv[i], kv[j], s[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        // 3. V tile into the same local memory: kvTile[key * Dv + c].
        for (int idx = lid; idx < BC * p.Dv; idx += WG) {
            const int t = idx / p.Dv, c = idx % p.Dv;
            kvTile[idx] = t < jn ? KV_LOAD1(v, ROW_OFFSET(p.vStrideB, p.vStrideH, p.vStrideS, j0 + t) + c) : 0.0f;
        }
        // Softcap, visibility and mask (boundary tiles only), all in base 2.
        const int needsMasking = p.maskKind != 0 || j0 < fullLo || j0 + BC - 1 > fullHi || jn < BC;
        UNROLL for (int i = 0; i < RM; i++) {
            int2 range = visible_range(p, rowQuery[i]);
            UNROLL for (int j = 0; j < RN; j++) {
                float x = s[i][j];
                if (p.softcap > 0.0f) x = p.softcap * tanh(x / p.softcap) * LOG2E;
                if (needsMasking) {
                    const int key = j0 + tx + j * TX;
                    int visible = tx + j * TX < jn && key >= range.x && key <= range.y;
                    if (visible && p.maskKind == 1) x += maskF[maskRow[i] + key] * LOG2E;
                    if (visible && p.maskKind == 2) visible = maskB[maskRow[i] + key] != 0;
                    if (!visible) x = -INFINITY;
                }
                if (isnan(x)) poisoned[i] = 1;
                s[i][j] = x;
            }
        }
        // 4. Online softmax: row maxima across the row's items, P into local memory.
        float alpha[RM];
        UNROLL for (int i = 0; i < RM; i++) {
            float tileMax = -INFINITY;
            UNROLL for (int j = 0; j < RN; j++) tileMax = fmax(tileMax, s[i][j]);
            const float mNew = fmax(m[i], row_max(tileMax, rowMax, (ty * RM + i) * TX + tx, tx));
            alpha[i] = mNew == -INFINITY ? 1.0f : exp2(m[i] - mNew);
            const float base = mNew == -INFINITY ? 0.0f : mNew;
            float sum = 0.0f;
            UNROLL for (int j = 0; j < RN; j++) {
                const float e = exp2(s[i][j] - base);
                sum += e;
                pTile[(ty * RM + i) * BC + tx + j * TX] = e;
            }
            l[i] = l[i] * alpha[i] + sum;
            m[i] = mNew;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        // 5. O = alpha O + P V.
        UNROLL for (int i = 0; i < RM; i++) UNROLL for (int n = 0; n < DN; n++) acc[i][n] *= alpha[i];
        for (int t = 0; t < jn; t++) {
            float pv[RM], vv[DN];
            UNROLL for (int i = 0; i < RM; i++) pv[i] = pTile[(ty * RM + i) * BC + t];
            UNROLL for (int n = 0; n < DN; n++) {
                const int c = tx + n * TX;
                vv[n] = c < p.Dv ? kvTile[t * p.Dv + c] : 0.0f;
            }
            UNROLL for (int i = 0; i < RM; i++) UNROLL for (int n = 0; n < DN; n++) acc[i][n] = fma(pv[i], vv[n], acc[i][n]);
        }
    }

    // Row sums (and NaN flags) across the row's items, once; then O and LSE.
    const long totalRows = (long)p.B * p.Hq * p.Nq;
    float L[RM];
    UNROLL for (int i = 0; i < RM; i++) L[i] = row_sum(poisoned[i] ? NAN : l[i], rowMax, (ty * RM + i) * TX + tx, tx);
    const int validRows = clamp(rowEnd - (row0 + ty * RM), 0, RM);
    UNROLL for (int i = 0; i < RM; i++) {
        if (i >= validRows) break;
        const long index = ((long)b * p.Hq + rowHead[i]) * p.Nq + rowQuery[i];
#if SPLIT
        __global float *out = o + ((long)split * totalRows + index) * p.Dv;
        __global float *lseOut = lse + (long)split * totalRows + index;
#else
        __global float *out = o + (long)b * p.oStrideB + (long)rowHead[i] * p.oStrideH + (long)rowQuery[i] * p.oStrideS;
        __global float *lseOut = lse + index;
#endif
        const int empty = m[i] == -INFINITY, bad = isnan(L[i]);
        const float inverse = empty || bad ? 0.0f : 1.0f / L[i];
        UNROLL for (int n = 0; n < DN; n++) {
            const int c = tx + n * TX;
            if (c < p.Dv) out[c] = bad ? NAN : acc[i][n] * inverse;
        }
        if (tx == 0) *lseOut = bad ? NAN : (empty ? -INFINITY : (m[i] + log2(L[i])) * LN2);
    }
}
