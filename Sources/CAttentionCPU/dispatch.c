// Which kernel variants this CPU and operating system can run.
#include "attention_cpu.h"

#if defined(__x86_64__)
#include <cpuid.h>

extern const ak_cpu_kernels ak_kernels_baseline;
extern const ak_cpu_kernels ak_kernels_avx2;
extern const ak_cpu_kernels ak_kernels_avx512;

/// XCR0: which register states the OS saves (bit 1 SSE, 2 AVX, 5-7 AVX-512 opmask/ZMM).
static unsigned long long read_xcr0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

static const char *x86_reason(int isa) {
    unsigned int a, b, c, d;
    if (isa == AK_ISA_BASELINE) return "";
    if (isa != AK_ISA_AVX2 && isa != AK_ISA_AVX512) return "not an x86-64 instruction set";
    if (!__get_cpuid(1, &a, &b, &c, &d)) return "CPUID leaf 1 unavailable";
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!avx || !fma || !f16c) return "the CPU lacks AVX, FMA or F16C";
    if (!osxsave) return "the operating system does not enable XSAVE";
    const unsigned long long xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return "the operating system does not save AVX registers (XCR0)";
    if (__get_cpuid_max(0, 0) < 7) return "CPUID leaf 7 unavailable";
    __cpuid_count(7, 0, a, b, c, d);
    const int avx2 = (b >> 5) & 1, bmi2 = (b >> 8) & 1;
    if (!avx2 || !bmi2) return "the CPU lacks AVX2 or BMI2";
    if (isa == AK_ISA_AVX2) return "";
    const int f = (b >> 16) & 1, dq = (b >> 17) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1;
    if (!(f && dq && bw && vl)) return "the CPU lacks AVX-512 F/BW/VL/DQ";
    if ((xcr0 & 0xE6) != 0xE6) return "the operating system does not save AVX-512 registers (XCR0)";
    return "";
}

const char *ak_cpu_unsupported_reason(int isa) { return x86_reason(isa); }

int ak_cpu_supports(int isa) { return x86_reason(isa)[0] == '\0'; }

const ak_cpu_kernels *ak_cpu_kernels_for(int isa) {
    if (!ak_cpu_supports(isa)) return 0;
    switch (isa) {
    case AK_ISA_AVX512: return &ak_kernels_avx512;
    case AK_ISA_AVX2: return &ak_kernels_avx2;
    default: return &ak_kernels_baseline;
    }
}

int ak_cpu_best_isa(void) {
    if (ak_cpu_supports(AK_ISA_AVX512)) return AK_ISA_AVX512;
    if (ak_cpu_supports(AK_ISA_AVX2)) return AK_ISA_AVX2;
    return AK_ISA_BASELINE;
}

#elif defined(__aarch64__)

extern const ak_cpu_kernels ak_kernels_neon;

const char *ak_cpu_unsupported_reason(int isa) {
    return isa == AK_ISA_NEON ? "" : "not an aarch64 instruction set (this CPU runs the neon variant)";
}
int ak_cpu_supports(int isa) { return isa == AK_ISA_NEON; }
const ak_cpu_kernels *ak_cpu_kernels_for(int isa) { return isa == AK_ISA_NEON ? &ak_kernels_neon : 0; }
int ak_cpu_best_isa(void) { return AK_ISA_NEON; }

#else

extern const ak_cpu_kernels ak_kernels_baseline;

const char *ak_cpu_unsupported_reason(int isa) {
    return isa == AK_ISA_BASELINE ? "" : "this architecture has only the portable variant";
}
int ak_cpu_supports(int isa) { return isa == AK_ISA_BASELINE; }
const ak_cpu_kernels *ak_cpu_kernels_for(int isa) { return isa == AK_ISA_BASELINE ? &ak_kernels_baseline : 0; }
int ak_cpu_best_isa(void) { return AK_ISA_BASELINE; }

#endif
