/*
 * AttentionKit's C ABI: transformer attention from C, C++, Rust, Python (ctypes) or anything that
 * can call C. Link with -lAttentionKitC (libAttentionKitC.so, built by
 * `swift build -c release --product AttentionKitC`).
 *
 * Semantics are those of the Swift library (ATTENTION.md): bottom-right causal, sliding windows,
 * masks, softcap, GQA (Hq a multiple of Hkv), fully masked rows give zero output and -inf
 * log-sum-exp, arithmetic in fp32 whatever the storage type.
 *
 * Tensors are described, never copied: a data pointer, a storage type, a shape and element strides
 * (the layouts of a KV cache, a fused QKV projection, a transposed PyTorch view). The last
 * dimension of Q, K, V and O must be contiguous (stride 1); other strides must not be negative.
 * The library reads at most the elements the shape and strides name; it cannot know how large
 * your allocation is, so a descriptor that names memory you do not own is your bug, as in BLAS.
 *
 * Errors: every call returns an attentionkit_status; on failure, attentionkit_last_error(context)
 * gives a one-line message naming the problem (tensor, dimension, stride, offset, device). Nothing
 * aborts, exits or prints.
 *
 * Threads: a context may be used by several threads at once. The library's state is immutable after
 * creation; the strings returned by attentionkit_last_error, attentionkit_last_backend and
 * attentionkit_last_reason are kept per context *and per calling thread*, so concurrent callers
 * never see one another's messages. Each string stays valid until the same thread's next call on
 * the same context, or until the context is freed. Outputs must not be touched by other threads
 * until the call returns; outputs of concurrent calls must not overlap.
 */
#ifndef ATTENTIONKIT_H
#define ATTENTIONKIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The library version this header describes; attentionkit_version() gives the loaded one. */
#define ATTENTIONKIT_VERSION_MAJOR 1
#define ATTENTIONKIT_VERSION_MINOR 1
#define ATTENTIONKIT_VERSION_PATCH 0
#define ATTENTIONKIT_VERSION \
    (ATTENTIONKIT_VERSION_MAJOR * 10000 + ATTENTIONKIT_VERSION_MINOR * 100 + ATTENTIONKIT_VERSION_PATCH)
/** Bumped only when a struct layout or a function signature changes incompatibly. */
#define ATTENTIONKIT_ABI_VERSION 1

/** Return codes. Stable numeric values. */
typedef enum attentionkit_status {
    ATTENTIONKIT_OK = 0,
    /** A NULL where a pointer is required, an unknown enum value (dtype, form), a struct_size too small. */
    ATTENTIONKIT_INVALID_ARGUMENT = 1,
    /** Ranks, shapes, head counts, strides, overlapping outputs, offsets, lengths, page tables. */
    ATTENTIONKIT_INVALID_SHAPE = 2,
    /** A known storage type this operand cannot have (BOOL for Q, FLOAT16 for a mask), or K and V of
        different types. */
    ATTENTIONKIT_INVALID_DTYPE = 3,
    /** Scale, softcap, window or mask values outside the contract. */
    ATTENTIONKIT_INVALID_OPTION = 4,
    /** The chosen backend cannot run this problem (the message says why). */
    ATTENTIONKIT_UNSUPPORTED = 5,
    /** The backend failed while running (an OpenCL error, a kernel that did not build). */
    ATTENTIONKIT_BACKEND_FAILURE = 6,
    /** An unknown backend name or CPU instruction set, or a device this machine lacks. */
    ATTENTIONKIT_INVALID_CONFIGURATION = 7,
} attentionkit_status;

/** Storage types. Arithmetic is fp32 for all of them. */
typedef enum attentionkit_dtype {
    ATTENTIONKIT_FLOAT32 = 0,
    ATTENTIONKIT_FLOAT16 = 1,  /**< IEEE binary16 */
    ATTENTIONKIT_BFLOAT16 = 2, /**< the upper half of a binary32 */
    ATTENTIONKIT_BOOL = 3,     /**< masks only: one byte per element, nonzero = may attend */
} attentionkit_dtype;

