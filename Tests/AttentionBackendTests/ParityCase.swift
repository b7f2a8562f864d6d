import AttentionCore
import Foundation
import Testing

/// One problem of the parity sweep: shapes, options, and how the inputs are generated.
struct ParityCase: Sendable, CustomTestStringConvertible {
    var batch = 1
    var heads = (q: 1, kv: 1)
    var nq = 1
    var nk = 1
    var d = 16
    var dv = 16
    var options = AttentionOptions()
    /// Multiplies the inputs (x 20 makes logits large).
    var amplitude: Float = 1
    var seed: UInt64 = 1
    var label = ""

    var testDescription: String {
        var s = "B\(batch) H\(heads.q)/\(heads.kv) Nq\(nq) Nk\(nk) D\(d) Dv\(dv)"
        if options.causal { s += " causal" }
        if let w = options.window { s += " window(\(w.left),\(w.right))" }
        if let m = options.mask { s += m.isBoolean ? " boolmask\(m.shape)" : " floatmask\(m.shape)" }
        if let c = options.softcap { s += " softcap\(c)" }
        if let sc = options.scale { s += " scale\(sc)" }
        if amplitude != 1 { s += " x\(Int(amplitude))" }
        return label.isEmpty ? s : "\(label): \(s)"
    }

    var shapes: (q: [Int], k: [Int], v: [Int]) {
        ([batch, heads.q, nq, d], [batch, heads.kv, nk, d], [batch, heads.kv, nk, dv])
    }

    func inputs() throws -> (Tensor, Tensor, Tensor) {
        let s = shapes
        let r = -amplitude...amplitude
        return (try .random(shape: s.q, seed: seed, in: r), try .random(shape: s.k, seed: seed &+ 1, in: r),
                try .random(shape: s.v, seed: seed &+ 2, in: -1...1))
    }

    /// Naive work in multiply-adds, to keep the sweep affordable.
    var work: Int { batch * heads.q * nq * nk * (d + dv) }
}

/// Runs `backend` and the float64 reference on the case and checks the contract's tolerance.
@discardableResult
func expectParity(_ backend: some AttentionBackend, _ c: ParityCase, sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let (q, k, v) = try c.inputs()
    let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, options: c.options)
    let result = try backend.attention(problem, query: q, key: k, value: v)
    let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
    let report = AccuracyReport(result: result, reference: reference, valueDim: problem.valueDim)
    #expect(report.passed, "\(backend.name) on \(c.testDescription): \(report)", sourceLocation: sourceLocation)
    #expect(report.nmse < 1e-9, "\(backend.name) on \(c.testDescription): NMSE \(report.nmse)", sourceLocation: sourceLocation)
    return result
}

enum Sweep {
    static let lengths = [1, 2, 7, 64, 65, 130, 777]
    static let dims = [1, 3, 32, 64, 80, 128, 256, 512]
    static let headConfigs = [(1, 1), (4, 4), (8, 2), (8, 1)]

    /// Every (Nq, Nk) pair of `lengths`, with head dims, head layouts, batch and features rotating so
    /// that every value of every axis meets every feature somewhere; capped in naive work.
    static func cases() -> [ParityCase] {
        var out: [ParityCase] = []
        var index = 0
        for variant in 0..<2 {
            for (a, nq) in lengths.enumerated() {
                for (b, nk) in lengths.enumerated() {
                    var c = ParityCase()
                    c.nq = nq
                    c.nk = nk
                    c.d = dims[(a * 3 + b + 5 * variant) % dims.count]
                    c.dv = (a + b + variant) % 3 == 0 ? c.d : dims[(a + 2 * b + 1 + variant) % dims.count]
                    c.heads = headConfigs[(a + b + variant) % headConfigs.count]
                    c.batch = 1 + (a * b + variant) % 2
                    c.seed = UInt64(100 + index)
                    let featureIndex = index + 4 * variant
                    c.options = feature(featureIndex, nq: nq, nk: nk, batch: c.batch, heads: c.heads.0, seed: c.seed)
                    // Keep the naive reference affordable: shrink heads, then batch.
                    while c.work > 300_000_000 && (c.heads.0 > 1 || c.batch > 1) {
                        if c.heads.0 > 1 { c.heads = (c.heads.0 / 2, max(1, c.heads.1 / 2)) } else { c.batch = 1 }
                        c.options = feature(featureIndex, nq: nq, nk: nk, batch: c.batch, heads: c.heads.0, seed: c.seed)
                    }
                    out.append(c)
                    index += 1
                }
            }
        }
        return out
    }

