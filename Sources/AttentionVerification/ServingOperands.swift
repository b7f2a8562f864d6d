import AttentionCore

/// The operands of a batch of sequences in raw memory of their storage types, as an inference
/// engine would hold them: packed, per-sequence caches, or pages. Used by `attnbench run` and the
/// serving benchmarks; `deallocate()` when done.
public struct ServingOperands: @unchecked Sendable {
    public let batch: SequenceBatch
    let q: RawRegion, k: RawRegion, v: RawRegion, o: RawRegion
    let qs: Strides, ks: Strides, vs: Strides, os: Strides
    /// Regions this value owns (a paged copy shares Q and O with its source).
    let owned: [RawRegion]

    /// Packed (varlen) operands from dense files: Q [totalQ, Hq, D], K [totalK, Hkv, D], V [totalK,
    /// Hkv, Dv] as fp32 values, stored for the call as `storage` says.
    public init(
        packedQuery q: [Float], _ qShape: [Int], key k: [Float], _ kShape: [Int], value v: [Float], _ vShape: [Int],
        queryOffsets: [Int32], keyOffsets: [Int32], options: AttentionOptions, storage: StorageTypes
    ) throws(AttentionError) {
        let batch = try SequenceBatch(
            query: qShape, key: kShape, value: vShape,
            layout: .packed(queryOffsets: queryOffsets, keyOffsets: keyOffsets), options: options, storage: storage)
        self.init(batch, q: q, k: k, v: v, order: .bshd)
    }

    /// Per-sequence caches: Q [B, Hq, Nq, D], K/V [B, Hkv, C, D] (logical shapes), values stored in
    /// `layout` order (a `bshd` file's values as they are), sequence b seeing `lengths[b]` keys.
    public init(
        cachedQuery q: [Float], _ qShape: [Int], key k: [Float], _ kShape: [Int], value v: [Float], _ vShape: [Int],
        layout: TensorLayout, lengths: [Int32], options: AttentionOptions, storage: StorageTypes
    ) throws(AttentionError) {
        let batch = try SequenceBatch(
            query: qShape, key: kShape, value: vShape, layout: .cacheLengths(lengths), options: options,
            storage: storage)
        self.init(batch, q: q, k: k, v: v, order: layout)
    }

    private init(_ batch: SequenceBatch, q: [Float], k: [Float], v: [Float], order: TensorLayout) {
        self.batch = batch
        let types = batch.storage
        self.q = RawRegion(q, type: types.query)
        self.k = RawRegion(k, type: types.keyValue)
        self.v = RawRegion(v, type: types.keyValue)
        o = RawRegion(count: batch.outputShape.reduce(1, *), type: types.output)
        (qs, ks) = (order.strides(batch.queryShape), order.strides(batch.keyShape))
        (vs, os) = (order.strides(batch.valueShape), order.strides(batch.outputShape))
        owned = [self.q, self.k, self.v, o]
    }

    private init(
        batch: SequenceBatch, regions: (RawRegion, RawRegion, RawRegion, RawRegion), strides: (Strides, Strides),
        k ks: Strides, v vs: Strides, owned: [RawRegion]
    ) {
        self.batch = batch
        (q, k, v, o) = regions
        (qs, os) = strides
        (self.ks, self.vs) = (ks, vs)
        self.owned = owned
    }

    /// The same problem with K and V scattered into pages of `pageSize` keys in a shuffled order
    /// (`seed`), Q and O shared with this value (packed operands need one query count for all
    /// sequences). Outputs must equal this value's.
    public func paged(pageSize: Int, seed: UInt64) throws(AttentionError) -> ServingOperands {
        let count = batch.count
        let nq = batch.queryLengths.first ?? 1
        var (qp, op) = (qs, os)
        if case .packed = batch.layout {
            guard batch.queryLengths.allSatisfy({ $0 == nq }) else {
                throw .unsupportedOption("paged runs of packed sequences need one query count for every sequence")
            }
            qp = Strides(batch: nq * qs.sequence, head: qs.head, sequence: qs.sequence)
            op = Strides(batch: nq * os.sequence, head: os.head, sequence: os.sequence)
        }
        let (table, pages, _) = PageTable.shuffled(
            keyLengths: batch.keyLengths, pageSize: pageSize, sparePages: 0, seed: seed)
        let (hkv, d, dv) = (batch.keyValueHeads, batch.headDim, batch.valueDim)
        let paged = try SequenceBatch(
            query: [count, batch.queryHeads, nq, d], key: [pages, pageSize, hkv, d], value: [pages, pageSize, hkv, dv],
            layout: .paged(
                lengths: batch.keyLengths.map { Int32($0) },
                table: table),
            options: batch.options, storage: batch.storage)
        let type = batch.storage.keyValue
        let kPool = RawRegion(count: paged.keyShape.reduce(1, *), type: type)
        let vPool = RawRegion(count: paged.valueShape.reduce(1, *), type: type)
        let (kp, vp) = (Strides.bshd(paged.keyShape), Strides.bshd(paged.valueShape))
        let size = type.byteSize
        for s in 0..<count {
            for j in 0..<batch.keyLengths[s] {
                let page = table.page(sequence: s, key: j)
                for h in 0..<hkv {
                    let (kFrom, vFrom) = (sourceKeyOffset(ks, s, h, j), sourceKeyOffset(vs, s, h, j))
                    (kPool.base + kp.offset(batch: page, head: h, position: j % pageSize) * size).copyMemory(
                        from: k.base + kFrom * size, byteCount: d * size)
                    (vPool.base + vp.offset(batch: page, head: h, position: j % pageSize) * size).copyMemory(
                        from: v.base + vFrom * size, byteCount: dv * size)
                }
            }
        }
        return ServingOperands(
            batch: paged, regions: (q, kPool, vPool, o), strides: (qp, op), k: kp, v: vp, owned: [kPool, vPool])
    }