/**
 * A tensor in caller-owned memory. `shape[i]` and `strides[i]` (in elements, not bytes) for
 * i < rank; entries past `rank` are ignored. Strides of 0 broadcast an input (the same rows for every
 * batch entry or head); the output's elements must not share memory.
 *
 * Q, K, V, O of attentionkit_attention: rank 4, [B, H, N, D] in that order whatever the memory
 * order: a [B, N, H, D] buffer is shape {B, H, N, D} with strides {N*H*D, D, H*D, 1}.
 */
typedef struct attentionkit_tensor {
    void *data;
    int32_t dtype; /**< an attentionkit_dtype */
    int32_t rank;
    int64_t shape[4];
    int64_t strides[4];
} attentionkit_tensor;

/** Everything about a call except the tensors. Start from ATTENTIONKIT_OPTIONS_INIT. */
typedef struct attentionkit_options {
    /** sizeof(attentionkit_options) as the caller compiled it: lets later versions add fields. */
    uint32_t struct_size;
    /** Nonzero: bottom-right aligned causal masking (query i sees key j iff j <= i + Nk - Nq). */
    int32_t causal;
    /** Sliding window: query i (at key position i + Nk - Nq) sees keys [i' - left, i' + right];
        -1 leaves a side unbounded (both -1: no window). */
    int64_t window_left;
    int64_t window_right;
    /** Multiplies q.k; 0 means 1/sqrt(D). */
    float scale;
    /** If > 0, scores become softcap * tanh(score / softcap) after scaling; 0 means none. */
    float softcap;
    /** Optional mask, broadcast over [B|1, Hq|1, Nq, Nk] (rank 2 to 4, leading dimensions may be
        omitted or have stride 0). ATTENTIONKIT_BOOL: nonzero = may attend; ATTENTIONKIT_FLOAT32:
        added to the score after softcap (-INFINITY hides the key). Combined with causal and window
        by AND. At most 2^31 elements. Not accepted for batches of sequences. NULL: none. */
    const attentionkit_tensor *mask;
} attentionkit_options;

#define ATTENTIONKIT_OPTIONS_INIT {sizeof(attentionkit_options), 0, -1, -1, 0.0f, 0.0f, NULL}

/** How a context picks its backend. Start from ATTENTIONKIT_CONTEXT_OPTIONS_INIT. */
typedef struct attentionkit_context_options {
    uint32_t struct_size;
    /** "auto" or NULL: the dispatcher chooses per call, by hardware and problem, and says why;
        "naive" (float64 reference), "blas", "opencl" (device 0) or "opencl:N". */
    const char *backend;
    /** Worker threads of the CPU backend; 0: one per core. */
    int32_t threads;
    /** CPU kernel variant: NULL for the widest this CPU runs, or "baseline", "avx2", "avx512". */
    const char *cpu_isa;
    /** Nonzero: also honour the ATTENTIONKIT_* environment variables (backend override, CPU ISA,
        OpenCL library, cache folder), as Swift callers of AttentionKit do. Zero: only this struct. */
    int32_t use_environment;
} attentionkit_context_options;

#define ATTENTIONKIT_CONTEXT_OPTIONS_INIT {sizeof(attentionkit_context_options), NULL, 0, NULL, 1}

/** A backend choice plus its configuration. Create once, use from any thread, free once. */
typedef struct attentionkit_context attentionkit_context;

/** The loaded library's version, major * 10000 + minor * 100 + patch (compare with
    ATTENTIONKIT_VERSION). */
uint32_t attentionkit_version(void);
/** The same as text, e.g. "1.1.0". Static storage. */
const char *attentionkit_version_string(void);
/** The loaded library's ABI version (compare with ATTENTIONKIT_ABI_VERSION). */
uint32_t attentionkit_abi_version(void);

/** Creates a context. `options` may be NULL (auto, all cores, environment honoured). On failure
    `*context` is NULL and attentionkit_last_error(NULL) says why. */
attentionkit_status attentionkit_context_create(
    const attentionkit_context_options *options, attentionkit_context **context);

/** Frees a context and every string it handed out. NULL is ignored. */
void attentionkit_context_free(attentionkit_context *context);

/** The message of this thread's last call on `context` if it failed ("" after a success or before any
    call). With a NULL context: of this thread's last failed call that had no context (a failed
    attentionkit_context_create, or a call given a NULL context). */
