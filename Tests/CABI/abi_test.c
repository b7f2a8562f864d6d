// The C ABI, checked from C as a user would call it: every call against a float64 reference written
// here (independent of the library), typed errors with their messages, the three batch forms,
// per-thread messages on a shared context. Built and run by scripts/test:
//   cc -std=c11 -Wall -Wextra -Werror -I Sources/CAttentionKitABI/include Tests/CABI/abi_test.c
//      -L .build/release -lAttentionKitC -Wl,-rpath,$PWD/.build/release -lpthread -lm -o abi_test
// Exit status 0 when every check passes; each failure prints one line.
#include "attentionkit.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        checks++;                                          \
        if (!(cond)) {                                     \
            failures++;                                    \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);    \
            printf(__VA_ARGS__);                           \
            printf("\n");                                  \
        }                                                  \
    } while (0)

// MARK: Storage (inputs are multiples of 1/64 below 2 in magnitude: exact in fp32, fp16 and bf16)

static uint16_t to_half(float x) {
    _Float16 h = (_Float16)x;
    uint16_t bits;
    memcpy(&bits, &h, 2);
    return bits;
}
static float from_half(uint16_t bits) {
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}
static uint16_t to_bf16(float x) {  // exact for our inputs: truncation is rounding
    uint32_t bits;
    memcpy(&bits, &x, 4);
    return (uint16_t)(bits >> 16);
}
static float from_bf16(uint16_t b) {
    uint32_t bits = (uint32_t)b << 16;
    float x;
    memcpy(&x, &bits, 4);
    return x;
}
static size_t dtype_size(int dtype) { return dtype == ATTENTIONKIT_FLOAT32 ? 4 : 2; }

static float load(const attentionkit_tensor *t, int64_t offset) {
    switch (t->dtype) {
    case ATTENTIONKIT_FLOAT32: return ((const float *)t->data)[offset];
    case ATTENTIONKIT_FLOAT16: return from_half(((const uint16_t *)t->data)[offset]);
    default: return from_bf16(((const uint16_t *)t->data)[offset]);
    }
}
static void store(const attentionkit_tensor *t, int64_t offset, float x) {
    switch (t->dtype) {
    case ATTENTIONKIT_FLOAT32: ((float *)t->data)[offset] = x; break;
    case ATTENTIONKIT_FLOAT16: ((uint16_t *)t->data)[offset] = to_half(x); break;
    default: ((uint16_t *)t->data)[offset] = to_bf16(x); break;
    }
}

static uint32_t rng = 12345;
static float next_value(void) {  // k / 64, |k| <= 100
    rng = rng * 1664525u + 1013904223u;
    return (float)((int)(rng >> 9) % 201 - 100) / 64.0f;
}

/// A [d0, d1, d2, d3] tensor in a fresh buffer of `capacity` elements, element (a, b, c, d) at
/// a*s0 + b*s1 + c*s2 + d, filled with NaN (so unread padding is detectable) then random values.
static attentionkit_tensor make(int dtype, int rank, const int64_t *shape, const int64_t *strides, int64_t capacity,
                                int fill) {
    attentionkit_tensor t = {0};
    t.data = malloc((size_t)capacity * dtype_size(dtype));
    t.dtype = dtype;
    t.rank = rank;
    for (int i = 0; i < rank; i++) {
        t.shape[i] = shape[i];
        t.strides[i] = strides[i];
    }
    for (int64_t i = 0; i < capacity; i++) store(&t, i, NAN);
    if (fill) {
        int64_t s[4] = {1, 1, 1, 1}, st[4] = {0, 0, 0, 0};
        for (int i = 0; i < rank; i++) {
            s[4 - rank + i] = shape[i];
            st[4 - rank + i] = strides[i];
        }
        for (int64_t a = 0; a < s[0]; a++)
            for (int64_t b = 0; b < s[1]; b++)
                for (int64_t c = 0; c < s[2]; c++)
                    for (int64_t d = 0; d < s[3]; d++) store(&t, a * st[0] + b * st[1] + c * st[2] + d * st[3], next_value());
    }
    return t;
}

// MARK: The float64 reference of one (batch, head) row set

typedef struct {
    int causal;
    int64_t left, right;
    double scale, softcap;
    const uint8_t *mask; /* [Nq, Nk] or NULL */
} ref_options;

/// Offsets of row n of head h in batch b, through a function so that pools and packed rows work.
typedef int64_t (*row_offset)(const attentionkit_tensor *t, int64_t b, int64_t h, int64_t n, const void *ctx);

static int64_t bhsd_offset(const attentionkit_tensor *t, int64_t b, int64_t h, int64_t n, const void *ctx) {
    (void)ctx;
    return b * t->strides[0] + h * t->strides[1] + n * t->strides[2];
}

