import Foundation

/// The reference: the contract written out line by line, accumulating in `Double`.
///
/// It is slow (O(Nq·Nk·(D+Dv)) scalar work, O(Nk) extra memory per call) and exists to be obviously
/// right; every other backend is tested against it. With fp32 inputs its results are the float64
/// reference of the contract (README, "The contract"), rounded to fp32 once at the end.
/// `reference(_:...)` returns the unrounded Double values for error measurement.
public struct NaiveBackend: AttentionBackend {
    public init() {}

    public var id: BackendID { .naive }

    public func support(for problem: AttentionProblem) -> BackendSupport { .supported }

    /// One row of scores and visibility flags plus one output row, in Double.
    public func workspaceBytes(for problem: AttentionProblem) -> Int { 9 * problem.keyLength + 8 * problem.valueDim }

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

    /// The float64 reference of selected rows only (flat indices into [B, Hq, Nq]): cheap error
    /// measurement on problems too large for a full reference.
    public static func reference(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, value: Tensor, rows: [Int]
    ) -> [(row: Int, output: [Double], logSumExp: Double)] {
        query.storage.withUnsafeBufferPointer { q in
            key.storage.withUnsafeBufferPointer { k in
                value.storage.withUnsafeBufferPointer { v in
                    var scratch = RowScratch(problem)
                    return rows.map { row in
                        let (o, lse) = computeRow(problem, row: row, query: q, key: k, value: v, scratch: &scratch)
                        return (row, o, lse)
                    }
                }
            }
        }
    }

    /// Calls `emit(rowIndex, o_row, lse)` for each query row in [B, Hq, Nq] order.
    static func compute(
        _ p: AttentionProblem,
        query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>, value: UnsafeBufferPointer<Float>,
        emit: (Int, [Double], Double) -> Void
    ) {
        var scratch = RowScratch(p)
        for row in 0..<(p.batch * p.queryHeads * p.queryLength) {
            let (o, lse) = computeRow(p, row: row, query: query, key: key, value: value, scratch: &scratch)
            emit(row, o, lse)
        }
    }

    /// Per-row working memory, reused across rows.
    struct RowScratch {
        var scores: [Double]
        var visible: [Bool]
        init(_ p: AttentionProblem) {
            scores = [Double](repeating: 0, count: p.keyLength)
            visible = [Bool](repeating: false, count: p.keyLength)
        }
    }

    /// Scores and visibility of query `i` of head `h`, batch `b`, into `scratch`: the largest visible
    /// score, and whether a visible score is NaN.
    static func scoreRow(
        _ p: AttentionProblem, batch b: Int, head h: Int, query i: Int,
        query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>, scratch: inout RowScratch
    ) -> (rowMax: Double, poisoned: Bool) {
        let (d, nk) = (p.headDim, p.keyLength)
        let scale = Double(p.scale)
        let softcap = p.options.softcap.map(Double.init)
        let kvBase = (b * p.keyValueHeads + h / p.groupSize) * nk
        let qBase = ((b * p.queryHeads + h) * p.queryLength + i) * d
        let (lo, hi) = p.visibleKeys(forQuery: i)
        var rowMax = -Double.infinity
        var poisoned = false
        for j in 0..<nk {
            // Visibility: causal/window range AND mask.
            var visible = j >= lo && j <= hi
            var s = 0.0
            for c in 0..<d { s += Double(query[qBase + c]) * Double(key[(kvBase + j) * d + c]) }
            s *= scale
            if let cap = softcap { s = cap * tanh(s / cap) }
            if let mask = p.options.mask, let layout = p.maskLayout {
                let m = layout.offset(batch: b, head: h, row: i) + j
                switch mask.values {
                case .boolean(let allowed): if !allowed[m] { visible = false }
                case .additive(let add): s += Double(add[m])
                }
            }
            // A score of -inf (from an additive mask) hides the key like a false mask entry.
            if s == -.infinity { visible = false }
            scratch.scores[j] = s
            scratch.visible[j] = visible
            guard visible else { continue }
            if s.isNaN { poisoned = true } else { rowMax = max(rowMax, s) }
        }
        return (rowMax, poisoned)
    }

    /// Output and log-sum-exp of one query row (flat index into [B, Hq, Nq]), in Double.
    static func computeRow(
        _ p: AttentionProblem, row: Int,
        query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>, value: UnsafeBufferPointer<Float>,
        scratch: inout RowScratch
    ) -> ([Double], Double) {
        let (dv, nq, nk) = (p.valueDim, p.queryLength, p.keyLength)
        let (i, h, b) = (row % nq, (row / nq) % p.queryHeads, row / (nq * p.queryHeads))
        let (rowMax, poisoned) = scoreRow(p, batch: b, head: h, query: i, query: query, key: key, scratch: &scratch)
        if poisoned || rowMax == .infinity {  // NaN, or exp(inf - inf): undefined
            return ([Double](repeating: .nan, count: dv), .nan)
        }
        if rowMax == -.infinity {  // no visible key
            return ([Double](repeating: 0, count: dv), -.infinity)
        }
        let kvBase = (b * p.keyValueHeads + h / p.groupSize) * nk
        var sum = 0.0
        var out = [Double](repeating: 0, count: dv)
        for j in 0..<nk where scratch.visible[j] {
            let pj = exp(scratch.scores[j] - rowMax)
            sum += pj
            let vBase = (kvBase + j) * dv
            for c in 0..<dv { out[c] += pj * Double(value[vBase + c]) }
        }
        for c in 0..<dv { out[c] /= sum }
        return (out, rowMax + log(sum))
    }

    /// The attention probabilities p[i, j] of one head, [Nq][Nk] row-major, in Double, by the same
    /// rules as the reference (scale, softcap, causal, window, mask): `nil` where key j is hidden
    /// from query i, and for every key of a row that sees none or is poisoned by NaN.
    public static func probabilities(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, batch: Int, head: Int
    ) -> [Double?] {
        let (nq, nk) = (problem.queryLength, problem.keyLength)
        var result = [Double?](repeating: nil, count: nq * nk)
        query.storage.withUnsafeBufferPointer { q in
            key.storage.withUnsafeBufferPointer { k in
                var scratch = RowScratch(problem)
                for i in 0..<nq {
                    let (rowMax, poisoned) = scoreRow(
                        problem, batch: batch, head: head, query: i, query: q, key: k, scratch: &scratch)
                    guard !poisoned, rowMax.isFinite else { continue }
                    var sum = 0.0
                    for j in 0..<nk where scratch.visible[j] { sum += exp(scratch.scores[j] - rowMax) }
                    for j in 0..<nk where scratch.visible[j] {
                        result[i * nk + j] = exp(scratch.scores[j] - rowMax) / sum
                    }
                }
            }
        }
        return result
    }
}
