import AttentionCore
import CAttentionCPU
import Foundation

/// An instruction set the CPU kernels are compiled for. Every variant is in every x86-64 build
/// (respectively every aarch64 build); the one used is chosen at run time.
public enum CPUISA: String, Sendable, CaseIterable, Codable, CustomStringConvertible {
    /// x86-64 baseline (SSE2): runs on every x86-64 CPU.
    case baseline
    /// AVX2 + FMA + F16C.
    case avx2
    /// AVX-512 F/BW/VL/DQ.
    case avx512
    /// aarch64 Advanced SIMD (the only variant there).
    case neon

    var code: Int32 {
        switch self {
        case .baseline: return Int32(AK_ISA_BASELINE)
        case .avx2: return Int32(AK_ISA_AVX2)
        case .avx512: return Int32(AK_ISA_AVX512)
        case .neon: return Int32(AK_ISA_NEON)
        }
    }

    /// The variant's name as `attnbench devices` shows it ("avx2+fma", "avx512"...).
    public var description: String {
        ak_cpu_kernels_for(code).map { String(cString: $0.pointee.name) } ?? rawValue
    }

    /// Whether this CPU, its operating system and this build can run the variant.
    public var isSupported: Bool { ak_cpu_supports(code) != 0 }

    /// Why the variant cannot run here, or nil when it can.
    public var unsupportedReason: String? {
        isSupported ? nil : String(cString: ak_cpu_unsupported_reason(code))
    }

    /// The widest variant this machine runs.
    public static let best: CPUISA = allCases.first { $0.code == ak_cpu_best_isa() } ?? .baseline

    /// Every variant this machine runs, narrowest first.
    public static var supported: [CPUISA] { allCases.filter(\.isSupported) }

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

/// The CPU kernel variant a backend calls: a table of C functions compiled for one instruction set.
///
/// The table is static and immutable, so a value can be shared across threads.
public struct CPUKernels: @unchecked Sendable {
    public let isa: CPUISA
    let table: UnsafePointer<ak_cpu_kernels>

    /// The variant for `isa`; throws when this machine cannot run it, naming the reason.
    public init(isa: CPUISA) throws(AttentionError) {
        guard let table = ak_cpu_kernels_for(isa.code) else {
            throw .invalidConfiguration(
                setting: "CPU instruction set", value: isa.rawValue,
                reason: isa.unsupportedReason ?? "not compiled into this build")
        }
        self.isa = isa
        self.table = table
    }

    /// The environment variable that forces a narrower variant: baseline, avx2, avx512 (or neon).
    public static let overrideVariable = "ATTENTIONKIT_CPU_ISA"

    /// The variant a process uses by default: `ATTENTIONKIT_CPU_ISA` when set, else the widest
    /// this machine runs. An unknown or unsupported value is an error naming the reason.
    public static func resolve(environment: [String: String]) -> Result<CPUKernels, AttentionError> {
        guard let value = environment[overrideVariable], !value.isEmpty else {
            return Result { () throws(AttentionError) in try CPUKernels(isa: .best) }
        }
        guard let isa = CPUISA(rawValue: value.lowercased()) else {
            let names = CPUISA.allCases.map(\.rawValue).joined(separator: ", ")
            return .failure(.invalidConfiguration(setting: overrideVariable, value: value, reason: "unknown instruction set (one of \(names))"))
        }
        guard isa.isSupported else {
            return .failure(.invalidConfiguration(setting: overrideVariable, value: value, reason: isa.unsupportedReason ?? "unsupported"))
        }
        return Result { () throws(AttentionError) in try CPUKernels(isa: isa) }
    }

    /// This process's default, from its environment at first use.
    public static let processDefault = resolve(environment: ProcessInfo.processInfo.environment)

    // MARK: Array helpers (tests and probes)

    /// e^x with the kernels' approximation.
    public func exp(_ x: [Float]) -> [Float] { map(x, table.pointee.exp) }

    /// tanh(x) with the kernels' approximation.
    public func tanh(_ x: [Float]) -> [Float] { map(x, table.pointee.tanh) }

    private func map(
        _ x: [Float], _ f: @convention(c) (UnsafePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void
    ) -> [Float] {
        var y = [Float](repeating: 0, count: x.count)
        x.withUnsafeBufferPointer { src in
            y.withUnsafeMutableBufferPointer { dst in
                if let from = src.baseAddress, let to = dst.baseAddress { f(from, to, x.count) }
            }
        }
        return y
    }

    /// The sum of `count` floats (a multiple of 64) read with the widest loads.
    func readSum(_ data: UnsafePointer<Float>, count: Int) -> Float { table.pointee.read_sum(data, count) }
}
