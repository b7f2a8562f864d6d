import AttentionCore
import Synchronization

/// A paged K/V cache on the host: a fixed pool of pages shared by many sequences (vLLM-style), in
/// fp32, fp16 or bf16, growing each sequence one page at a time.
///
/// Pages hold `pageSize` tokens of every K/V head, dense `[pageSize, Hkv, D]` (the pool is
/// `[pageCapacity, pageSize, Hkv, D]`, exactly the paged form of `SequenceBatch`), so
/// `attention(query:sequences:options:)` hands the pool to a backend without copying anything.
/// `fork(sequence:)` shares every page of a sequence copy-on-write: a shared page is copied only
/// when one of its owners appends into it.
///
/// Thread safety: every method takes the cache's lock, so a cache may be shared across threads
/// and tasks; calls are serialised (an attention call holds the lock while it reads the pages).
public final class KVCache: @unchecked Sendable {
    /// A sequence held by the cache.
    public typealias SequenceID = Int

    public let keyValueHeads: Int
    public let headDim: Int
    public let valueDim: Int
    public let pageSize: Int
    /// Pages in the pool.
    public let pageCapacity: Int
    /// How K and V are stored.
    public let storage: StorageType

    private let keys: UnsafeMutableRawPointer
    private let values: UnsafeMutableRawPointer
    private let state: Mutex<PagePool>

    /// - Parameters:
    ///   - pageSize: tokens per page, a power of two from 1 to 1024 (16 is vLLM's default).
    ///   - pageCapacity: pages in the pool (its memory is allocated once, here).
    public init(
        keyValueHeads: Int, headDim: Int, valueDim: Int? = nil, pageSize: Int = 16, pageCapacity: Int,
        storage: StorageType = .f16
    ) throws(AttentionError) {
        let dv = valueDim ?? headDim
        try PagePool.validate(
            keyValueHeads: keyValueHeads, headDim: headDim, valueDim: dv, pageSize: pageSize, pageCapacity: pageCapacity
        )
        self.keyValueHeads = keyValueHeads
        self.headDim = headDim
        self.valueDim = dv
        self.pageSize = pageSize
        self.pageCapacity = pageCapacity
        self.storage = storage
        // Pools in huge pages where the system grants them: decode reads pages in table order.
        let keyBytes = pageCapacity * pageSize * keyValueHeads * headDim * storage.byteSize
        let valueBytes = pageCapacity * pageSize * keyValueHeads * dv * storage.byteSize
        guard let keys = PoolMemory.allocate(byteCount: keyBytes) else {
            throw .invalidConfiguration(
                setting: "pageCapacity", value: "\(pageCapacity)", reason: "cannot allocate \(keyBytes) bytes for K")
        }
        guard let values = PoolMemory.allocate(byteCount: valueBytes) else {
            PoolMemory.deallocate(keys)
            throw .invalidConfiguration(
                setting: "pageCapacity", value: "\(pageCapacity)", reason: "cannot allocate \(valueBytes) bytes for V")
        }
        (self.keys, self.values) = (keys, values)
        state = Mutex(PagePool(pageSize: pageSize, capacity: pageCapacity))
    }

    deinit {
        PoolMemory.deallocate(keys)
        PoolMemory.deallocate(values)
    }

    // MARK: Sequences

    /// A new, empty sequence.
    public func addSequence() -> SequenceID { state.withLock { $0.add() } }

    /// Tokens held for `sequence`.
    public func length(of sequence: SequenceID) throws(AttentionError) -> Int {
        try state.withLock { (s) throws(AttentionError) in try s.length(of: sequence) }
    }

    /// Pages not owned by any sequence.
    public var freePages: Int { state.withLock { $0.free.count } }