/// O and LSE of query rows [0, nq) of head hq of batch b against keys [0, nk), into out/lse.
static void reference(const attentionkit_tensor *q, const attentionkit_tensor *k, const attentionkit_tensor *v,
                      row_offset qo, row_offset ko, const void *ctx, int64_t b, int64_t hq, int64_t hkv, int64_t nq,
                      int64_t nk, int64_t dim, int64_t dv, ref_options o, double *out, double *lse) {
    double *p = malloc(sizeof(double) * (size_t)(nk > 0 ? nk : 1));
    for (int64_t i = 0; i < nq; i++) {
        int64_t pos = i + nk - nq;
        double m = -INFINITY;
        for (int64_t j = 0; j < nk; j++) {
            int visible = (!o.causal || j <= pos) && (o.left < 0 || j >= pos - o.left) &&
                          (o.right < 0 || j <= pos + o.right) && (!o.mask || o.mask[i * nk + j]);
            if (!visible) {
                p[j] = -INFINITY;
                continue;
            }
            double s = 0;
            for (int64_t d = 0; d < dim; d++)
                s += (double)load(q, qo(q, b, hq, i, ctx) + d) * (double)load(k, ko(k, b, hkv, j, ctx) + d);
            s *= o.scale;
            if (o.softcap > 0) s = o.softcap * tanh(s / o.softcap);
            p[j] = s;
            if (s > m) m = s;
        }
        double sum = 0;
        for (int64_t j = 0; j < nk; j++) sum += p[j] == -INFINITY ? 0 : exp(p[j] - m);
        for (int64_t d = 0; d < dv; d++) {
            double acc = 0;
            for (int64_t j = 0; j < nk; j++)
                if (p[j] != -INFINITY) acc += exp(p[j] - m) * (double)load(v, ko(v, b, hkv, j, ctx) + d);
            out[i * dv + d] = sum > 0 ? acc / sum : 0;
        }
        lse[i] = sum > 0 ? m + log(sum) : -INFINITY;
    }
    free(p);
}

/// Compares library output rows with the reference (ATTENTION.md's fp32 rule plus one rounding of
/// the output type); returns the worst excess (<= 0 passes).
static double compare(const attentionkit_tensor *out, int64_t offset_of_row0, int64_t row_stride, int64_t nq,
                      int64_t dv, const double *ref, const float *lse, const double *ref_lse) {
    double unit = out->dtype == ATTENTIONKIT_FLOAT32 ? 0 : out->dtype == ATTENTIONKIT_FLOAT16 ? 0x1p-11 : 0x1p-8;
    double worst = -1;
    for (int64_t i = 0; i < nq; i++) {
        for (int64_t d = 0; d < dv; d++) {
            double x = load(out, offset_of_row0 + i * row_stride + d), r = ref[i * dv + d];
            double excess = fabs(x - r) - (3e-4 + 2e-5 * fabs(r) + unit * fabs(r));
            if (!(excess <= worst)) worst = isnan(excess) ? INFINITY : excess;
        }
        if (lse) {
            double l = lse[i], r = ref_lse[i];
            double excess = (isinf(r) && isinf(l) && (r < 0) == (l < 0)) ? -1 : fabs(l - r) - 1e-4 * (1 + fabs(r));
            if (!(excess <= worst)) worst = isnan(excess) ? INFINITY : excess;
        }
    }
    return worst;
}

// MARK: One problem

typedef struct {
    int64_t b, hq, hkv, nq, nk, d, dv;
    int qtype, kvtype, otype;
    int bshd_query;      /* Q (and O) in [B, N, H, D] memory order */
    int64_t capacity;    /* K/V rows allocated per head (>= nk): a view of a cache */
    attentionkit_options options;
    int mask_kind;       /* 0 none, 1 bool [Nq, Nk] broadcast over B and H with stride 0 */
} case_spec;

