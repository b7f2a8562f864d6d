extension AttentionBuffers {
    /// These buffers with every view's strides explicit: views declared without strides are dense
    /// in the batch's stored order (`SequenceBatch.defaultStrides`).
    public func resolved(for batch: SequenceBatch) -> AttentionBuffers {
        func explicit(_ view: TensorView, _ operand: SequenceBatch.Operand) -> TensorView {
            TensorView(
                address: view.address, storage: view.storage, strides: view.strides ?? batch.defaultStrides(operand),
                capacity: view.capacity)
        }
        return AttentionBuffers(
            query: explicit(query, .query), key: explicit(key, .key), value: explicit(value, .value),
            output: explicit(output, .output), logSumExp: logSumExp)
    }

    /// Throws unless the views fit `batch` (the checks of `check(against:)` on the batch's logical
    /// shapes: storage types, strides inside each buffer, no overlapping output, LSE size).
    public func check(against batch: SequenceBatch) throws(AttentionError) {
        let r = resolved(for: batch)
        let types = batch.storage
        try r.check(
            operands: [
                ("query", r.query, batch.queryShape, types.query), ("key", r.key, batch.keyShape, types.keyValue),
                ("value", r.value, batch.valueShape, types.keyValue),
                ("output", r.output, batch.outputShape, types.output),
            ], logSumExpCount: batch.logSumExpCount)
    }
}

extension AttentionBackend {
    /// Support of the batch's largest sequence problem (the most queries and the most keys of any
    /// sequence): backends' limits grow with sizes, so the smaller sequences are covered too.
    public func support(for batch: SequenceBatch) -> BackendSupport {
        guard let largest = batch.largestProblem else { return .supported }
        if case .unsupported(let reason) = support(for: largest) {
            return .unsupported(reason: "the batch's largest sequence: \(reason)")
        }
        return .supported
    }

    /// Runs the batch one sequence at a time through `run(_:_:)` on views of the caller's buffers
    /// (no copies for packed and cache-length batches; a paged sequence's pages are gathered into
    /// one contiguous block first). Backends with a native path implement `run(batch:_:)` instead.
    public func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        try runBySequence(batch, buffers)
    }

    /// Validates, then runs a batch of sequences into the caller's buffers.
    public func forward(_ batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        if case .unsupported(let reason) = support(for: batch) {
            throw .unsupported(backend: id.description, reason: reason)
        }
        try buffers.check(against: batch)
        try run(batch: batch, buffers.resolved(for: batch))
    }

    /// The per-sequence decomposition every backend can fall back on. `buffers` must be resolved.
    public func runBySequence(_ batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        for s in 0..<batch.count where batch.queryLengths[s] > 0 {
            let views = SequenceViews(batch, buffers, sequence: s)
            guard let problem = batch.problem(sequence: s) else {
                views.writeEmptyRows(batch)
                continue
            }
            try views.withKeyValues(batch) { (key, value) throws(AttentionError) in
                try views.withLogSumExp(batch) { lse throws(AttentionError) in
                    try run(
                        problem,
                        AttentionBuffers(
                            query: views.query, key: key, value: value, output: views.output, logSumExp: lse))
                }
            }
        }
    }
}

/// Views of one sequence of a batch as an ordinary batch-1 problem's operands.
struct SequenceViews {
    let sequence: Int
    let query: TensorView
    let output: TensorView
    let buffers: AttentionBuffers

    init(_ batch: SequenceBatch, _ buffers: AttentionBuffers, sequence s: Int) {
        self.sequence = s
        self.buffers = buffers
        let (q, o) = (buffers.query, buffers.output)
        let qs = q.strides(for: batch.queryShape)
        let os = o.strides(for: batch.outputShape)
        switch batch.layout {
        case .packed(let cuQ, _):
            query = q.offset(by: Int(cuQ[s]) * qs.sequence)
            output = o.offset(by: Int(cuQ[s]) * os.sequence)
        case .cacheLengths, .paged:
            query = q.offset(by: s * qs.batch)
            output = o.offset(by: s * os.batch)
        }
    }

    /// Zero output rows and -inf log-sum-exp: a sequence with queries but no keys.
    func writeEmptyRows(_ batch: SequenceBatch) {
        let shape = [1, batch.queryHeads, batch.queryLengths[sequence], batch.valueDim]
        let os = output.strides(for: shape)
        for h in 0..<shape[1] {
            for i in 0..<shape[2] {
                for c in 0..<shape[3] { output.store(0, os, 0, h, i, c) }
                if let lse = buffers.logSumExp { lse[lseIndex(batch, head: h, query: i)] = -.infinity }
            }
        }
    }