    /// Appends `keys` [n, Hkv, D] and `values` [n, Hkv, Dv] (fp32, rounded to the cache's storage)
    /// after the sequence's last token; any n, across page boundaries. Throws `cacheFull` (and changes
    /// nothing) when the pool lacks the pages.
    public func append(sequence: SequenceID, keys newKeys: Tensor, values newValues: Tensor) throws(AttentionError) {
        let n = try PagePool.tokenCount(
            keys: newKeys, values: newValues, keyValueHeads: keyValueHeads, headDim: headDim, valueDim: valueDim)
        try state.withLock { (s) throws(AttentionError) in
            let (copy, start, pages) = try s.append(sequence: sequence, count: n)
            if let copy { copyPage(from: copy.from, to: copy.to) }
            let rowK = keyValueHeads * headDim
            let rowV = keyValueHeads * valueDim
            for t in 0..<n {
                let slot = s.slot(of: start + t, pages: pages)
                store(newKeys.storage, from: t * rowK, count: rowK, into: keys, at: slot * rowK)
                store(newValues.storage, from: t * rowV, count: rowV, into: values, at: slot * rowV)
            }
        }
    }

    /// Removes `sequence` and returns the pages this freed (pages still shared with a fork stay).
    @discardableResult
    public func remove(sequence: SequenceID) throws(AttentionError) -> [Int32] {
        try state.withLock { (s) throws(AttentionError) in try s.remove(sequence: sequence) }
    }

    /// A new sequence with the same tokens, sharing every page copy-on-write (prefix sharing, beam
    /// search). Takes no pages until one of the two appends into a shared, partly filled page.
    public func fork(sequence: SequenceID) throws(AttentionError) -> SequenceID {
        try state.withLock { (s) throws(AttentionError) in try s.fork(sequence: sequence) }
    }

    // MARK: Attention

    /// One attention step for many sequences in one call: `query` [S, Hq, Nq, D] (fp32), row s
    /// attending to every token of `sequences[s]` (causal aligned to each sequence's own end).
    /// Runs on `backend` (default: the dispatcher's choice for the batch), reading pages in place.
    public func attention(
        query: Tensor, sequences: [SequenceID], options: AttentionOptions = .init(),
        backend: (any AttentionBackend)? = nil
    ) throws(AttentionError) -> AttentionResult {
        try state.withLock { (s) throws(AttentionError) in
            let batch = try s.batch(
                query: query.shape, sequences: sequences, keyValueHeads: keyValueHeads, headDim: headDim,
                valueDim: valueDim, options: options, storage: storage)
            // The caller's backend, or the dispatcher's choice (which falls back to the next candidate
            // if it fails at run time).
            let selection: BackendSelection
            if let backend {
                selection = BackendSelection(backend: backend, reason: "requested")
            } else {
                selection = try BackendSelection.select(.auto, for: batch)
            }
            var output = try Tensor(shape: batch.outputShape, name: "output")
            var lse = try Tensor(shape: Array(batch.outputShape.dropLast()), name: "logSumExp")
            let pool = pageCapacity * pageSize * keyValueHeads
            let keyView = TensorView(address: keys, storage: storage, strides: nil, capacity: pool * headDim)
            let valueView = TensorView(address: values, storage: storage, strides: nil, capacity: pool * valueDim)
            try output.withUnsafeMutableBufferPointer { (out) throws(AttentionError) in
                try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) in
                    try query.storage.withUnsafeBufferPointer { (q) throws(AttentionError) in
                        _ = try selection.run(
                            batch: batch,
                            AttentionBuffers(
                                query: TensorView(q), key: keyView, value: valueView, output: TensorView(out),
                                logSumExp: l))
                    }
                }
            }
            return AttentionResult(output: output, logSumExp: lse)
        }
    }

    // MARK: Storage

    private func copyPage(from source: Int, to target: Int) {
        let kBytes = pageSize * keyValueHeads * headDim * storage.byteSize
        let vBytes = pageSize * keyValueHeads * valueDim * storage.byteSize
        (keys + target * kBytes).copyMemory(from: keys + source * kBytes, byteCount: kBytes)
        (values + target * vBytes).copyMemory(from: values + source * vBytes, byteCount: vBytes)
    }

    private func store(
        _ source: [Float], from start: Int, count: Int, into pool: UnsafeMutableRawPointer, at index: Int
    ) {
        switch storage {
        case .f32:
            for e in 0..<count { pool.storeBytes(of: source[start + e], toByteOffset: (index + e) * 4, as: Float.self) }
        case .f16, .bf16:
            for e in 0..<count {
                pool.storeBytes(of: storage.encode(source[start + e]), toByteOffset: (index + e) * 2, as: UInt16.self)
            }
        }
    }
}