static void run_case(attentionkit_context *ctx, const char *label, case_spec c) {
    int64_t qs[4] = {c.b, c.hq, c.nq, c.d}, ks[4] = {c.b, c.hkv, c.nk, c.d}, vs[4] = {c.b, c.hkv, c.nk, c.dv};
    int64_t os[4] = {c.b, c.hq, c.nq, c.dv};
    int64_t qst[4], ost[4];
    if (c.bshd_query) {
        int64_t a[4] = {c.nq * c.hq * c.d, c.d, c.hq * c.d, 1}, o[4] = {c.nq * c.hq * c.dv, c.dv, c.hq * c.dv, 1};
        memcpy(qst, a, sizeof a);
        memcpy(ost, o, sizeof o);
    } else {
        int64_t a[4] = {c.hq * c.nq * c.d, c.nq * c.d, c.d, 1}, o[4] = {c.hq * c.nq * c.dv, c.nq * c.dv, c.dv, 1};
        memcpy(qst, a, sizeof a);
        memcpy(ost, o, sizeof o);
    }
    int64_t kst[4] = {c.hkv * c.capacity * c.d, c.capacity * c.d, c.d, 1};
    int64_t vst[4] = {c.hkv * c.capacity * c.dv, c.capacity * c.dv, c.dv, 1};
    attentionkit_tensor q = make(c.qtype, 4, qs, qst, c.b * c.hq * c.nq * c.d, 1);
    attentionkit_tensor k = make(c.kvtype, 4, ks, kst, c.b * c.hkv * c.capacity * c.d, 1);
    attentionkit_tensor v = make(c.kvtype, 4, vs, vst, c.b * c.hkv * c.capacity * c.dv, 1);
    attentionkit_tensor o = make(c.otype, 4, os, ost, c.b * c.hq * c.nq * c.dv, 0);
    float *lse = malloc(sizeof(float) * (size_t)(c.b * c.hq * c.nq));
    uint8_t *mask = NULL;
    attentionkit_tensor mask_tensor = {0};
    if (c.mask_kind) {
        mask = malloc((size_t)(c.nq * c.nk));
        for (int64_t i = 0; i < c.nq * c.nk; i++) mask[i] = (uint8_t)((i * 7 + i / c.nk) % 5 != 0);
        for (int64_t j = 0; j < c.nk; j++) mask[j] = 0;  // row 0 fully masked
        mask_tensor = (attentionkit_tensor){mask, ATTENTIONKIT_BOOL, 4, {c.b, c.hq, c.nq, c.nk}, {0, 0, c.nk, 1}};
        c.options.mask = &mask_tensor;
    }
    attentionkit_status status = attentionkit_attention(ctx, &q, &k, &v, &o, lse, &c.options);
    CHECK(status == ATTENTIONKIT_OK, "%s [%s]: status %d: %s", label, attentionkit_last_backend(ctx), status,
          attentionkit_last_error(ctx));
    if (status == ATTENTIONKIT_OK) {
        ref_options r = {c.options.causal, c.options.window_left, c.options.window_right,
                         c.options.scale != 0 ? c.options.scale : 1 / sqrt((double)c.d), c.options.softcap, mask};
        double *ref = malloc(sizeof(double) * (size_t)(c.nq * c.dv));
        double *ref_lse = malloc(sizeof(double) * (size_t)c.nq);
        double worst = -1;
        for (int64_t b = 0; b < c.b; b++) {
            for (int64_t h = 0; h < c.hq; h++) {
                reference(&q, &k, &v, bhsd_offset, bhsd_offset, NULL, b, h, h / (c.hq / c.hkv), c.nq, c.nk, c.d,
                          c.dv, r, ref, ref_lse);
                double e = compare(&o, b * ost[0] + h * ost[1], ost[2], c.nq, c.dv, ref, lse + (b * c.hq + h) * c.nq,
                                   ref_lse);
                if (e > worst) worst = e;
            }
        }
        CHECK(worst <= 0, "%s [%s]: exceeds the tolerance by %g", label, attentionkit_last_backend(ctx), worst);
        CHECK(strlen(attentionkit_last_reason(ctx)) > 0, "%s: no reason recorded", label);
        free(ref);
        free(ref_lse);
    }
    free(q.data);
    free(k.data);
    free(v.data);
    free(o.data);
    free(lse);
    free(mask);
}

static attentionkit_options opts(int causal, int64_t left, int64_t right, float scale, float softcap) {
    attentionkit_options o = ATTENTIONKIT_OPTIONS_INIT;
    o.causal = causal;
    o.window_left = left;
    o.window_right = right;
    o.scale = scale;
    o.softcap = softcap;
    return o;
}