    /// The feature mix of case `index`.
    static func feature(_ index: Int, nq: Int, nk: Int, batch: Int, heads: Int, seed: UInt64) -> AttentionOptions {
        var rng = SplitMix64(seed: seed &* 31)
        switch index % 9 {
        case 0: return .init()
        case 1: return .init(causal: true)
        case 2: return .init(window: .init(left: 5, right: 3))
        case 3: return .init(causal: true, window: .init(left: 16, right: 0))
        case 4:  // boolean mask broadcast over batch, ~70% visible, some rows fully hidden
            let allowed = (0..<(heads * nq * nk)).map { i in (i / nk) % 5 != 4 && Double.random(in: 0..<1, using: &rng) < 0.7 }
            return .init(mask: try! AttentionMask(shape: [1, heads, nq, nk], allowed: allowed))
        case 5:  // float mask over [B, 1, Nq, Nk] with -inf entries
            let add = (0..<(batch * nq * nk)).map { _ -> Float in
                Double.random(in: 0..<1, using: &rng) < 0.2 ? -.infinity : Float.random(in: -2...2, using: &rng)
            }
            return .init(mask: try! AttentionMask(shape: [batch, 1, nq, nk], additive: add))
        case 6: return .init(softcap: 5)
        case 7: return .init(scale: 0.9, causal: true)
        default: return .init(softcap: 20, causal: true, window: .init(left: 40, right: -1))
        }
    }
}

/// Runs `backend` on buffers sized exactly for `c`, each followed in memory by NaN, and expects
/// bitwise the output of a plain run: any read past the end would poison it. Also expects nothing
/// written past the end of the outputs.
func expectPaddedRunMatches(_ backend: some AttentionBackend, _ c: ParityCase, sourceLocation: SourceLocation = #_sourceLocation) throws {
    let (q, k, v) = try c.inputs()
    let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, options: c.options)
    let expected = try backend.attention(problem, query: q, key: k, value: v)
    let pad = [Float](repeating: .nan, count: 4096)
    let (qp, kp, vp) = (q.storage + pad, k.storage + pad, v.storage + pad)
    var out = [Float](repeating: .nan, count: expected.output.count + pad.count)
    var lse = [Float](repeating: .nan, count: expected.logSumExp.count + pad.count)
    try qp.withUnsafeBufferPointer { qb in try kp.withUnsafeBufferPointer { kb in try vp.withUnsafeBufferPointer { vb in
        try out.withUnsafeMutableBufferPointer { ob in try lse.withUnsafeMutableBufferPointer { lb in
            try backend.forward(problem, AttentionBuffers(
                query: UnsafeBufferPointer(rebasing: qb[0..<q.count]), key: UnsafeBufferPointer(rebasing: kb[0..<k.count]),
                value: UnsafeBufferPointer(rebasing: vb[0..<v.count]),
                output: UnsafeMutableBufferPointer(rebasing: ob[0..<expected.output.count]),
                logSumExp: UnsafeMutableBufferPointer(rebasing: lb[0..<expected.logSumExp.count])))
        } }
    } } }
    #expect(Array(out[0..<expected.output.count]).map(\.bitPattern) == expected.output.storage.map(\.bitPattern),
            "\(backend.name) on \(c.testDescription)", sourceLocation: sourceLocation)
    #expect(Array(lse[0..<expected.logSumExp.count]).map(\.bitPattern) == expected.logSumExp.storage.map(\.bitPattern),
            sourceLocation: sourceLocation)
    #expect(out[expected.output.count...].allSatisfy { $0.isNaN }, sourceLocation: sourceLocation)
    #expect(lse[expected.logSumExp.count...].allSatisfy { $0.isNaN }, sourceLocation: sourceLocation)
}
