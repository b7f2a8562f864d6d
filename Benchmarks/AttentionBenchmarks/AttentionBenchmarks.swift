// Regression benchmarks (ordo-one/benchmark). Run from the repository root:
//   ATTENTIONKIT_BENCHMARKS=1 swift package benchmark
// See the README's "Benchmarks" section for the baseline workflow.
import AttentionKit
import Benchmark
import Foundation

/// A standard shape, by the names used across AttentionKit.
struct Shape {
    let name: String
    let q: [Int], k: [Int], v: [Int]
    let causal: Bool
}

let shapes = [
    Shape(name: "small-128", q: [4, 8, 128, 64], k: [4, 8, 128, 64], v: [4, 8, 128, 64], causal: false),
    Shape(name: "prefill-512", q: [1, 8, 512, 64], k: [1, 8, 512, 64], v: [1, 8, 512, 64], causal: false),
    Shape(name: "prefill-2k", q: [1, 8, 2048, 64], k: [1, 8, 2048, 64], v: [1, 8, 2048, 64], causal: false),
    Shape(name: "causal-2k", q: [1, 8, 2048, 64], k: [1, 8, 2048, 64], v: [1, 8, 2048, 64], causal: true),
    Shape(name: "decode-4k", q: [1, 32, 1, 128], k: [1, 8, 4096, 128], v: [1, 8, 4096, 128], causal: false),
]

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
            let problem: AttentionProblem
            let tensors: (Tensor, Tensor, Tensor)
            do {
                problem = try AttentionProblem(query: shape.q, key: shape.k, value: shape.v, options: .init(causal: shape.causal))
                tensors = (try .random(shape: shape.q, seed: 1), try .random(shape: shape.k, seed: 2), try .random(shape: shape.v, seed: 3))
            } catch {
                fatalError("benchmark setup: \(error)")  // fixed shapes: cannot happen
            }
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

    Benchmark("problem validation + selection", configuration: .init(metrics: [.wallClock, .mallocCountTotal], maxIterations: 10_000)) { benchmark in
        for _ in benchmark.scaledIterations {
            let problem = try AttentionProblem(query: [1, 32, 1, 128], key: [1, 8, 4096, 128], value: [1, 8, 4096, 128], options: .init(causal: true))
            blackHole(try BackendSelection.select(.auto, for: problem))
        }
    }

    // The dispatcher's decision alone, on a causal prefill (its cost model walks the rows once).
    let dispatcher = Dispatcher.current()
    let causal = try? AttentionProblem(query: [1, 8, 2048, 64], key: [1, 8, 2048, 64], value: [1, 8, 2048, 64], options: .init(causal: true))
    Benchmark("dispatch decision", configuration: .init(metrics: [.wallClock, .mallocCountTotal], maxIterations: 10_000)) { benchmark in
        guard let causal else { return }
        for _ in benchmark.scaledIterations {
            blackHole(dispatcher.decide(causal).winner.backend)
        }
    }
}
