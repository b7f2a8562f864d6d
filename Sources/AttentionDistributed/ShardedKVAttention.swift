import AttentionCore
import AttentionKit
import Foundation

/// Decode against a K/V cache sharded across ranks: every rank holds the same queries and a contiguous
/// range of the keys (`keys(of:)`), attends its range, and one all-gather of the partial (O, LSE)
/// rows lets every rank merge them, in rank order, into the full result: the same bits on every rank.
///
/// Any Nq and Nk; causal (bottom-right aligned to the whole cache), windows, softcap, GQA and
/// fp16/bf16 K/V carry over through `AttentionProblem.block`; masks are not taken.
public struct ShardedKVAttention: Sendable {
    public let problem: AttentionProblem
    public let ranks: Int
    public let backend: (any AttentionBackend)?

    public init(problem: AttentionProblem, ranks: Int, backend: (any AttentionBackend)? = nil) throws(AttentionError) {
        guard problem.options.mask == nil else {
            throw .unsupportedOption("sharded-K/V attention does not take a mask (causal and window rules only)")
        }
        guard ranks >= 1 else {
            throw .invalidConfiguration(setting: "ranks", value: "\(ranks)", reason: "at least one rank")
        }
        self.problem = problem
        self.ranks = ranks
        self.backend = backend
    }

    /// The keys rank `rank` holds: [r·Nk/P, (r+1)·Nk/P).
    public func keys(of rank: Int) -> Range<Int> {
        rank * problem.keyLength / ranks..<(rank + 1) * problem.keyLength / ranks
    }

    /// Runs this rank's part: `query` the whole [B, Hq, Nq, D], `key` / `value` this rank's keys
    /// ([B, Hkv, keys(of: rank).count, D / Dv]); `output` (dense fp32 [B, Hq, Nq, Dv]) and `logSumExp`
    /// ([B, Hq, Nq]) get the full result on every rank.
    public func run(
        on communicator: some RingCommunicator, query: TensorView, key: TensorView, value: TensorView,
        output: UnsafeMutableBufferPointer<Float>, logSumExp: UnsafeMutableBufferPointer<Float>
    ) throws(AttentionError) -> RingTimings {
        let rank = communicator.rank
        guard communicator.size == ranks, rank >= 0, rank < ranks else {
            throw .invalidConfiguration(setting: "ranks", value: "\(communicator.size)", reason: "planned for \(ranks)")
        }
        let p = problem
        let range = keys(of: rank)
        let keyShape = [p.batch, p.keyValueHeads, range.count, p.headDim]
        let valueShape = [p.batch, p.keyValueHeads, range.count, p.valueDim]
        try AttentionBuffers(query: query, key: key, value: value, output: TensorView(output), logSumExp: logSumExp)
            .check(
                operands: [
                    ("query", query, p.queryShape, p.storage.query), ("key", key, keyShape, p.storage.keyValue),
                    ("value", value, valueShape, p.storage.keyValue),
                    ("output", TensorView(output), p.outputShape, .f32),
                ], logSumExpCount: p.lseShape.reduce(1, *))
        var timings = RingTimings()
        timings.steps = 1
        let rows = p.batch * p.queryHeads * p.queryLength
        let dv = p.valueDim
        // This rank's partial: [rows × Dv] outputs then [rows] LSE, zero / -inf where it sees nothing.
        var partial = [Float](repeating: 0, count: rows * (dv + 1))
        for r in 0..<rows { partial[rows * dv + r] = -.infinity }
        let started = DispatchTime.now().uptimeNanoseconds
        if let block = p.block(queries: 0..<p.queryLength, keys: range) {
            let sub = try AttentionProblem(
                query: [p.batch, p.queryHeads, block.queries.count, p.headDim],
                key: [p.batch, p.keyValueHeads, block.keys.count, p.headDim],
                value: [p.batch, p.keyValueHeads, block.keys.count, p.valueDim], options: try block.options(of: p),
                storage: StorageTypes(query: p.storage.query, keyValue: p.storage.keyValue, output: .f32))
            var out = [Float](repeating: 0, count: sub.outputShape.reduce(1, *))
            var lse = [Float](repeating: 0, count: sub.lseShape.reduce(1, *))
            let qs = query.strides(for: p.queryShape)
            let (ks, vs) = (key.strides(for: keyShape), value.strides(for: valueShape))
            let firstKey = block.keys.lowerBound - range.lowerBound
            let chosen = backend ?? Dispatcher.process.decide(sub).chosen
            try out.withUnsafeMutableBufferPointer { (o) throws(AttentionError) in
                try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) in
                    try chosen.forward(
                        sub,
                        AttentionBuffers(
                            query: query.advanced(
                                by: qs.offset(batch: 0, head: 0, position: block.queries.lowerBound), strides: qs),
                            key: key.advanced(by: ks.offset(batch: 0, head: 0, position: firstKey), strides: ks),
                            value: value.advanced(by: vs.offset(batch: 0, head: 0, position: firstKey), strides: vs),
                            output: TensorView(o), logSumExp: l))
                }
            }
            let n = block.queries.count
            for bh in 0..<(p.batch * p.queryHeads) {
                for i in 0..<n {
                    let row = bh * p.queryLength + block.queries.lowerBound + i
                    partial[rows * dv + row] = lse[bh * n + i]
                    for c in 0..<dv { partial[row * dv + c] = out[(bh * n + i) * dv + c] }
                }
            }
            timings.blocks = 1
        }
        let computed = DispatchTime.now().uptimeNanoseconds
        timings.computeSeconds = Double(computed - started) * 1e-9
        // Everyone's partials, then the merge in rank order.
        var all = [Float](repeating: 0, count: ranks * partial.count)
        try partial.withUnsafeBufferPointer { (local) throws(AttentionError) in
            try all.withUnsafeMutableBufferPointer { (target) throws(AttentionError) in
                try communicator.allGather(UnsafeRawBufferPointer(local), into: UnsafeMutableRawBufferPointer(target))
            }
        }
        timings.bytesSent = partial.count * 4 * (ranks - 1)
        timings.exposedCommunicationSeconds = Double(DispatchTime.now().uptimeNanoseconds - computed) * 1e-9
        let stride = partial.count
        all.withUnsafeBufferPointer { parts in
            for row in 0..<rows {
                logSumExp[row] = mergePartialRows(
                    count: ranks, valueDim: dv, logSumExp: parts.baseAddress! + rows * dv + row,
                    logSumExpStride: stride, outputs: parts.baseAddress! + row * dv, outputStride: stride,
                    into: output.baseAddress! + row * dv)
            }
        }
        timings.computeSeconds +=
            Double(DispatchTime.now().uptimeNanoseconds - computed) * 1e-9
            - timings.exposedCommunicationSeconds
        return timings
    }
}