const char *attentionkit_last_error(const attentionkit_context *context);

/** The backend of this thread's last successful attention call on `context` ("blas", "opencl:0",
    "naive"; "" before the first), and why it was chosen (the dispatcher's one-line reason). With an
    "auto" context, a backend that fails at run time (an OpenCL build, allocation or enqueue) hands
    the call to the next candidate: the backend is then the one that produced the outputs, and the
    reason ends with "; ran on blas (after opencl:0 failed: <call> failed with <status>)". */
const char *attentionkit_last_backend(const attentionkit_context *context);
const char *attentionkit_last_reason(const attentionkit_context *context);

/**
 * Attention of one problem into caller-owned memory.
 *   query  [B, Hq, Nq, D]   FLOAT32, FLOAT16 or BFLOAT16
 *   key    [B, Hkv, Nk, D]  FLOAT32, FLOAT16 or BFLOAT16 (the same type as value)
 *   value  [B, Hkv, Nk, Dv]
 *   output [B, Hq, Nq, Dv]  any of the three types; must not overlap the inputs or itself
 *   log_sum_exp: NULL, or B * Hq * Nq dense floats ([B, Hq, Nq], natural log)
 *   options: NULL for the defaults
 */
attentionkit_status attentionkit_attention(
    attentionkit_context *context, const attentionkit_tensor *query, const attentionkit_tensor *key,
    const attentionkit_tensor *value, const attentionkit_tensor *output, float *log_sum_exp,
    const attentionkit_options *options);

/** Batches of sequences of different lengths (ATTENTION.md, "Batches of sequences"). */
typedef enum attentionkit_sequence_form {
    /** flash_attn_varlen_func: Q [totalQ, Hq, D], K [totalK, Hkv, D], V [totalK, Hkv, Dv],
        O [totalQ, Hq, Dv] (rank 3), LSE [totalQ, Hq]; query_offsets and key_offsets hold count + 1
        non-decreasing offsets starting at 0 (cu_seqlens). */
    ATTENTIONKIT_VARLEN = 1,
    /** flash_attn_with_kvcache: Q [B, Hq, Nq, D], K/V caches [B, Hkv, capacity, D] (any strides),
        O [B, Hq, Nq, Dv], LSE [B, Hq, Nq]; sequence b sees keys [0, lengths[b]). */
    ATTENTIONKIT_CACHE_LENGTHS = 2,
    /** Paged K/V (vLLM): Q and O as for cache lengths; K and V are pools of pages
        [numPages, pageSize, Hkv, D] (this order; any strides), pageSize a power of two 1-1024;
        block_table [count, max_pages] of int32 page indices (row-major, dense); sequence b sees
        keys [0, lengths[b]) on pages block_table[b][0..]. */
    ATTENTIONKIT_PAGED = 3,
} attentionkit_sequence_form;

typedef struct attentionkit_sequences {
    uint32_t struct_size;
    int32_t form; /**< an attentionkit_sequence_form */
    int64_t count; /**< sequences */
    const int32_t *query_offsets; /**< VARLEN: count + 1 */
    const int32_t *key_offsets;   /**< VARLEN: count + 1 */
    const int32_t *lengths;       /**< CACHE_LENGTHS and PAGED: count */
    const int32_t *block_table;   /**< PAGED: count * max_pages */
    int64_t max_pages;            /**< PAGED: columns of block_table */
} attentionkit_sequences;

#define ATTENTIONKIT_SEQUENCES_INIT {sizeof(attentionkit_sequences), 0, 0, NULL, NULL, NULL, NULL, 0}

/** Attention of a batch of sequences, each with every option applied to itself (causal aligned to
    its own length). Masks are refused (ATTENTIONKIT_INVALID_OPTION). */
attentionkit_status attentionkit_attention_sequences(
    attentionkit_context *context, const attentionkit_sequences *sequences, const attentionkit_tensor *query,
    const attentionkit_tensor *key, const attentionkit_tensor *value, const attentionkit_tensor *output,
    float *log_sum_exp, const attentionkit_options *options);

#ifdef __cplusplus
}
#endif

#endif /* ATTENTIONKIT_H */
