// Regression benchmarks (ordo-one/benchmark). Run from the repository root:
//   ATTENTIONKIT_BENCHMARKS=1 swift package benchmark
// See the README's "Benchmarks" section for the baseline workflow.
import AttentionKit
import AttentionVerification
import Benchmark
import Foundation

/// Standard shapes (shared with attnbench through AttentionVerification) that the suites time.
let shapes = ["small-128", "prefill-512", "prefill-2k", "causal-2k", "decode-4k"].compactMap { name in
    ShapeSpec.standard.first { $0.name == name }
}

let gflopsMetric = BenchmarkMetric.custom("GFLOPS", polarity: .prefersLarger, useScalingFactor: false)

let benchmarks: @Sendable () -> Void = {
    Benchmark.defaultConfiguration = .init(
        metrics: [.wallClock, .throughput, .peakMemoryResident, .mallocCountTotal, gflopsMetric],
        warmupIterations: 1, maxDuration: .seconds(3), maxIterations: 50)

    // Each backend on the shapes that suit it: the naive reference only where it takes about a
    // second; every OpenCL device (none on machines without OpenCL).
    var backends: [(any AttentionBackend, maxFlops: Double)] = [(BLASBackend(), .infinity), (NaiveBackend(), 1e9)]
    backends += OpenCLRuntime.availableDevices.indices.map { (OpenCLBackend(device: $0), .infinity) }
    for shape in shapes {
        for (backend, maxFlops) in backends {
            guard let problem = try? shape.problem(), let tensors = try? shape.inputs() else { continue }
            // The naive reference only on shapes it finishes in about a second.
            guard problem.flops <= maxFlops else { continue }
            Benchmark("\(backend.name) \(shape.name)") { benchmark in
                for _ in benchmark.scaledIterations {
                    let start = DispatchTime.now().uptimeNanoseconds
                    blackHole(try backend.attention(problem, query: tensors.0, key: tensors.1, value: tensors.2))
                    let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                    benchmark.measurement(gflopsMetric, Int(problem.flops / seconds / 1e9))
                }
            }
        }
    }

    Benchmark(
        "problem validation + selection",
        configuration: .init(metrics: [.wallClock, .mallocCountTotal], maxIterations: 10_000)
    ) { benchmark in
        for _ in benchmark.scaledIterations {
            let problem = try AttentionProblem(
                query: [1, 32, 1, 128], key: [1, 8, 4096, 128], value: [1, 8, 4096, 128], options: .init(causal: true))
            blackHole(try BackendSelection.select(.auto, for: problem))
        }
    }

    // The dispatcher's decision alone, on a causal prefill (its cost model walks the rows once).
    let dispatcher = Dispatcher.process
    let causal = try? AttentionProblem(
        query: [1, 8, 2048, 64], key: [1, 8, 2048, 64], value: [1, 8, 2048, 64], options: .init(causal: true))
    Benchmark(
        "dispatch decision", configuration: .init(metrics: [.wallClock, .mallocCountTotal], maxIterations: 10_000)
    ) { benchmark in
        guard let causal else { return }
        for _ in benchmark.scaledIterations {
            blackHole(dispatcher.decide(causal).winner.backend)
        }
    }
}