static void problems(attentionkit_context *ctx, const char *backend) {
    char label[128];
    const int f32 = ATTENTIONKIT_FLOAT32, f16 = ATTENTIONKIT_FLOAT16, bf16 = ATTENTIONKIT_BFLOAT16;
    struct {
        const char *name;
        case_spec c;
    } cases[] = {
        {"plain", {1, 2, 2, 5, 7, 16, 16, f32, f32, f32, 0, 7, opts(0, -1, -1, 0, 0), 0}},
        {"gqa causal bshd nq!=nk", {2, 4, 2, 9, 33, 24, 24, f32, f32, f32, 1, 40, opts(1, -1, -1, 0, 0), 0}},
        {"fp16 kv, cache view, window", {1, 8, 2, 3, 70, 32, 32, f32, f16, f32, 1, 96, opts(1, 16, 0, 0, 0), 0}},
        {"bf16 everything, softcap, scale", {1, 2, 1, 17, 17, 8, 8, bf16, bf16, bf16, 0, 17, opts(0, -1, -1, 0.5f, 5), 0}},
        {"fp16 q and o, dv != d", {1, 3, 3, 6, 11, 16, 8, f16, f32, f16, 0, 11, opts(0, 4, 4, 0, 0), 0}},
        {"bool mask, broadcast, a fully masked row", {2, 2, 1, 6, 9, 8, 8, f32, f32, f32, 0, 9, opts(1, -1, -1, 0, 0), 1}},
        {"decode over 300 keys", {1, 4, 1, 1, 300, 64, 64, f32, f16, f32, 1, 320, opts(1, -1, -1, 0, 0), 0}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(label, sizeof label, "%s: %s", backend, cases[i].name);
        run_case(ctx, label, cases[i].c);
    }
}

// MARK: Errors

static void errors(attentionkit_context *ctx) {
    int64_t s[4] = {1, 2, 4, 8}, st[4] = {64, 32, 8, 1};
    attentionkit_tensor q = make(ATTENTIONKIT_FLOAT32, 4, s, st, 64, 1);
    attentionkit_tensor k = make(ATTENTIONKIT_FLOAT32, 4, s, st, 64, 1);
    attentionkit_tensor v = make(ATTENTIONKIT_FLOAT32, 4, s, st, 64, 1);
    attentionkit_tensor o = make(ATTENTIONKIT_FLOAT32, 4, s, st, 64, 0);
    attentionkit_status status;

#define EXPECT_ERROR(call, code, text)                                                                          \
    do {                                                                                                        \
        status = (call);                                                                                        \
        CHECK(status == (code), "%s: status %d, expected %d (%s)", #call, status, code, attentionkit_last_error(ctx)); \
        CHECK(strstr(attentionkit_last_error(ctx), text) != NULL, "%s: message '%s' lacks '%s'", #call,         \
              attentionkit_last_error(ctx), text);                                                              \
    } while (0)

    attentionkit_tensor bad = q;
    bad.rank = 3;
    EXPECT_ERROR(attentionkit_attention(ctx, &bad, &k, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "query");
    bad = k;
    bad.dtype = ATTENTIONKIT_FLOAT16;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &bad, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_DTYPE, "value");
    bad = v;
    bad.strides[3] = 2;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &bad, &o, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "contiguous");
    bad = k;
    bad.shape[1] = 3;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &bad, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "heads");
    bad = o;
    bad.shape[3] = 4;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &bad, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "output");
    bad = q;
    bad.data = NULL;
    EXPECT_ERROR(attentionkit_attention(ctx, &bad, &k, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_ARGUMENT, "NULL");
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &q, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "overlap");
    bad = o;
    bad.strides[1] = 0;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &bad, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "output");
    bad = q;
    bad.dtype = 9;
    EXPECT_ERROR(attentionkit_attention(ctx, &bad, &k, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_ARGUMENT, "dtype");
    bad = q;
    bad.strides[0] = -64;
    EXPECT_ERROR(attentionkit_attention(ctx, &bad, &k, &v, &o, NULL, NULL), ATTENTIONKIT_INVALID_SHAPE, "strides");
    attentionkit_options o1 = opts(0, -1, -1, NAN, 0);
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_OPTION, "scale");
    o1 = opts(0, -5, 0, 0, 0);
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_OPTION, "window");
    o1 = opts(0, -1, -1, 0, -2);
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_OPTION, "softcap");
    o1 = opts(0, -1, -1, 0, 0);
    o1.struct_size = 8;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_ARGUMENT, "struct_size");
    uint8_t maskbits[3 * 4] = {1};
    attentionkit_tensor mask = {maskbits, ATTENTIONKIT_BOOL, 2, {3, 4}, {4, 1}};
    o1 = opts(0, -1, -1, 0, 0);
    o1.mask = &mask;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_SHAPE, "mask");
    mask.dtype = ATTENTIONKIT_FLOAT16;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_DTYPE, "mask");
    mask.dtype = 42;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &k, &v, &o, NULL, &o1), ATTENTIONKIT_INVALID_ARGUMENT, "mask");
    // 2^40 broadcast keys (stride 0) and a broadcast mask over them: refused by size, never gathered.
    attentionkit_tensor huge_k = k, huge_v = v;
    huge_k.shape[2] = huge_v.shape[2] = (int64_t)1 << 40;
    huge_k.strides[0] = huge_k.strides[1] = huge_k.strides[2] = 0;
    huge_v.strides[0] = huge_v.strides[1] = huge_v.strides[2] = 0;
    attentionkit_tensor huge_mask = {maskbits, ATTENTIONKIT_BOOL, 2, {4, (int64_t)1 << 40}, {0, 0}};
    o1.mask = &huge_mask;
    EXPECT_ERROR(attentionkit_attention(ctx, &q, &huge_k, &huge_v, &o, NULL, &o1), ATTENTIONKIT_INVALID_SHAPE, "elements");
    status = attentionkit_attention(NULL, &q, &k, &v, &o, NULL, NULL);
    CHECK(status == ATTENTIONKIT_INVALID_ARGUMENT && strstr(attentionkit_last_error(NULL), "context"),
          "NULL context: %d '%s'", status, attentionkit_last_error(NULL));
    // After errors, a good call still works and clears the message.
    status = attentionkit_attention(ctx, &q, &k, &v, &o, NULL, NULL);
    CHECK(status == ATTENTIONKIT_OK && attentionkit_last_error(ctx)[0] == 0, "good call after errors: %d '%s'", status,
          attentionkit_last_error(ctx));
    free(q.data);
    free(k.data);
    free(v.data);
    free(o.data);
}

