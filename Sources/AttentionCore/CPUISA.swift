/// An instruction set the CPU kernels are compiled for. Every x86-64 build contains the baseline,
/// AVX2 and AVX-512 variants (every aarch64 build the NEON one); which runs is chosen at run time
/// (`AttentionMachine` says what this machine supports).
public enum CPUISA: String, Sendable, CaseIterable, Codable, CustomStringConvertible {
    /// x86-64 baseline (SSE2): runs on every x86-64 CPU.
    case baseline
    /// AVX2 + FMA + F16C.
    case avx2
    /// AVX-512 F/BW/VL/DQ.
    case avx512
    /// aarch64 Advanced SIMD (the only variant there).
    case neon

    /// The name `attnbench devices` shows.
    public var description: String {
        switch self {
        case .baseline: return "baseline"
        case .avx2: return "avx2+fma"
        case .avx512: return "avx512"
        case .neon: return "neon"
        }
    }

    /// Peak single-precision FLOPs per cycle and core with this variant's vectors and FMA
    /// (two vector FMA pipes; the baseline has separate SSE multiply and add).
    public var peakFlopsPerCycle: Double {
        switch self {
        case .baseline: return 8
        case .avx2: return 32
        case .avx512: return 64
        case .neon: return 16
        }
    }
}
