// aarch64: Advanced SIMD is part of the baseline, so this variant needs no target attribute.
#if defined(__aarch64__)
#define AK_SUFFIX neon
#define AK_ISA AK_ISA_NEON
#define AK_NAME "neon"
#define AK_TILE_CLASS 0
#define AK_HAS_F16C 1
#define AK_HAS_FMA 1
#include "kernels_impl.h"
#endif