// MARK: Batches of sequences

/// Where a packed sequence's query rows and key rows start.
typedef struct {
    int64_t query, key;
} starts;
static int64_t packed_q_offset(const attentionkit_tensor *t, int64_t b, int64_t h, int64_t n, const void *ctx) {
    (void)b;
    return (((const starts *)ctx)->query + n) * t->strides[0] + h * t->strides[1];
}
static int64_t packed_k_offset(const attentionkit_tensor *t, int64_t b, int64_t h, int64_t n, const void *ctx) {
    (void)b;
    return (((const starts *)ctx)->key + n) * t->strides[0] + h * t->strides[1];
}
typedef struct {
    const int32_t *table;
    int64_t max_pages, page_size;
} paging;
static int64_t paged_offset(const attentionkit_tensor *t, int64_t b, int64_t h, int64_t n, const void *ctx) {
    const paging *p = ctx;
    int64_t page = p->table[b * p->max_pages + n / p->page_size];
    return page * t->strides[0] + (n % p->page_size) * t->strides[1] + h * t->strides[2];
}
static void batches(attentionkit_context *ctx, const char *backend) {
    const int64_t hq = 4, hkv = 2, d = 16;
    // Varlen: 4 sequences, one with no queries, one with no keys.
    {
        int32_t cuq[5] = {0, 3, 3, 8, 9}, cuk[5] = {0, 5, 9, 9, 30};
        int64_t qs[3] = {9, hq, d}, qst[3] = {hq * d, d, 1}, ks[3] = {30, hkv, d}, kst[3] = {hkv * d, d, 1};
        attentionkit_tensor q = make(ATTENTIONKIT_FLOAT32, 3, qs, qst, 9 * hq * d, 1);
        attentionkit_tensor k = make(ATTENTIONKIT_FLOAT16, 3, ks, kst, 30 * hkv * d, 1);
        attentionkit_tensor v = make(ATTENTIONKIT_FLOAT16, 3, ks, kst, 30 * hkv * d, 1);
        attentionkit_tensor o = make(ATTENTIONKIT_FLOAT32, 3, qs, qst, 9 * hq * d, 0);
        float lse[9 * 4];
        attentionkit_sequences seq = ATTENTIONKIT_SEQUENCES_INIT;
        seq.form = ATTENTIONKIT_VARLEN;
        seq.count = 4;
        seq.query_offsets = cuq;
        seq.key_offsets = cuk;
        attentionkit_options options = opts(1, -1, -1, 0, 0);
        attentionkit_status status = attentionkit_attention_sequences(ctx, &seq, &q, &k, &v, &o, lse, &options);
        CHECK(status == ATTENTIONKIT_OK, "%s varlen: %d %s", backend, status, attentionkit_last_error(ctx));
        double ref[16 * 8], ref_lse[16], worst = -1;
        ref_options r = {1, -1, -1, 1 / sqrt((double)d), 0, NULL};
        for (int s = 0; s < 4 && status == ATTENTIONKIT_OK; s++) {
            int64_t nq = cuq[s + 1] - cuq[s], nk = cuk[s + 1] - cuk[s];
            for (int64_t h = 0; h < hq && nq > 0; h++) {
                float l[16];
                for (int64_t i = 0; i < nq; i++) l[i] = lse[(cuq[s] + i) * hq + h];
                starts st = {cuq[s], cuk[s]};
                reference(&q, &k, &v, packed_q_offset, packed_k_offset, &st, 0, h, h / 2, nq, nk, d, d, r, ref,
                          ref_lse);
                double e = compare(&o, cuq[s] * hq * d + h * d, hq * d, nq, d, ref, l, ref_lse);
                if (e > worst) worst = e;
            }
        }
        CHECK(worst <= 0, "%s varlen: exceeds the tolerance by %g", backend, worst);
        free(q.data);
        free(k.data);
        free(v.data);
        free(o.data);
    }
    // Cache lengths and the same caches through pages of 4 (shuffled), decode-like (Nq = 1) and Nq = 3.
    for (int64_t nq = 1; nq <= 3; nq += 2) {
        const int64_t b = 3, capacity = 24, page = 4, max_pages = capacity / page;
        int32_t lengths[3] = {5, 24, 1};
        int64_t qs[4] = {b, hq, nq, d}, qst[4] = {hq * nq * d, nq * d, d, 1};
        int64_t cs[4] = {b, hkv, capacity, d}, cst[4] = {capacity * hkv * d, d, hkv * d, 1};  // bshd caches
        attentionkit_tensor q = make(ATTENTIONKIT_FLOAT32, 4, qs, qst, b * hq * nq * d, 1);
        attentionkit_tensor k = make(ATTENTIONKIT_BFLOAT16, 4, cs, cst, b * hkv * capacity * d, 1);
        attentionkit_tensor v = make(ATTENTIONKIT_BFLOAT16, 4, cs, cst, b * hkv * capacity * d, 1);
        attentionkit_tensor o = make(ATTENTIONKIT_FLOAT32, 4, qs, qst, b * hq * nq * d, 0);
        float lse[3 * 4 * 3];
        attentionkit_sequences seq = ATTENTIONKIT_SEQUENCES_INIT;
        seq.form = ATTENTIONKIT_CACHE_LENGTHS;
        seq.count = b;
        seq.lengths = lengths;
        attentionkit_options options = opts(1, -1, -1, 0, 0);
        attentionkit_status status = attentionkit_attention_sequences(ctx, &seq, &q, &k, &v, &o, lse, &options);
        CHECK(status == ATTENTIONKIT_OK, "%s cache lengths: %d %s", backend, status, attentionkit_last_error(ctx));
        double ref[3 * 16], ref_lse[3], worst = -1;
        ref_options r = {1, -1, -1, 1 / sqrt((double)d), 0, NULL};
        for (int64_t s = 0; s < b && status == ATTENTIONKIT_OK; s++)
            for (int64_t h = 0; h < hq; h++) {
                reference(&q, &k, &v, bhsd_offset, bhsd_offset, NULL, s, h, h / 2, nq, lengths[s], d, d, r, ref,
                          ref_lse);
                double e = compare(&o, s * qst[0] + h * qst[1], d, nq, d, ref, lse + (s * hq + h) * nq, ref_lse);
                if (e > worst) worst = e;
            }
        CHECK(worst <= 0, "%s cache lengths nq=%ld: exceeds the tolerance by %g", backend, (long)nq, worst);

        // The same keys copied into pools of pages [pages, page, hkv, d], pages in reverse order.
        const int64_t pages = b * max_pages + 1;
        int64_t ps[4] = {pages, page, hkv, d}, pst[4] = {page * hkv * d, hkv * d, d, 1};
        attentionkit_tensor kp = make(ATTENTIONKIT_BFLOAT16, 4, ps, pst, pages * page * hkv * d, 0);
        attentionkit_tensor vp = make(ATTENTIONKIT_BFLOAT16, 4, ps, pst, pages * page * hkv * d, 0);
        int32_t table[3 * 6];
        for (int64_t s = 0; s < b; s++)
            for (int64_t slot = 0; slot < max_pages; slot++) table[s * max_pages + slot] = (int32_t)(pages - 1 - (s * max_pages + slot));
        paging pg = {table, max_pages, page};
        for (int64_t s = 0; s < b; s++)
            for (int64_t h = 0; h < hkv; h++)
                for (int64_t n = 0; n < capacity; n++)
                    for (int64_t e = 0; e < d; e++) {
                        int64_t from = s * cst[0] + h * cst[1] + n * cst[2] + e, to = paged_offset(&kp, s, h, n, &pg) + e;
                        store(&kp, to, load(&k, from));
                        store(&vp, to, load(&v, from));
                    }
        attentionkit_tensor o2 = make(ATTENTIONKIT_FLOAT32, 4, qs, qst, b * hq * nq * d, 0);
        float lse2[3 * 4 * 3];
        seq.form = ATTENTIONKIT_PAGED;
        seq.block_table = table;
        seq.max_pages = max_pages;
        status = attentionkit_attention_sequences(ctx, &seq, &q, &kp, &vp, &o2, lse2, &options);
        CHECK(status == ATTENTIONKIT_OK, "%s paged: %d %s", backend, status, attentionkit_last_error(ctx));
        worst = -1;
        for (int64_t s = 0; s < b && status == ATTENTIONKIT_OK; s++)
            for (int64_t h = 0; h < hq; h++) {
                reference(&q, &kp, &vp, bhsd_offset, paged_offset, &pg, s, h, h / 2, nq, lengths[s], d, d, r, ref,
                          ref_lse);
                double e = compare(&o2, s * qst[0] + h * qst[1], d, nq, d, ref, lse2 + (s * hq + h) * nq, ref_lse);
                if (e > worst) worst = e;
            }
        CHECK(worst <= 0, "%s paged nq=%ld: exceeds the tolerance by %g", backend, (long)nq, worst);

        // Errors of the forms: a page index out of range, a length beyond the table, masks refused.
        table[0] = (int32_t)pages;
        status = attentionkit_attention_sequences(ctx, &seq, &q, &kp, &vp, &o2, NULL, &options);
        CHECK(status == ATTENTIONKIT_INVALID_SHAPE && strstr(attentionkit_last_error(ctx), "page"),
              "bad page index: %d %s", status, attentionkit_last_error(ctx));
        table[0] = 0;
        lengths[0] = 25;
        seq.form = ATTENTIONKIT_CACHE_LENGTHS;
        status = attentionkit_attention_sequences(ctx, &seq, &q, &k, &v, &o, NULL, &options);
        CHECK(status == ATTENTIONKIT_INVALID_SHAPE && strstr(attentionkit_last_error(ctx), "25"),
              "length beyond capacity: %d %s", status, attentionkit_last_error(ctx));
        lengths[0] = 5;
        uint8_t bits[1] = {1};
        attentionkit_tensor mask = {bits, ATTENTIONKIT_BOOL, 2, {1, 1}, {0, 0}};
        options.mask = &mask;
        status = attentionkit_attention_sequences(ctx, &seq, &q, &k, &v, &o, NULL, &options);
        CHECK(status == ATTENTIONKIT_INVALID_OPTION && strstr(attentionkit_last_error(ctx), "mask"),
              "mask for a batch: %d %s", status, attentionkit_last_error(ctx));
        // A varlen batch with no rows at all: nothing to read or write.
        int32_t zeros[2] = {0, 0};
        attentionkit_sequences empty = ATTENTIONKIT_SEQUENCES_INIT;
        empty.form = ATTENTIONKIT_VARLEN;
        empty.count = 1;
        empty.query_offsets = empty.key_offsets = zeros;
        attentionkit_tensor eq = {q.data, ATTENTIONKIT_FLOAT32, 3, {0, hq, d}, {hq * d, d, 1}};
        attentionkit_tensor ek = {k.data, ATTENTIONKIT_BFLOAT16, 3, {0, hkv, d}, {hkv * d, d, 1}};
        attentionkit_tensor eo = {o.data, ATTENTIONKIT_FLOAT32, 3, {0, hq, d}, {hq * d, d, 1}};
        status = attentionkit_attention_sequences(ctx, &empty, &eq, &ek, &ek, &eo, lse, NULL);
        CHECK(status == ATTENTIONKIT_OK, "empty varlen batch: %d %s", status, attentionkit_last_error(ctx));
        seq.form = 7;
        status = attentionkit_attention_sequences(ctx, &seq, &q, &k, &v, &o, NULL, NULL);
        CHECK(status == ATTENTIONKIT_INVALID_ARGUMENT && strstr(attentionkit_last_error(ctx), "form"),
              "unknown form: %d %s", status, attentionkit_last_error(ctx));
        free(q.data);
        free(k.data);
        free(v.data);
        free(o.data);
        free(o2.data);
        free(kp.data);
        free(vp.data);
    }
}

