import AttentionCore
import CAttentionCPU

extension CPUISA {
    /// The variant's number in the C kernel layer.
    package var code: Int32 {
        switch self {
        case .baseline: return Int32(AK_ISA_BASELINE)
        case .avx2: return Int32(AK_ISA_AVX2)
        case .avx512: return Int32(AK_ISA_AVX512)
        case .neon: return Int32(AK_ISA_NEON)
        }
    }

    /// Whether this CPU, its operating system and this build can run the variant (CPUID, and the
    /// registers the OS saves on a context switch).
    public var isSupported: Bool { ak_cpu_supports(code) != 0 }

    /// Why the variant cannot run here, or nil when it can.
    public var unsupportedReason: String? {
        isSupported ? nil : String(cString: ak_cpu_unsupported_reason(code))
    }

    /// The widest variant this machine runs.
    public static let best: CPUISA = allCases.first { $0.code == ak_cpu_best_isa() } ?? .baseline

    /// Every variant this machine runs, narrowest first.
    public static var supported: [CPUISA] { allCases.filter(\.isSupported) }

    /// The variant `configuration` asks for (`ATTENTIONKIT_CPU_ISA`), else the widest this machine
    /// runs. A variant this machine cannot run is an error naming the reason, never replaced.
    public static func resolve(_ configuration: AttentionConfiguration) -> Result<CPUISA, AttentionError> {
        switch configuration.cpuISA {
        case .failure(let error): return .failure(error)
        case .success(nil): return .success(.best)
        case .success(let isa?):
            guard let reason = isa.unsupportedReason else { return .success(isa) }
            return .failure(
                .invalidConfiguration(
                    setting: AttentionConfiguration.cpuISAVariable, value: isa.rawValue, reason: reason))
        }
    }
}
