import AttentionCore

/// One problem to check a backend on: shapes, options, and how its inputs are generated.
///
/// Inputs are reproducible: Q and K uniform in [-amplitude, amplitude] from seeds `seed` and
/// `seed + 1`, V uniform in [-1, 1] from `seed + 2` (amplitude 20 makes logits large).
public struct VerificationCase: Sendable, CustomStringConvertible {
    public var batch: Int
    public var heads: (q: Int, kv: Int)
    public var nq: Int
    public var nk: Int
    public var d: Int
    public var dv: Int
    public var options: AttentionOptions
    public var amplitude: Float
    public var seed: UInt64
    public var label: String

    public init(
        batch: Int = 1, heads: (q: Int, kv: Int) = (1, 1), nq: Int = 1, nk: Int = 1, d: Int = 16, dv: Int = 16,
        options: AttentionOptions = .init(), amplitude: Float = 1, seed: UInt64 = 1, label: String = ""
    ) {
        self.batch = batch
        self.heads = heads
        self.nq = nq
        self.nk = nk
        self.d = d
        self.dv = dv
        self.options = options
        self.amplitude = amplitude
        self.seed = seed
        self.label = label
    }

    public var description: String {
        var s = "B\(batch) H\(heads.q)/\(heads.kv) Nq\(nq) Nk\(nk) D\(d) Dv\(dv)"
        if options.causal { s += " causal" }
        if let w = options.window { s += " window(\(w.left),\(w.right))" }
        if let m = options.mask { s += m.isBoolean ? " boolmask\(m.shape)" : " floatmask\(m.shape)" }
        if let c = options.softcap { s += " softcap\(c)" }
        if let sc = options.scale { s += " scale\(sc)" }
        if amplitude != 1 { s += " x\(Int(amplitude))" }
        return label.isEmpty ? s : "\(label): \(s)"
    }

    public var shapes: (q: [Int], k: [Int], v: [Int]) {
        ([batch, heads.q, nq, d], [batch, heads.kv, nk, d], [batch, heads.kv, nk, dv])
    }

    public func problem() throws(AttentionError) -> AttentionProblem {
        let s = shapes
        return try AttentionProblem(query: s.q, key: s.k, value: s.v, options: options)
    }

    public func inputs() throws(AttentionError) -> (query: Tensor, key: Tensor, value: Tensor) {
        let s = shapes
        let r = -amplitude...amplitude
        return (
            try .random(shape: s.q, seed: seed, in: r), try .random(shape: s.k, seed: seed &+ 1, in: r),
            try .random(shape: s.v, seed: seed &+ 2, in: -1...1)
        )
    }

    /// The case of a benchmark shape (its inputs as `ShapeSpec.inputs()` makes them).
    public init(_ shape: ShapeSpec) throws(AttentionError) {
        self.init(
            batch: shape.batch, heads: (shape.queryHeads, shape.keyValueHeads), nq: shape.queryLength,
            nk: shape.keyLength, d: shape.headDim, dv: shape.valueDim, options: .init(causal: shape.causal),
            label: shape.name)
    }

    /// Naive work in multiply-adds, to keep sweeps affordable.
    public var work: Int { batch * heads.q * nq * nk * (d + dv) }
}
