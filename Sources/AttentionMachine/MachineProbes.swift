import AttentionCore
import CAttentionCPU
import CBLAS
import Dispatch

/// Measurements of this machine's roofline: how fast OpenBLAS multiplies matrices and how fast all
/// cores together read memory. Each takes a second or two; callers measure once per run.
public enum MachineProbes {
    /// Measures memory read bandwidth in GB/s: `threads` threads (default: all cores) each sum
    /// their share of a `megabytes` buffer with SIMD loads; the best of `repeats` passes.
    public static func measureReadBandwidth(megabytes: Int = 512, repeats: Int = 3, threads: Int? = nil) -> Double {
        let count = megabytes << 18  // floats
        let workers = max(1, threads ?? CPUInfo.logicalCores)
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: count)
        defer { buffer.deallocate() }
        buffer.initialize(repeating: 1, count: count)
        let shared = SharedPointer(buffer)
        let sink = UnsafeMutablePointer<Float>.allocate(capacity: workers)
        defer { sink.deallocate() }
        let sinkShared = SharedPointer(sink)
        // The widest loads this machine has: the read kernel of its best CPU kernel variant.
        let readSum = ak_cpu_kernels_for(CPUISA.best.code)?.pointee.read_sum
        var best = Double.infinity
        for _ in 0..<repeats {
            let start = DispatchTime.now().uptimeNanoseconds
            WorkerPool.shared.run(workers: workers) { w in
                let chunk = (count / workers) & ~63
                sinkShared.pointer[w] = readSum?(shared.pointer + w * chunk, chunk) ?? 0
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
            cblas_sgemm(
                CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(n), Int32(n),
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
