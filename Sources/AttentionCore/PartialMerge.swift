import Foundation

extension AttentionResult {
    /// The exact attention result over the union of disjoint key ranges, from the results over each
    /// range (FlashInfer's `merge_state`): per query row, with M the largest part LSE,
    /// O = Σ e^(lse_r − M)·O_r / Σ e^(lse_r − M) and LSE = M + log Σ e^(lse_r − M). Parts are summed in
    /// the order given, so the result is bitwise reproducible. The contract's conventions carry over: a
    /// row no part saw (every LSE −∞, O 0) stays O = 0, LSE = −∞; a part row that is NaN makes the row NaN.
    /// Parts must share the output shape [..., Dv] and the LSE shape [...] (the output's without Dv).
    public static func merging(_ parts: [AttentionResult]) throws(AttentionError) -> AttentionResult {
        let (shape, lseShape) = try checkPartialShapes(parts.map { ($0.output.shape, $0.logSumExp.shape) })
        let first = parts[0]
        let dv = shape[shape.count - 1]
        let rows = first.logSumExp.count
        let count = parts.count
        var output = try Tensor(shape: shape, name: "merged output")
        var logSumExp = try Tensor(shape: lseShape, name: "merged log-sum-exp")
        // One row's parts side by side, then the shared row merge.
        var rowOutputs = [Float](repeating: 0, count: count * dv)
        var rowLSE = [Float](repeating: 0, count: count)
        output.withUnsafeMutableBufferPointer { out in
            logSumExp.withUnsafeMutableBufferPointer { lse in
                for row in 0..<rows {
                    for (r, part) in parts.enumerated() {
                        rowLSE[r] = part.logSumExp.storage[row]
                        for c in 0..<dv { rowOutputs[r * dv + c] = part.output.storage[row * dv + c] }
                    }
                    lse[row] = mergePartialRows(
                        count: count, valueDim: dv, logSumExp: rowLSE, logSumExpStride: 1, outputs: rowOutputs,
                        outputStride: dv, into: out.baseAddress! + row * dv)
                }
            }
        }
        return AttentionResult(output: output, logSumExp: logSumExp)
    }
}

/// The output and log-sum-exp shapes partial results share ([..., Dv] and [...]), checked: at least one
/// part, Dv present, every part alike; a `shapeMismatch` naming the first part that differs otherwise.
/// (`AttentionResult.merging` and the OpenCL device merge check their parts through this.)
public func checkPartialShapes(_ parts: [(output: [Int], logSumExp: [Int])]) throws(AttentionError) -> (
    output: [Int], logSumExp: [Int]
) {
    guard let first = parts.first else { throw .shapeMismatch("merging needs at least one partial result") }
    guard first.output.count > 0, first.logSumExp == Array(first.output.dropLast()) else {
        throw .shapeMismatch(
            "partial result 0: output \(first.output) and log-sum-exp \(first.logSumExp) do not match "
                + "([..., Dv] and [...])")
    }
    for (index, part) in parts.enumerated().dropFirst()
    where part.output != first.output || part.logSumExp != first.logSumExp {
        throw .shapeMismatch(
            "partial result \(index) has output \(part.output) and log-sum-exp \(part.logSumExp); "
                + "partial result 0 has \(first.output) and \(first.logSumExp)")
    }
    return first
}

/// The exact merge of `count` partial results of one query row: part r's LSE at
/// `logSumExp[r * logSumExpStride]`, its Dv outputs at `outputs + r * outputStride`. Writes
/// O = Σ e^(lse_r − M)·O_r / Σ e^(lse_r − M) to `target` and returns M + log Σ e^(lse_r − M), in part
/// order; a row no part saw gives 0 / −∞, a NaN part NaN. (`AttentionResult.merging` and the BLAS
/// backend's split-KV decode both merge through this.)
public func mergePartialRows(
    count: Int, valueDim dv: Int, logSumExp: UnsafePointer<Float>, logSumExpStride: Int,
    outputs: UnsafePointer<Float>, outputStride: Int, into target: UnsafeMutablePointer<Float>
) -> Float {
    var m = -Float.infinity
    var poisoned = false
    for r in 0..<count {
        let x = logSumExp[r * logSumExpStride]
        if x.isNaN { poisoned = true } else if x > m { m = x }
    }
    target.update(repeating: poisoned ? .nan : 0, count: dv)
    guard !poisoned else { return .nan }
    guard m != -.infinity else { return -.infinity }
    var total: Float = 0
    for r in 0..<count {
        let weight = expf(logSumExp[r * logSumExpStride] - m)
        guard weight > 0 else { continue }
        total += weight
        let source = outputs + r * outputStride
        for c in 0..<dv { target[c] += weight * source[c] }
    }
    let inverse = 1 / total
    for c in 0..<dv { target[c] *= inverse }
    return m + logf(total)
}
