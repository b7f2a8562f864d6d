import Foundation

/// The reference: the contract written out line by line, accumulating in `Double`.
///
/// It is slow (O(Nq·Nk·(D+Dv)) scalar work, O(Nk) extra memory per call) and exists to be obviously
/// right; every other backend is tested against it. With fp32 inputs its results are the float64
/// reference of ATTENTION.md, rounded to fp32 once at the end. `reference(_:...)` returns the
/// unrounded Double values for error measurement.
public struct NaiveBackend: AttentionBackend {
    public init() {}

    public var name: String { "naive" }

    public func support(for problem: AttentionProblem) -> BackendSupport { .supported }

    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        Self.compute(problem, query: buffers.query, key: buffers.key, value: buffers.value) { row, values, lse in
            for (c, x) in values.enumerated() { buffers.output[row * problem.valueDim + c] = Float(x) }
            buffers.logSumExp?[row] = Float(lse)
        }
    }

    /// The float64 reference output [B, Hq, Nq, Dv] and log-sum-exp [B, Hq, Nq], unrounded.
    public static func reference(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, value: Tensor
    ) -> (output: [Double], logSumExp: [Double]) {
        var out = [Double](repeating: 0, count: problem.outputShape.reduce(1, *))
        var lses = [Double](repeating: 0, count: problem.lseShape.reduce(1, *))
        query.storage.withUnsafeBufferPointer { q in
            key.storage.withUnsafeBufferPointer { k in
                value.storage.withUnsafeBufferPointer { v in
                    compute(problem, query: q, key: k, value: v) { row, values, lse in
                        for (c, x) in values.enumerated() { out[row * problem.valueDim + c] = x }
                        lses[row] = lse
                    }
                }
            }
        }
        return (out, lses)
    }

    /// Calls `emit(rowIndex, o_row, lse)` for each query row in [B, Hq, Nq] order.
    static func compute(
        _ p: AttentionProblem,
        query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>, value: UnsafeBufferPointer<Float>,
        emit: (Int, [Double], Double) -> Void
    ) {
        let (d, dv, nq, nk) = (p.headDim, p.valueDim, p.queryLength, p.keyLength)
        let scale = Double(p.scale)
        let softcap = p.options.softcap.map(Double.init)
        var scores = [Double](repeating: 0, count: nk)
        var visible = [Bool](repeating: false, count: nk)
        var out = [Double](repeating: 0, count: dv)

        for b in 0..<p.batch {
            for h in 0..<p.queryHeads {
                let kvHead = h / p.groupSize
                let kvBase = (b * p.keyValueHeads + kvHead) * nk
                for i in 0..<nq {
                    let row = (b * p.queryHeads + h) * nq + i
                    let qBase = row * d
                    let (lo, hi) = p.visibleKeys(forQuery: i)
                    var rowMax = -Double.infinity
                    var poisoned = false
                    for j in 0..<nk {
                        // Visibility: causal/window range AND mask.
                        visible[j] = j >= lo && j <= hi
                        var s = 0.0
                        for c in 0..<d { s += Double(query[qBase + c]) * Double(key[(kvBase + j) * d + c]) }
                        s *= scale
                        if let cap = softcap { s = cap * tanh(s / cap) }
                        if let mask = p.options.mask, let layout = p.maskLayout {
                            let m = layout.offset(batch: b, head: h, row: i) + j
                            switch mask.values {
                            case let .boolean(allowed): if !allowed[m] { visible[j] = false }
                            case let .additive(add): s += Double(add[m])
                            }
                        }
                        // A score of -inf (from an additive mask) hides the key like a false mask entry.
                        if s == -.infinity { visible[j] = false }
                        scores[j] = s
                        guard visible[j] else { continue }
                        if s.isNaN { poisoned = true } else { rowMax = max(rowMax, s) }
                    }
                    if poisoned {
                        emit(row, [Double](repeating: .nan, count: dv), .nan)
                        continue
                    }
                    if rowMax == -.infinity {  // no visible key
                        emit(row, [Double](repeating: 0, count: dv), -.infinity)
                        continue
                    }
                    if rowMax == .infinity {  // +inf score: exp(inf - inf) is undefined
                        emit(row, [Double](repeating: .nan, count: dv), .nan)
                        continue
                    }
                    var sum = 0.0
                    for c in 0..<dv { out[c] = 0 }
                    for j in 0..<nk where visible[j] {
                        let pj = exp(scores[j] - rowMax)
                        sum += pj
                        let vBase = (kvBase + j) * dv
                        for c in 0..<dv { out[c] += pj * Double(value[vBase + c]) }
                    }
                    for c in 0..<dv { out[c] /= sum }
                    emit(row, out, rowMax + log(sum))
                }
            }
        }
    }
}
