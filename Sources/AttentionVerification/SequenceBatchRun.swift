import AttentionCore

/// How a verification batch lays its sequences out (`SequenceLayout`).
public enum SequenceForm: Sendable, Equatable, CustomStringConvertible {
    /// Packed end to end, with two unused key rows after the last sequence.
    case packed
    /// Per-sequence caches with three rows of spare capacity, all operands in `layout`.
    case cacheLengths(TensorLayout)
    /// Pages of `pageSize` keys in shuffled order in a pool with spare pages; unused block-table
    /// entries are -1.
    case paged(pageSize: Int)

    public var description: String {
        switch self {
        case .packed: return "varlen"
        case .cacheLengths(let layout): return "cache-lengths \(layout)"
        case .paged(let size): return "paged P\(size)"
        }
    }
}

/// A batch of sequences to check a backend on: per-sequence lengths, heads, options and K/V storage.
public struct SequenceBatchCase: Sendable, CustomStringConvertible {
    public var queryLengths: [Int]
    public var keyLengths: [Int]
    public var heads: (q: Int, kv: Int)
    public var d: Int
    public var dv: Int
    public var options: AttentionOptions
    public var keyValue: StorageType
    public var amplitude: Float
    public var seed: UInt64

    public init(
        queryLengths: [Int], keyLengths: [Int], heads: (q: Int, kv: Int) = (4, 2), d: Int = 16, dv: Int = 16,
        options: AttentionOptions = .init(), keyValue: StorageType = .f32, amplitude: Float = 1, seed: UInt64 = 7
    ) {
        self.queryLengths = queryLengths
        self.keyLengths = keyLengths
        self.heads = heads
        self.d = d
        self.dv = dv
        self.options = options
        self.keyValue = keyValue
        self.amplitude = amplitude
        self.seed = seed
    }

    public var description: String {
        var s = "Nq \(queryLengths) Nk \(keyLengths) H\(heads.q)/\(heads.kv) D\(d) Dv\(dv) kv \(keyValue)"
        if options.causal { s += " causal" }
        if let w = options.window { s += " window(\(w.left),\(w.right))" }
        if let c = options.softcap { s += " softcap\(c)" }
        return s
    }

    /// Sequence s's inputs as dense [1, H, N, D] tensors, K/V rounded to their storage type (a
    /// sequence with no queries or keys gets one row, never used).
    public func inputs(sequence s: Int) throws(AttentionError) -> (query: Tensor, key: Tensor, value: Tensor) {
        let (nq, nk) = (max(1, queryLengths[s]), max(1, keyLengths[s]))
        let seed = self.seed &+ UInt64(s) &* 17
        let range = -amplitude...amplitude
        return (
            try .random(shape: [1, heads.q, nq, d], seed: seed, in: range),
            try Tensor.random(shape: [1, heads.kv, nk, d], seed: seed &+ 1, in: range).rounded(to: keyValue),
            try Tensor.random(shape: [1, heads.kv, nk, dv], seed: seed &+ 2, in: -1...1).rounded(to: keyValue)
        )
    }
}

/// A run of one backend on a batch of sequences in one form, checked sequence by sequence against
/// the float64 reference of each sequence alone (rows of empty-key sequences must be 0 / -inf).
///
/// Inputs are written into NaN-filled memory (spare rows, spare pages and capacity included), so a
/// read of anything a sequence does not own poisons its output and fails the check.
public struct SequenceBatchRun {
    public var report: AccuracyReport

    public init(
        _ backend: any AttentionBackend, _ c: SequenceBatchCase, form: SequenceForm
    ) throws(AttentionError) {
        let memory = try SequenceBatchMemory(c, form: form)
        defer { memory.deallocate() }
        let lse = UnsafeMutableBufferPointer<Float>.allocate(capacity: memory.batch.logSumExpCount)
        defer { lse.deallocate() }
        lse.initialize(repeating: .nan)
        try backend.forward(memory.batch, memory.buffers(logSumExp: lse))

        var got: [Float] = []
        var gotLSE: [Float] = []
        var reference: [Double] = []
        var referenceLSE: [Double] = []
        let (hq, dv) = (c.heads.q, c.dv)
        for s in 0..<c.queryLengths.count where c.queryLengths[s] > 0 {
            let nq = c.queryLengths[s]
            if c.keyLengths[s] > 0 {
                let (q, k, v) = try c.inputs(sequence: s)
                let problem = try AttentionProblem(
                    query: q.shape, key: k.shape, value: v.shape, options: c.options,
                    storage: StorageTypes(keyValue: c.keyValue))
                let ref = NaiveBackend.reference(problem, query: q, key: k, value: v)
                reference += ref.output
                referenceLSE += ref.logSumExp
            } else {
                reference += Array(repeating: 0, count: hq * nq * dv)
                referenceLSE += Array(repeating: -.infinity, count: hq * nq)
            }
            for h in 0..<hq {
                for i in 0..<nq {
                    for e in 0..<dv { got.append(memory.output(sequence: s, head: h, query: i, element: e)) }
                    gotLSE.append(lse[memory.lseIndex(sequence: s, head: h, query: i)])
                }
            }
        }
        report = got.withUnsafeBufferPointer { out in
            gotLSE.withUnsafeBufferPointer { l in
                AccuracyReport(
                    output: out, logSumExp: l, reference: reference, referenceLSE: referenceLSE, valueDim: dv)
            }
        }
    }
}

/// The operands of a verification batch in its form, in NaN-filled memory; `deallocate()` when done.
public struct SequenceBatchMemory: @unchecked Sendable {
    public let batch: SequenceBatch
    let c: SequenceBatchCase
    let form: SequenceForm
    let q: RawRegion, k: RawRegion, v: RawRegion, o: RawRegion
    let qs: Strides, ks: Strides, vs: Strides, os: Strides
    /// Query rows before each sequence (packed).
    let queryStarts: [Int]