    /// Where the log-sum-exp of head h, query i of this sequence goes.
    func lseIndex(_ batch: SequenceBatch, head h: Int, query i: Int) -> Int {
        switch batch.layout {
        case .packed(let cuQ, _): return (Int(cuQ[sequence]) + i) * batch.queryHeads + h
        case .cacheLengths, .paged: return (sequence * batch.queryHeads + h) * batch.queryLengths[sequence] + i
        }
    }

    /// Runs `body` with this sequence's log-sum-exp rows as a dense [1, Hq, Nq] buffer: a slice of
    /// the caller's, or (packed, where they are [totalQ, Hq]) a scratch buffer scattered afterwards.
    func withLogSumExp(
        _ batch: SequenceBatch, _ body: (UnsafeMutableBufferPointer<Float>?) throws(AttentionError) -> Void
    ) throws(AttentionError) {
        guard let lse = buffers.logSumExp else { return try body(nil) }
        let (hq, nq) = (batch.queryHeads, batch.queryLengths[sequence])
        switch batch.layout {
        case .cacheLengths, .paged:
            try body(UnsafeMutableBufferPointer(rebasing: lse[sequence * hq * nq..<(sequence + 1) * hq * nq]))
        case .packed:
            let scratch = UnsafeMutableBufferPointer<Float>.allocate(capacity: hq * nq)
            defer { scratch.deallocate() }
            try body(scratch)
            for h in 0..<hq {
                for i in 0..<nq { lse[lseIndex(batch, head: h, query: i)] = scratch[h * nq + i] }
            }
        }
    }

    /// Runs `body` with this sequence's K and V as [1, Hkv, Nk, D] views: views of the caller's
    /// buffers, or (paged) the sequence's pages gathered into contiguous scratch in storage type.
    func withKeyValues(
        _ batch: SequenceBatch, _ body: (TensorView, TensorView) throws(AttentionError) -> Void
    ) throws(AttentionError) {
        let (k, v) = (buffers.key, buffers.value)
        let ks = k.strides(for: batch.keyShape)
        let vs = v.strides(for: batch.valueShape)
        switch batch.layout {
        case .packed(_, let cuK):
            try body(k.offset(by: Int(cuK[sequence]) * ks.sequence), v.offset(by: Int(cuK[sequence]) * vs.sequence))
        case .cacheLengths:
            try body(k.offset(by: sequence * ks.batch), v.offset(by: sequence * vs.batch))
        case .paged(_, let table):
            let nk = batch.keyLengths[sequence]
            let hkv = batch.keyValueHeads
            let gathered = [
                k.gatherPages(table, sequence: sequence, keys: nk, heads: hkv, dim: batch.headDim),
                v.gatherPages(table, sequence: sequence, keys: nk, heads: hkv, dim: batch.valueDim),
            ]
            defer { for view in gathered { view.address.deallocate() } }
            try body(gathered[0], gathered[1])
        }
    }
}

extension TensorView {
    /// The same view starting `elements` further on (same strides, capacity reduced).
    func offset(by elements: Int) -> TensorView {
        TensorView(
            address: address + elements * storage.byteSize, storage: storage, strides: strides,
            capacity: capacity - elements)
    }

    /// Keys [0, keys) of sequence `b` of a page pool, copied into a new dense [1, heads, keys, dim]
    /// buffer of the same storage type (the caller deallocates `address`).
    func gatherPages(_ table: PageTable, sequence b: Int, keys: Int, heads: Int, dim: Int) -> TensorView {
        let s = strides(for: [1, heads, table.pageSize, dim])
        let size = storage.byteSize
        let memory = UnsafeMutableRawPointer.allocate(byteCount: max(1, keys * heads * dim * size), alignment: 64)
        for j in 0..<keys {
            let page = table.page(sequence: b, key: j)
            for h in 0..<heads {
                let from = address + s.offset(batch: page, head: h, position: j % table.pageSize) * size
                (memory + (h * keys + j) * dim * size).copyMemory(from: from, byteCount: dim * size)
            }
        }
        return TensorView(address: memory, storage: storage, strides: nil, capacity: keys * heads * dim)
    }
}