// MARK: Threads: one context, per-thread messages

typedef struct {
    attentionkit_context *ctx;
    int index;
    int ok;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    int64_t s[4] = {1, 2, 16, 8}, st[4] = {256, 128, 8, 1};
    attentionkit_tensor q = make(ATTENTIONKIT_FLOAT32, 4, s, st, 256, 1);
    attentionkit_tensor k = make(ATTENTIONKIT_FLOAT32, 4, s, st, 256, 1);
    attentionkit_tensor v = make(ATTENTIONKIT_FLOAT32, 4, s, st, 256, 1);
    attentionkit_tensor o = make(ATTENTIONKIT_FLOAT32, 4, s, st, 256, 0);
    w->ok = 1;
    for (int round = 0; round < 50; round++) {
        if (w->index % 2) {  // odd threads fail with their own message
            attentionkit_options bad = opts(0, -1, -1, 0, -(float)(w->index + 1));
            char expected[64];
            snprintf(expected, sizeof expected, "%d", -(w->index + 1));
            if (attentionkit_attention(w->ctx, &q, &k, &v, &o, NULL, &bad) != ATTENTIONKIT_INVALID_OPTION ||
                !strstr(attentionkit_last_error(w->ctx), expected))
                w->ok = 0;
        } else if (attentionkit_attention(w->ctx, &q, &k, &v, &o, NULL, NULL) != ATTENTIONKIT_OK ||
                   attentionkit_last_error(w->ctx)[0] != 0 || attentionkit_last_backend(w->ctx)[0] == 0) {
            w->ok = 0;
        }
    }
    free(q.data);
    free(k.data);
    free(v.data);
    free(o.data);
    return NULL;
}