extension ShardedKVAttention {
    /// Keys `range` (dimension 2) of a [B, H, N, D] tensor.
    public static func slice(_ tensor: Tensor, keys range: Range<Int>) throws(AttentionError) -> Tensor {
        let s = tensor.shape
        guard s.count == 4, range.lowerBound >= 0, range.upperBound <= s[2] else {
            throw .shapeMismatch("cannot take keys \(range) of a tensor of shape \(s)")
        }
        var values: [Float] = []
        values.reserveCapacity(s[0] * s[1] * range.count * s[3])
        for bh in 0..<(s[0] * s[1]) {
            values += tensor.storage[((bh * s[2] + range.lowerBound) * s[3])..<((bh * s[2] + range.upperBound) * s[3])]
        }
        return try Tensor(shape: [s[0], s[1], range.count, s[3]], storage: values)
    }

    /// Runs every rank in this process (`LocalRing`) on global host tensors; returns rank 0's result
    /// (every rank's is the same bits) and each rank's timings.
    public func runLocally(query: Tensor, key: Tensor, value: Tensor) throws(AttentionError) -> (
        result: AttentionResult, timings: [RingTimings]
    ) {
        guard query.shape == problem.queryShape, key.shape == problem.keyShape, value.shape == problem.valueShape else {
            throw .shapeMismatch(
                "inputs \(query.shape), \(key.shape), \(value.shape) do not match the problem's "
                    + "\(problem.queryShape), \(problem.keyShape), \(problem.valueShape)")
        }
        var shards: [(StoredOperand, StoredOperand, StoredOperand)] = []
        for rank in 0..<ranks {
            shards.append(
                (
                    StoredOperand(query, as: problem.storage.query),
                    StoredOperand(try Self.slice(key, keys: keys(of: rank)), as: problem.storage.keyValue),
                    StoredOperand(try Self.slice(value, keys: keys(of: rank)), as: problem.storage.keyValue)
                ))
        }
        let p = problem
        let shapes: @Sendable (Int) -> (query: [Int], key: [Int], value: [Int], output: [Int], logSumExp: [Int]) = {
            _ in (p.queryShape, p.keyShape, p.valueShape, p.outputShape, p.lseShape)
        }
        let (outputs, lses, timings) = try runRanks(shards, shapes: shapes) {
            (communicator, q, k, v, o, l) throws(AttentionError) in
            try run(on: communicator, query: q, key: k, value: v, output: o, logSumExp: l)
        }
        // Every rank merged the same partials in the same order.
        for rank in 1..<ranks where outputs[rank].storage.map(\.bitPattern) != outputs[0].storage.map(\.bitPattern) {
            throw .backendFailure(backend: "ring", message: "rank \(rank)'s merged result differs from rank 0's")
        }
        return (AttentionResult(output: outputs[0], logSumExp: lses[0]), timings)
    }
}
