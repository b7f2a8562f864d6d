import AttentionCore
import CAttentionCPU
import CBLAS
import Foundation

/// What the CPU side of this machine is: model, cores, caches, clock, OpenBLAS's kernels and the
/// CPU kernel variants it runs. (How fast it computes and reads memory: `MachineProbes`.)
public enum CPUInfo {
    /// The kernel family OpenBLAS selected at load time ("Haswell", "SkylakeX", "Zen"...).
    /// `OPENBLAS_CORETYPE` in the environment overrides its detection.
    public static var openBLASCore: String {
        guard let name = openblas_get_corename() else { return "unknown" }
        return String(cString: name)
    }

    /// Threads OpenBLAS uses for a standalone call.
    public static var openBLASThreads: Int { Int(openblas_get_num_threads()) }

    /// Per-core L2 cache size in bytes (Linux sysfs; 1 MiB when unknown).
    public static let l2CacheBytes: Int = {
        for index in 0..<8 {
            let dir = "/sys/devices/system/cpu/cpu0/cache/index\(index)/"
            guard let level = try? String(contentsOfFile: dir + "level", encoding: .utf8),
                level.trimmingCharacters(in: .whitespacesAndNewlines) == "2",
                let size = try? String(contentsOfFile: dir + "size", encoding: .utf8)
            else { continue }
            let text = size.trimmingCharacters(in: .whitespacesAndNewlines)
            let scale = text.hasSuffix("K") ? 1024 : text.hasSuffix("M") ? 1 << 20 : 1
            if let value = Int(text.trimmingCharacters(in: CharacterSet.decimalDigits.inverted)), value > 0 {
                return value * scale
            }
        }
        return 1 << 20
    }()

    /// The CPU clock the OS reports, in MHz (Linux: /proc/cpuinfo), if any.
    public static var clockMHz: Double? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("cpu MHz") }),
            let colon = line.firstIndex(of: ":")
        else { return nil }
        return Double(line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces))
    }

    /// Logical CPUs available to this process, read once (on Linux Foundation reads cgroup files
    /// for this on every call, which costs tens of microseconds).
    public static let logicalCores: Int = ProcessInfo.processInfo.activeProcessorCount

    /// The SIMD instruction sets the CPU reports (Linux: from /proc/cpuinfo), widest first.
    public static var simdExtensions: [String] {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") })
        else { return [] }
        let flags = Set(line.split(separator: " ").map(String.init))
        return ["avx512f", "avx2", "fma", "avx", "sse4_2", "asimd", "sve"].filter(flags.contains)
    }

    /// The CPU kernel variant this process uses ("avx512", "avx2+fma"...), or why none can be used.
    public static var kernelDescription: String {
        switch CPUISA.resolve(AttentionConfiguration.process) {
        case .success(let isa): return isa.description
        case .failure(let error): return "none (\(error))"
        }
    }

    /// The CPU model name, if the OS reports one.
    public static var modelName: String? {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix("model name") }),
            let colon = line.firstIndex(of: ":")
        else { return nil }
        return line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
    }
}