    /// Element offset of key j of K/V head h of sequence s in this value's K (or V) strides.
    private func sourceKeyOffset(_ st: Strides, _ s: Int, _ h: Int, _ j: Int) -> Int {
        switch batch.layout {
        case .packed(_, let cuK): return st.offset(batch: 0, head: h, position: Int(cuK[s]) + j)
        case .cacheLengths: return st.offset(batch: s, head: h, position: j)
        case .paged(_, let table):
            return st.offset(batch: table.page(sequence: s, key: j), head: h, position: j % table.pageSize)
        }
    }

    public func buffers(logSumExp: UnsafeMutableBufferPointer<Float>?) -> AttentionBuffers {
        AttentionBuffers(
            query: q.view(qs), key: k.view(ks), value: v.view(vs), output: o.view(os), logSumExp: logSumExp)
    }

    /// The output as fp32 values in its memory order (the order the input files had).
    public func readOutput() -> [Float] { (0..<o.count).map(o.load) }

    public func deallocate() { for region in owned { PoolMemory.deallocate(region.base) } }
}

/// Raw memory of one operand in a storage type.
struct RawRegion {
    let base: UnsafeMutableRawPointer
    let count: Int
    let type: StorageType

    /// `count` elements, every byte 0xFF (NaN in every type). Large regions (page pools) come from
    /// `PoolMemory`, as a serving engine would allocate its pools.
    init(count: Int, type: StorageType) {
        self.count = max(1, count)
        self.type = type
        guard let memory = PoolMemory.allocate(byteCount: self.count * type.byteSize) else {
            fatalError("out of memory for a \(self.count)-element benchmark region")
        }
        base = memory
        base.initializeMemory(as: UInt8.self, repeating: 0xFF, count: self.count * type.byteSize)
    }

    /// `values` rounded to `type`.
    init(_ values: [Float], type: StorageType) {
        self.init(count: values.count, type: type)
        for (i, x) in values.enumerated() { store(x, at: i) }
    }

    func store(_ x: Float, at index: Int) {
        switch type {
        case .f32: base.storeBytes(of: x, toByteOffset: index * 4, as: Float.self)
        case .f16, .bf16: base.storeBytes(of: type.encode(x), toByteOffset: index * 2, as: UInt16.self)
        }
    }

    func load(_ index: Int) -> Float {
        switch type {
        case .f32: return base.load(fromByteOffset: index * 4, as: Float.self)
        case .f16: return StorageType.decodeHalf(base.load(fromByteOffset: index * 2, as: UInt16.self))
        case .bf16: return StorageType.decodeBFloat(base.load(fromByteOffset: index * 2, as: UInt16.self))
        }
    }

    func view(_ strides: Strides) -> TensorView {
        TensorView(address: base, storage: type, strides: strides, capacity: count)
    }
}

extension PageTable {
    /// A block table for sequences of `keyLengths` keys over a pool of just enough pages plus
    /// `sparePages`, in an order shuffled by `seed`; unused entries are -1. Also returns the pool's
    /// page count and each sequence's pages in key order.
    public static func shuffled(keyLengths: [Int], pageSize: Int, sparePages: Int, seed: UInt64)
        -> (table: PageTable, pageCount: Int, pages: [[Int]])
    {
        let perSequence = keyLengths.map { ($0 + pageSize - 1) / pageSize }
        let pageCount = max(1, perSequence.reduce(0, +) + sparePages)
        var order = Array(0..<pageCount)
        var generator = SplitMix64(seed: seed)
        order.shuffle(using: &generator)
        let maxPages = max(1, perSequence.max() ?? 1)
        var blocks = [Int32](repeating: -1, count: keyLengths.count * maxPages)
        var pages: [[Int]] = []
        var next = 0
        for (s, count) in perSequence.enumerated() {
            pages.append(Array(order[next..<(next + count)]))
            for (slot, page) in pages[s].enumerated() { blocks[s * maxPages + slot] = Int32(page) }
            next += count
        }
        return (PageTable(pageSize: pageSize, maxPages: maxPages, blockTable: blocks), pageCount, pages)
    }
}
