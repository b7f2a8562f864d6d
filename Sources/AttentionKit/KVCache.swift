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
    private let state: Mutex<State>

    private struct State {
        var free: [Int32]
        var owners: [Int]
        var sequences: [SequenceID: (pages: [Int32], length: Int)] = [:]
        var nextID = 0
    }

    /// - Parameters:
    ///   - pageSize: tokens per page, a power of two from 1 to 1024 (16 is vLLM's default).
    ///   - pageCapacity: pages in the pool (its memory is allocated once, here).
    public init(
        keyValueHeads: Int, headDim: Int, valueDim: Int? = nil, pageSize: Int = 16, pageCapacity: Int,
        storage: StorageType = .f16
    ) throws(AttentionError) {
        let dv = valueDim ?? headDim
        guard pageSize >= 1, pageSize <= 1024, pageSize & (pageSize - 1) == 0 else {
            throw .invalidPageTable(reason: "page size \(pageSize) is not a power of two from 1 to 1024")
        }
        guard keyValueHeads > 0, headDim > 0, dv > 0, pageCapacity > 0, pageCapacity <= Int(Int32.max) else {
            throw .invalidShape(tensor: "KV cache", shape: [pageCapacity, pageSize, keyValueHeads, headDim, dv])
        }
        _ = try Tensor.elementCount(of: [pageCapacity, pageSize, keyValueHeads, max(headDim, dv), 2], name: "KV cache")
        self.keyValueHeads = keyValueHeads
        self.headDim = headDim
        self.valueDim = dv
        self.pageSize = pageSize
        self.pageCapacity = pageCapacity
        self.storage = storage
        keys = .allocate(byteCount: pageCapacity * pageSize * keyValueHeads * headDim * storage.byteSize, alignment: 64)
        values = .allocate(byteCount: pageCapacity * pageSize * keyValueHeads * dv * storage.byteSize, alignment: 64)
        state = Mutex(
            State(free: (0..<Int32(pageCapacity)).reversed(), owners: Array(repeating: 0, count: pageCapacity)))
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    // MARK: Sequences

    /// A new, empty sequence.
    public func addSequence() -> SequenceID {
        state.withLock { s in
            let id = s.nextID
            s.nextID += 1
            s.sequences[id] = ([], 0)
            return id
        }
    }

    /// Tokens held for `sequence`.
    public func length(of sequence: SequenceID) throws(AttentionError) -> Int {
        try state.withLock { (s) throws(AttentionError) in
            guard let entry = s.sequences[sequence] else { throw .unknownSequence(sequence) }
            return entry.length
        }
    }

    /// Pages not owned by any sequence.
    public var freePages: Int { state.withLock { $0.free.count } }

    /// Appends `keys` [n, Hkv, D] and `values` [n, Hkv, Dv] (fp32, rounded to the cache's storage)
    /// after the sequence's last token; any n, across page boundaries. Throws `cacheFull` (and changes
    /// nothing) when the pool lacks the pages.
    public func append(sequence: SequenceID, keys newKeys: Tensor, values newValues: Tensor) throws(AttentionError) {
        let n = newKeys.shape.first ?? 0
        guard newKeys.shape == [n, keyValueHeads, headDim] else {
            throw .shapeMismatch("keys must be [n, \(keyValueHeads), \(headDim)], got \(newKeys.shape)")
        }
        guard newValues.shape == [n, keyValueHeads, valueDim] else {
            throw .shapeMismatch("values must be [\(n), \(keyValueHeads), \(valueDim)], got \(newValues.shape)")
        }
        try state.withLock { (s) throws(AttentionError) in
            guard var entry = s.sequences[sequence] else { throw .unknownSequence(sequence) }
            let length = entry.length
            let needed = (length + n + pageSize - 1) / pageSize
            let partial = length % pageSize != 0
            // A shared last page that will be written must be copied first.
            let copyLast = partial && n > 0 && s.owners[Int(entry.pages[entry.pages.count - 1])] > 1
            let newPages = needed - entry.pages.count + (copyLast ? 1 : 0)
            guard newPages <= s.free.count else { throw .cacheFull(neededPages: newPages, freePages: s.free.count) }
            if copyLast {
                let old = Int(entry.pages.removeLast())
                let page = Int(s.free.removeLast())
                s.owners[old] -= 1
                s.owners[page] = 1
                copyPage(from: old, to: page)
                entry.pages.append(Int32(page))
            }
            while entry.pages.count < needed {
                let page = s.free.removeLast()
                s.owners[Int(page)] = 1
                entry.pages.append(page)
            }
            let rowK = keyValueHeads * headDim
            let rowV = keyValueHeads * valueDim
            for t in 0..<n {
                let position = length + t
                let page = Int(entry.pages[position / pageSize])
                let slot = page * pageSize + position % pageSize
                store(newKeys.storage, from: t * rowK, count: rowK, into: keys, at: slot * rowK)
                store(newValues.storage, from: t * rowV, count: rowV, into: values, at: slot * rowV)
            }
            entry.length += n
            s.sequences[sequence] = entry
        }
    }

    /// Removes `sequence` and returns the pages this freed (pages still shared with a fork stay).
    @discardableResult
    public func remove(sequence: SequenceID) throws(AttentionError) -> [Int32] {
        try state.withLock { (s) throws(AttentionError) in
            guard let entry = s.sequences.removeValue(forKey: sequence) else { throw .unknownSequence(sequence) }
            var freed: [Int32] = []
            for page in entry.pages {
                s.owners[Int(page)] -= 1
                if s.owners[Int(page)] == 0 {
                    s.free.append(page)
                    freed.append(page)
                }
            }
            return freed
        }
    }

    /// A new sequence with the same tokens, sharing every page copy-on-write (prefix sharing, beam
    /// search). Takes no pages until one of the two appends into a shared, partly filled page.
    public func fork(sequence: SequenceID) throws(AttentionError) -> SequenceID {
        try state.withLock { (s) throws(AttentionError) in
            guard let entry = s.sequences[sequence] else { throw .unknownSequence(sequence) }
            for page in entry.pages { s.owners[Int(page)] += 1 }
            let id = s.nextID
            s.nextID += 1
            s.sequences[id] = entry
            return id
        }
    }

    // MARK: Attention

    /// One attention step for many sequences in one call: `query` [S, Hq, Nq, D] (fp32), row s
    /// attending to every token of `sequences[s]` (causal aligned to each sequence's own end).
    /// Runs on `backend` (default: the dispatcher's choice for the batch), reading pages in place.
    public func attention(
        query: Tensor, sequences: [SequenceID], options: AttentionOptions = .init(),
        backend: (any AttentionBackend)? = nil
    ) throws(AttentionError) -> AttentionResult {
        guard query.shape.count == 4, query.shape[0] == sequences.count, query.shape[3] == headDim else {
            throw .shapeMismatch(
                "query must be [\(sequences.count) sequences, Hq, Nq, \(headDim)], got \(query.shape)")
        }
        return try state.withLock { (s) throws(AttentionError) in
            var lengths: [Int32] = []
            var rows: [[Int32]] = []
            for id in sequences {
                guard let entry = s.sequences[id] else { throw .unknownSequence(id) }
                lengths.append(Int32(entry.length))
                rows.append(entry.pages)
            }
            let maxPages = max(1, rows.map(\.count).max() ?? 1)
            var table = [Int32](repeating: -1, count: sequences.count * maxPages)
            for (b, pages) in rows.enumerated() {
                for (slot, page) in pages.enumerated() { table[b * maxPages + slot] = page }
            }
            let batch = try SequenceBatch(
                query: query.shape, key: [pageCapacity, pageSize, keyValueHeads, headDim],
                value: [pageCapacity, pageSize, keyValueHeads, valueDim],
                layout: .paged(
                    lengths: lengths, table: PageTable(pageSize: pageSize, maxPages: maxPages, blockTable: table)),
                options: options, storage: StorageTypes(keyValue: storage))
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
