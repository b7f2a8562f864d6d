// AVX2 + FMA + F16C (Haswell and later, Zen and later).
#if defined(__x86_64__)
#define AK_SUFFIX avx2
#define AK_ISA AK_ISA_AVX2
#define AK_NAME "avx2+fma"
#define AK_TILE_CLASS 1 // 16 registers of 8 floats
#define AK_HAS_F16C 1
#define AK_HAS_FMA 1
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi2"))), apply_to = function)
#include "kernels_impl.h"
#pragma clang attribute pop
#endif
