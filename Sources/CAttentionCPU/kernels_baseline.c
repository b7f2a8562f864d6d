// The portable variant: x86-64 baseline (SSE2) or any other architecture without its own variant.
#if !defined(__aarch64__)
#define AK_SUFFIX baseline
#define AK_ISA AK_ISA_BASELINE
#define AK_NAME "baseline"
#define AK_TILE_CLASS 0
#define AK_HAS_F16C 0
#define AK_HAS_FMA 0
#include "kernels_impl.h"
#endif
