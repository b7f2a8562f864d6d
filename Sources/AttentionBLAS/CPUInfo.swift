import CBLAS
import Foundation

/// What the CPU side of this machine is and how fast it multiplies matrices.
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
        switch CPUKernels.processDefault {
        case let .success(kernels): return kernels.isa.description
        case let .failure(error): return "none (\(error))"
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

    /// Measures memory read bandwidth in GB/s: `threads` threads (default: all cores) each sum
    /// their share of a `megabytes` buffer with SIMD loads; the best of `repeats` passes.
    public static func measureReadBandwidth(megabytes: Int = 512, repeats: Int = 3, threads: Int? = nil) -> Double {
        let count = megabytes << 18  // floats
        let workers = max(1, threads ?? logicalCores)
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer { buffer.deallocate() }
        buffer.initialize(repeating: 1, count: count)
        let shared = SharedPointer(buffer)
        let sink = UnsafeMutablePointer<Float>.allocate(capacity: workers)
        defer { sink.deallocate() }
        let sinkShared = SharedPointer(sink)
        let kernels = (try? CPUKernels.processDefault.get()) ?? (try? CPUKernels(isa: .best))
        var best = Double.infinity
        for _ in 0..<repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            WorkerPool.shared.run(workers: workers) { w in
                let chunk = (count / workers) & ~63
                sinkShared.pointer[w] = kernels?.readSum(shared.pointer + w * chunk, count: chunk) ?? 0
            }
            best = min(best, Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9)
        }
        return Double((count / workers) & ~63) * Double(workers) * 4 / best / 1e9
    }

    /// Measures OpenBLAS SGEMM throughput (n × n × n, all OpenBLAS threads): the CPU roofline.
    /// Returns the median GFLOP/s of `repeats` runs after one warm-up.
    public static func measureSGEMM(size n: Int = 2048, repeats: Int = 5) -> Double {
        let a = [Float](repeating: 0.5, count: n * n)
        let b = [Float](repeating: 0.25, count: n * n)
        var c = [Float](repeating: 0, count: n * n)
        var times: [Double] = []
        for rep in 0...repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n),
                        1, a, Int32(n), b, Int32(n), 0, &c, Int32(n))
            let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
            if rep > 0 { times.append(seconds) }
        }
        times.sort()
        return 2 * Double(n) * Double(n) * Double(n) / times[times.count / 2] / 1e9
    }
}

/// A raw pointer handed to worker threads that touch disjoint parts of it.
struct SharedPointer<T>: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<T>
    init(_ pointer: UnsafeMutablePointer<T>) { self.pointer = pointer }
}