static void threads(attentionkit_context *ctx) {
    pthread_t ids[8];
    worker workers[8];
    for (int i = 0; i < 8; i++) {
        workers[i] = (worker){ctx, i, 0};
        pthread_create(&ids[i], NULL, work, &workers[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(ids[i], NULL);
        CHECK(workers[i].ok, "thread %d saw a wrong status or another thread's message", i);
    }
}

int main(void) {
    setvbuf(stdout, NULL, _IONBF, 0);
    CHECK(attentionkit_version() == ATTENTIONKIT_VERSION, "version %u, header %d", attentionkit_version(),
          ATTENTIONKIT_VERSION);
    CHECK(attentionkit_abi_version() == ATTENTIONKIT_ABI_VERSION, "abi version %u", attentionkit_abi_version());
    char text[32];
    snprintf(text, sizeof text, "%d.%d.%d", ATTENTIONKIT_VERSION_MAJOR, ATTENTIONKIT_VERSION_MINOR,
             ATTENTIONKIT_VERSION_PATCH);
    CHECK(strcmp(attentionkit_version_string(), text) == 0, "version string %s", attentionkit_version_string());

    // Context creation errors.
    attentionkit_context *ctx = (attentionkit_context *)1;
    attentionkit_context_options co = ATTENTIONKIT_CONTEXT_OPTIONS_INIT;
    co.backend = "tpu";
    CHECK(attentionkit_context_create(&co, &ctx) == ATTENTIONKIT_INVALID_CONFIGURATION && ctx == NULL &&
              strstr(attentionkit_last_error(NULL), "tpu"),
          "unknown backend: '%s'", attentionkit_last_error(NULL));
    co.backend = "opencl:99";
    CHECK(attentionkit_context_create(&co, &ctx) == ATTENTIONKIT_INVALID_CONFIGURATION &&
              strstr(attentionkit_last_error(NULL), "99"),
          "missing device: '%s'", attentionkit_last_error(NULL));
    co.backend = "blas";
    co.cpu_isa = "sse9";
    CHECK(attentionkit_context_create(&co, &ctx) == ATTENTIONKIT_INVALID_CONFIGURATION &&
              strstr(attentionkit_last_error(NULL), "sse9"),
          "unknown isa: '%s'", attentionkit_last_error(NULL));
    co = (attentionkit_context_options)ATTENTIONKIT_CONTEXT_OPTIONS_INIT;
    co.struct_size = 4;
    CHECK(attentionkit_context_create(&co, &ctx) == ATTENTIONKIT_INVALID_ARGUMENT, "struct_size");
    CHECK(attentionkit_context_create(NULL, NULL) == ATTENTIONKIT_INVALID_ARGUMENT, "NULL out pointer");
    attentionkit_context_free(NULL);

    const char *backends[] = {"naive", "blas", "auto", "opencl:0"};
    for (size_t i = 0; i < sizeof backends / sizeof backends[0]; i++) {
        co = (attentionkit_context_options)ATTENTIONKIT_CONTEXT_OPTIONS_INIT;
        co.backend = backends[i];
        co.use_environment = 0;
        ctx = NULL;
        attentionkit_status status = attentionkit_context_create(&co, &ctx);
        if (status != ATTENTIONKIT_OK && i == 3) {
            printf("skip opencl:0: %s\n", attentionkit_last_error(NULL));
            continue;
        }
        CHECK(status == ATTENTIONKIT_OK, "create %s: %s", backends[i], attentionkit_last_error(NULL));
        if (status != ATTENTIONKIT_OK) continue;
        int before = failures;
        problems(ctx, backends[i]);
        batches(ctx, backends[i]);
        if (i == 0) errors(ctx);
        if (i == 2) threads(ctx);
        printf("%s: %s (last: %s, %s)\n", backends[i], failures == before ? "ok" : "FAILED",
               attentionkit_last_backend(ctx), attentionkit_last_reason(ctx));
        attentionkit_context_free(ctx);
    }
    // A CPU kernel variant chosen by name (baseline runs everywhere on x86-64; aarch64 has only neon).
#if defined(__x86_64__)
    co = (attentionkit_context_options)ATTENTIONKIT_CONTEXT_OPTIONS_INIT;
    co.backend = "blas";
    co.cpu_isa = "baseline";
    co.threads = 1;
    CHECK(attentionkit_context_create(&co, &ctx) == ATTENTIONKIT_OK, "blas baseline: %s", attentionkit_last_error(NULL));
    problems(ctx, "blas (baseline kernels, 1 thread)");
    attentionkit_context_free(ctx);
#endif
    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}
