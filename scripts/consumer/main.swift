// The consumer check's program: what a new user of AttentionKit writes first.
//
//   consumer          one BLAS and one `.auto` call, a two-backend split and a two-rank ring (AttentionDistributed,
//                     ranks as threads), each checked against the naive reference
//   consumer bench [N]  median milliseconds over N runs (default 20) of BLAS on prefill-2k and decode-4k (for the README's
//                     comparison with `attnbench run --repeat` in the project's own build)
import AttentionDistributed
import AttentionKit
import Foundation

/// The largest |a - b| and whether every element is within the contract's fp32 tolerance
/// |a - b| <= 3e-4 + 2e-5 |b| (README, "The contract").
func compare(_ a: Tensor, _ b: Tensor) -> (maxError: Float, passed: Bool) {
    var worst: Float = 0
    var passed = a.shape == b.shape
    for (x, y) in zip(a.storage, b.storage) {
        let error = abs(x - y)
        worst = max(worst, error)
        if !(error <= 3e-4 + 2e-5 * abs(y)) { passed = false }
    }
    return (worst, passed)
}

func check() throws -> Bool {
    let options = AttentionOptions(causal: true)
    let q = try Tensor.random(shape: [2, 8, 77, 64], seed: 1)
    let k = try Tensor.random(shape: [2, 2, 300, 64], seed: 2)
    let v = try Tensor.random(shape: [2, 2, 300, 64], seed: 3)
    let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, options: options)
    let reference = try NaiveBackend().attention(problem, query: q, key: k, value: v)
    let selection = try BackendSelection.select(.auto, for: problem)
    var passed = true
    let runs: [(String, any AttentionBackend)] = [
        ("blas", BLASBackend()), ("auto -> \(selection.backend.name)", selection.backend),
    ]
    var results: [(String, AttentionResult)] = []
    for (label, backend) in runs {
        results.append((label, try backend.attention(problem, query: q, key: k, value: v)))
    }
    let split = try MultiDeviceBackend(members: [BLASBackend(), NaiveBackend()], split: .keys)
    results.append(("multi (keys split)", try split.attention(problem, query: q, key: k, value: v)))
    let sharded = try ShardedKVAttention(problem: problem, ranks: 2)
    results.append(("2-rank sharded K/V", try sharded.runLocally(query: q, key: k, value: v).result))
    for (label, result) in results {
        let (error, ok) = compare(result.output, reference.output)
        print("consumer: \(label): max abs error \(error) vs naive: \(ok ? "pass" : "FAIL")")
        passed = passed && ok
    }
    print("consumer: CPU kernels \(CPUInfo.kernelDescription)")
    return passed
}

func medianMilliseconds(_ backend: BLASBackend, _ shape: (q: [Int], k: [Int]), runs: Int) throws -> Double {
    let q = try Tensor.random(shape: shape.q, seed: 1)
    let k = try Tensor.random(shape: shape.k, seed: 2)
    let v = try Tensor.random(shape: shape.k, seed: 3)
    let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape)
    let warmUpEnd = DispatchTime.now().uptimeNanoseconds + 300_000_000
    while DispatchTime.now().uptimeNanoseconds < warmUpEnd {
        _ = try backend.attention(problem, query: q, key: k, value: v)
    }
    var times: [Double] = []
    for _ in 0..<runs {
        let start = DispatchTime.now().uptimeNanoseconds
        _ = try backend.attention(problem, query: q, key: k, value: v)
        times.append(Double(DispatchTime.now().uptimeNanoseconds - start) / 1e6)
    }
    return times.sorted()[times.count / 2]
}

do {
    if CommandLine.arguments.dropFirst().first == "bench" {
        let runs = CommandLine.arguments.dropFirst(2).first.flatMap { Int($0) }.map { max(1, $0) } ?? 20
        let blas = BLASBackend()
        let prefill = try medianMilliseconds(blas, ([1, 8, 2048, 64], [1, 8, 2048, 64]), runs: runs)
        let decode = try medianMilliseconds(blas, ([1, 32, 1, 128], [1, 8, 4096, 128]), runs: runs)
        print("consumer bench: kernels \(CPUInfo.kernelDescription): prefill-2k \(prefill) ms, decode-4k \(decode) ms")
    } else if try !check() {
        exit(1)
    }
} catch {
    print("consumer: \(error)")
    exit(1)
}
