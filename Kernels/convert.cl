// Layout and storage conversions around the attention kernels (the host prepends common.cl).
//
// The flash kernel reads dense fp32 Q and V and writes dense fp32 O. When an operand is strided or
// stored as fp16/bf16, the host gathers it into a dense fp32 buffer first (Q, V) or scatters the
// result into it afterwards (O); the decode kernel reads K and V in place instead. Defines:
//   SRC_TYPE  storage gather_rows reads: 0 fp32, 1 fp16, 2 bf16
//   DST_TYPE  storage scatter_rows writes (rounded to nearest even)

#ifndef SRC_TYPE
#define SRC_TYPE 0
#endif
#ifndef DST_TYPE
#define DST_TYPE 0
#endif

#if SRC_TYPE == 1
#define src_t half
#define SRC_LOAD(p, i) vload_half(0, (p) + (i))
#elif SRC_TYPE == 2
#define src_t ushort
#define SRC_LOAD(p, i) as_float((uint)((p)[i]) << 16)
#else
#define src_t float
#define SRC_LOAD(p, i) ((p)[i])
#endif

#if DST_TYPE == 1
#define dst_t half
#define DST_STORE(x, p, i) vstore_half_rte((x), 0, (p) + (i))
#elif DST_TYPE == 2
#define dst_t ushort
/// fp32 -> bf16, round to nearest even; NaN stays a quiet NaN with its sign.
INLINE ushort to_bf16(float x) {
    const uint u = as_uint(x);
    return isnan(x) ? (ushort)((u >> 16) | 0x40) : (ushort)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}
#define DST_STORE(x, p, i) ((p)[i] = to_bf16(x))
#else
#define dst_t float
#define DST_STORE(x, p, i) ((p)[i] = (x))
#endif

/// dst[((b*H + h)*N + n)*D + c] = src[b*sB + h*sH + n*sS + c] as fp32. Global size (D, N, B*H).
__kernel void gather_rows(__global const src_t *src, __global float *dst, int H, int N, int D, int sB, int sH,
                          int sS) {
    const int c = get_global_id(0), n = get_global_id(1);
    const long bh = get_global_id(2);
    if (c >= D || n >= N) return;
    dst[(bh * N + n) * D + c] = SRC_LOAD(src, (bh / H) * sB + (bh % H) * sH + (long)n * sS + c);
}

/// dst[b*sB + h*sH + n*sS + c] = src[((b*H + h)*N + n)*D + c] rounded to DST_TYPE. Global size (D, N, B*H).
__kernel void scatter_rows(__global const float *src, __global dst_t *dst, int H, int N, int D, int sB, int sH,
                           int sS) {
    const int c = get_global_id(0), n = get_global_id(1);
    const long bh = get_global_id(2);
    if (c >= D || n >= N) return;
    DST_STORE(src[(bh * N + n) * D + c], dst, (bh / H) * sB + (bh % H) * sH + (long)n * sS + c);
}

/// gather_rows for layouts whose heads are closer together than their positions ([B, N, H, D]):
/// the same result, with work-items walking the source in memory order. Global size (D, H, B*N).
__kernel void gather_rows_by_position(__global const src_t *src, __global float *dst, int H, int N, int D, int sB,
                                      int sH, int sS) {
    const int c = get_global_id(0), h = get_global_id(1);
    const long bn = get_global_id(2);
    if (c >= D || h >= H) return;
    const long b = bn / N, n = bn % N;
    dst[((b * H + h) * N + n) * D + c] = SRC_LOAD(src, b * sB + h * sH + n * sS + c);
}

/// scatter_rows walking the destination in memory order when heads are closer than positions.
/// Global size (D, H, B*N).
__kernel void scatter_rows_by_position(__global const float *src, __global dst_t *dst, int H, int N, int D, int sB,
                                       int sH, int sS) {
    const int c = get_global_id(0), h = get_global_id(1);
    const long bn = get_global_id(2);
    if (c >= D || h >= H) return;
    const long b = bn / N, n = bn % N;
    DST_STORE(src[((b * H + h) * N + n) * D + c], dst, b * sB + h * sH + n * sS + c);
}
