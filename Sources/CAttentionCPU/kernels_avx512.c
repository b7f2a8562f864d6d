// AVX-512 F/BW/VL/DQ (Skylake-SP and later, Zen 4 and later): one 16-float vector per register.
#if defined(__x86_64__)
#define AK_SUFFIX avx512
#define AK_ISA AK_ISA_AVX512
#define AK_NAME "avx512"
#define AK_TILE_CLASS 2 // 32 registers of 16 floats
#define AK_HAS_F16C 1
#define AK_HAS_FMA 1
#define AK_HAS_SCALEF 1 // vscalefps builds 2^k in exp16
#include <immintrin.h>
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2"))), \
                             apply_to = function)
#include "kernels_impl.h"
#pragma clang attribute pop
#endif
