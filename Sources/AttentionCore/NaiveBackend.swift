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
        let inputs = Inputs(problem, buffers.query, buffers.key, buffers.value)
        let o = buffers.output
        let os = o.strides(for: problem.outputShape)
        let (nq, hq) = (problem.queryLength, problem.queryHeads)
        Self.compute(problem, inputs) { row, values, lse in
            let (i, h, b) = (row % nq, (row / nq) % hq, row / (nq * hq))
            for (c, x) in values.enumerated() { o.store(Float(x), os, b, h, i, c) }
            buffers.logSumExp?[row] = Float(lse)
        }
    }

    /// The three inputs as the reference reads them: any layout and storage type, widened to Double.
    struct Inputs {
        let q: TensorView, k: TensorView, v: TensorView
        let qs: Strides, ks: Strides, vs: Strides

        init(_ p: AttentionProblem, _ q: TensorView, _ k: TensorView, _ v: TensorView) {
            (self.q, self.k, self.v) = (q, k, v)
            (qs, ks, vs) = (q.strides(for: p.queryShape), k.strides(for: p.keyShape), v.strides(for: p.valueShape))
        }

        /// Runs `body` with dense fp32 tensors viewed as inputs.
        static func withTensors<R>(
            _ p: AttentionProblem, _ query: Tensor, _ key: Tensor, _ value: Tensor, _ body: (Inputs) -> R
        ) -> R {
            query.storage.withUnsafeBufferPointer { q in
                key.storage.withUnsafeBufferPointer { k in
                    value.storage.withUnsafeBufferPointer { v in
                        body(Inputs(p, TensorView(q), TensorView(k), TensorView(v)))
                    }
                }
            }
        }
    }

    /// The float64 reference output [B, Hq, Nq, Dv] and log-sum-exp [B, Hq, Nq], unrounded.
    public static func reference(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, value: Tensor
    ) -> (output: [Double], logSumExp: [Double]) {
        var out = [Double](repeating: 0, count: problem.outputShape.reduce(1, *))
        var lses = [Double](repeating: 0, count: problem.lseShape.reduce(1, *))
        Inputs.withTensors(problem, query, key, value) { inputs in
            compute(problem, inputs) { row, values, lse in
                for (c, x) in values.enumerated() { out[row * problem.valueDim + c] = x }
                lses[row] = lse
            }
        }
        return (out, lses)
    }

    /// The float64 reference of selected rows only (flat indices into [B, Hq, Nq]): cheap error
    /// measurement on problems too large for a full reference.
    public static func reference(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, value: Tensor, rows: [Int]
    ) -> [(row: Int, output: [Double], logSumExp: Double)] {
        Inputs.withTensors(problem, query, key, value) { inputs in
            var scratch = RowScratch(problem)
            return rows.map { row in
                let (o, lse) = computeRow(problem, row: row, inputs, scratch: &scratch)
                return (row, o, lse)
            }
        }
    }

    /// Calls `emit(rowIndex, o_row, lse)` for each query row in [B, Hq, Nq] order.
    static func compute(_ p: AttentionProblem, _ inputs: Inputs, emit: (Int, [Double], Double) -> Void) {
        var scratch = RowScratch(p)
        for row in 0..<(p.batch * p.queryHeads * p.queryLength) {
            let (o, lse) = computeRow(p, row: row, inputs, scratch: &scratch)
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
        _ p: AttentionProblem, batch b: Int, head h: Int, query i: Int, _ inputs: Inputs, scratch: inout RowScratch
    ) -> (rowMax: Double, poisoned: Bool) {
        let (d, nk) = (p.headDim, p.keyLength)
        let scale = Double(p.scale)
        let softcap = p.options.softcap.map(Double.init)
        let g = h / p.groupSize
        let query = (0..<d).map { Double(inputs.q.load(inputs.qs, b, h, i, $0)) }
        let (lo, hi) = p.visibleKeys(forQuery: i)
        var rowMax = -Double.infinity
        var poisoned = false
        for j in 0..<nk {
            // Visibility: causal/window range AND mask.
            var visible = j >= lo && j <= hi
            var s = 0.0
            for c in 0..<d { s += query[c] * Double(inputs.k.load(inputs.ks, b, g, j, c)) }
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
        _ p: AttentionProblem, row: Int, _ inputs: Inputs, scratch: inout RowScratch
    ) -> ([Double], Double) {
        let (dv, nq, nk) = (p.valueDim, p.queryLength, p.keyLength)
        let (i, h, b) = (row % nq, (row / nq) % p.queryHeads, row / (nq * p.queryHeads))
        let (rowMax, poisoned) = scoreRow(p, batch: b, head: h, query: i, inputs, scratch: &scratch)
        if poisoned || rowMax == .infinity {  // NaN, or exp(inf - inf): undefined
            return ([Double](repeating: .nan, count: dv), .nan)
        }
        if rowMax == -.infinity {  // no visible key
            return ([Double](repeating: 0, count: dv), -.infinity)
        }
        let g = h / p.groupSize
        var sum = 0.0
        var out = [Double](repeating: 0, count: dv)
        for j in 0..<nk where scratch.visible[j] {
            let pj = exp(scratch.scores[j] - rowMax)
            sum += pj
            for c in 0..<dv { out[c] += pj * Double(inputs.v.load(inputs.vs, b, g, j, c)) }
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
        // V is not read for probabilities; K stands in for it (same B, Hkv, Nk).
        Inputs.withTensors(problem, query, key, key) { inputs in
            var scratch = RowScratch(problem)
            for i in 0..<nq {
                let (rowMax, poisoned) = scoreRow(
                    problem, batch: batch, head: head, query: i, inputs, scratch: &scratch)
                guard !poisoned, rowMax.isFinite else { continue }
                var sum = 0.0
                for j in 0..<nk where scratch.visible[j] { sum += exp(scratch.scores[j] - rowMax) }
                for j in 0..<nk where scratch.visible[j] {
                    result[i * nk + j] = exp(scratch.scores[j] - rowMax) / sum
                }
            }
        }
        return result
    }
}