    public init(_ c: SequenceBatchCase, form: SequenceForm) throws(AttentionError) {
        self.c = c
        self.form = form
        let count = c.queryLengths.count
        let (hq, hkv, d, dv) = (c.heads.q, c.heads.kv, c.d, c.dv)
        let storage = StorageTypes(keyValue: c.keyValue)
        var starts: [Int] = []
        var keyStarts: [Int] = []
        var pageOf: [[Int]] = []
        let layout: SequenceLayout
        let shapes: (q: [Int], k: [Int], v: [Int])
        switch form {
        case .packed:
            var (tq, tk) = (0, 0)
            for s in 0..<count {
                starts.append(tq)
                keyStarts.append(tk)
                tq += c.queryLengths[s]
                tk += c.keyLengths[s]
            }
            let cuQ = (starts + [tq]).map { Int32($0) }
            let cuK = (keyStarts + [tk]).map { Int32($0) }
            layout = .packed(queryOffsets: cuQ, keyOffsets: cuK)
            shapes = ([tq, hq, d], [tk + 2, hkv, d], [tk + 2, hkv, dv])
            (qs, os) = (.bshd([1, hq, tq, d]), .bshd([1, hq, tq, dv]))
            (ks, vs) = (.bshd([1, hkv, tk + 2, d]), .bshd([1, hkv, tk + 2, dv]))
        case .cacheLengths(let order):
            let nq = c.queryLengths.max() ?? 1
            let capacity = (c.keyLengths.max() ?? 0) + 3
            layout = .cacheLengths(c.keyLengths.map { Int32($0) })
            shapes = ([count, hq, nq, d], [count, hkv, capacity, d], [count, hkv, capacity, dv])
            (qs, os) = (order.strides(shapes.q), order.strides([count, hq, nq, dv]))
            (ks, vs) = (order.strides(shapes.k), order.strides(shapes.v))
        case .paged(let pageSize):
            let nq = c.queryLengths.max() ?? 1
            let (table, pages, pagesOfSequence) = PageTable.shuffled(
                keyLengths: c.keyLengths, pageSize: pageSize, sparePages: 2, seed: c.seed)
            pageOf = pagesOfSequence
            layout = .paged(lengths: c.keyLengths.map { Int32($0) }, table: table)
            shapes = ([count, hq, nq, d], [pages, pageSize, hkv, d], [pages, pageSize, hkv, dv])
            (qs, os) = (.bhsd(shapes.q), .bhsd([count, hq, nq, dv]))
            (ks, vs) = (.bshd([pages, hkv, pageSize, d]), .bshd([pages, hkv, pageSize, dv]))
        }
        batch = try SequenceBatch(
            query: shapes.q, key: shapes.k, value: shapes.v, layout: layout, options: c.options, storage: storage)
        queryStarts = starts
        q = RawRegion(count: shapes.q.reduce(1, *), type: .f32)
        k = RawRegion(count: shapes.k.reduce(1, *), type: c.keyValue)
        v = RawRegion(count: shapes.v.reduce(1, *), type: c.keyValue)
        o = RawRegion(count: batch.outputShape.reduce(1, *), type: .f32)

        for s in 0..<count {
            let (query, key, value) = try c.inputs(sequence: s)
            for h in 0..<hq {
                for i in 0..<c.queryLengths[s] {
                    for e in 0..<d { q.store(query[0, h, i, e], at: queryOffset(qs, s, h, i) + e) }
                }
            }
            for h in 0..<hkv {
                for j in 0..<c.keyLengths[s] {
                    let (kRow, vRow): (Int, Int)
                    switch form {
                    case .packed:
                        kRow = ks.offset(batch: 0, head: h, position: keyStarts[s] + j)
                        vRow = vs.offset(batch: 0, head: h, position: keyStarts[s] + j)
                    case .cacheLengths:
                        kRow = ks.offset(batch: s, head: h, position: j)
                        vRow = vs.offset(batch: s, head: h, position: j)
                    case .paged(let pageSize):
                        let page = pageOf[s][j / pageSize]
                        kRow = ks.offset(batch: page, head: h, position: j % pageSize)
                        vRow = vs.offset(batch: page, head: h, position: j % pageSize)
                    }
                    for e in 0..<d { k.store(key[0, h, j, e], at: kRow + e) }
                    for e in 0..<dv { v.store(value[0, h, j, e], at: vRow + e) }
                }
            }
        }
    }

    private func queryOffset(_ st: Strides, _ s: Int, _ h: Int, _ i: Int) -> Int {
        if case .packed = form { return st.offset(batch: 0, head: h, position: queryStarts[s] + i) }
        return st.offset(batch: s, head: h, position: i)
    }

    public func buffers(logSumExp: UnsafeMutableBufferPointer<Float>?) -> AttentionBuffers {
        AttentionBuffers(
            query: q.view(qs), key: k.view(ks), value: v.view(vs), output: o.view(os), logSumExp: logSumExp)
    }

    public func output(sequence s: Int, head h: Int, query i: Int, element e: Int) -> Float {
        o.base.load(fromByteOffset: (queryOffset(os, s, h, i) + e) * 4, as: Float.self)
    }

    public func lseIndex(sequence s: Int, head h: Int, query i: Int) -> Int {
        if case .packed = form { return (queryStarts[s] + i) * c.heads.q + h }
        return (s * c.heads.q + h) * (c.queryLengths.max() ?? 1) + i
    }

    public func deallocate() { for region in [q, k, v, o] { PoolMemory.deallocate(region.base) } }
}
