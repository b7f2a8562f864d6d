import AttentionCore

/// The page bookkeeping of a paged K/V cache, wherever its pages live (host memory: `KVCache`; an
/// OpenCL device: `OpenCLKVCache`): the free list, how many sequences own each page (copy-on-write
/// forks), and each sequence's pages and length. Not thread-safe; its cache holds it under a lock.
struct PagePool {
    let pageSize: Int
    let capacity: Int
    private(set) var free: [Int32]
    private var owners: [Int]
    private var sequences: [Int: (pages: [Int32], length: Int)] = [:]
    private var nextID = 0

    init(pageSize: Int, capacity: Int) {
        self.pageSize = pageSize
        self.capacity = capacity
        free = (0..<Int32(capacity)).reversed()
        owners = Array(repeating: 0, count: capacity)
    }

    /// Checks the sizes every paged cache shares: a power-of-two page size up to 1024, positive heads,
    /// dims and pages, and a pool whose element count fits.
    static func validate(keyValueHeads: Int, headDim: Int, valueDim: Int, pageSize: Int, pageCapacity: Int)
        throws(AttentionError)
    {
        guard pageSize >= 1, pageSize <= 1024, pageSize & (pageSize - 1) == 0 else {
            throw .invalidPageTable(reason: "page size \(pageSize) is not a power of two from 1 to 1024")
        }
        guard keyValueHeads > 0, headDim > 0, valueDim > 0, pageCapacity > 0, pageCapacity <= Int(Int32.max) else {
            throw .invalidShape(tensor: "KV cache", shape: [pageCapacity, pageSize, keyValueHeads, headDim, valueDim])
        }
        _ = try Tensor.elementCount(
            of: [pageCapacity, pageSize, keyValueHeads, max(headDim, valueDim), 2], name: "KV cache")
    }

    /// The number of new tokens in `keys` [n, Hkv, D] and `values` [n, Hkv, Dv], checked.
    static func tokenCount(keys: Tensor, values: Tensor, keyValueHeads: Int, headDim: Int, valueDim: Int)
        throws(AttentionError) -> Int
    {
        let n = keys.shape.first ?? 0
        guard keys.shape == [n, keyValueHeads, headDim] else {
            throw .shapeMismatch("keys must be [n, \(keyValueHeads), \(headDim)], got \(keys.shape)")
        }
        guard values.shape == [n, keyValueHeads, valueDim] else {
            throw .shapeMismatch("values must be [\(n), \(keyValueHeads), \(valueDim)], got \(values.shape)")
        }
        return n
    }

    mutating func add() -> Int {
        let id = nextID
        nextID += 1
        sequences[id] = ([], 0)
        return id
    }

    func length(of sequence: Int) throws(AttentionError) -> Int {
        guard let entry = sequences[sequence] else { throw .unknownSequence(sequence) }
        return entry.length
    }

    /// Makes room for `count` more tokens of `sequence`: new pages, and a private copy of a shared,
    /// partly filled last page (`copy`: from, to; the caller copies its contents). Throws `cacheFull`
    /// and changes nothing when the pool lacks pages. Returns the sequence's old length and its pages.
    mutating func append(sequence: Int, count n: Int) throws(AttentionError) -> (
        copy: (from: Int, to: Int)?, start: Int, pages: [Int32]
    ) {
        guard var entry = sequences[sequence] else { throw .unknownSequence(sequence) }
        let length = entry.length
        let needed = (length + n + pageSize - 1) / pageSize
        let partial = length % pageSize != 0
        // A shared last page that will be written must be copied first.
        let copyLast = partial && n > 0 && owners[Int(entry.pages[entry.pages.count - 1])] > 1
        let newPages = needed - entry.pages.count + (copyLast ? 1 : 0)
        guard newPages <= free.count else { throw .cacheFull(neededPages: newPages, freePages: free.count) }
        var copy: (from: Int, to: Int)?
        if copyLast {
            let old = Int(entry.pages.removeLast())
            let page = Int(free.removeLast())
            owners[old] -= 1
            owners[page] = 1
            copy = (old, page)
            entry.pages.append(Int32(page))
        }
        while entry.pages.count < needed {
            let page = free.removeLast()
            owners[Int(page)] = 1
            entry.pages.append(page)
        }
        entry.length += n
        sequences[sequence] = entry
        return (copy, length, entry.pages)
    }

    /// The pool slot (page · pageSize + offset) of token `position` of a sequence with `pages`.
    func slot(of position: Int, pages: [Int32]) -> Int {
        Int(pages[position / pageSize]) * pageSize + position % pageSize
    }

    mutating func remove(sequence: Int) throws(AttentionError) -> [Int32] {
        guard let entry = sequences.removeValue(forKey: sequence) else { throw .unknownSequence(sequence) }
        var freed: [Int32] = []
        for page in entry.pages {
            owners[Int(page)] -= 1
            if owners[Int(page)] == 0 {
                free.append(page)
                freed.append(page)
            }
        }
        return freed
    }

    mutating func fork(sequence: Int) throws(AttentionError) -> Int {
        guard let entry = sequences[sequence] else { throw .unknownSequence(sequence) }
        for page in entry.pages { owners[Int(page)] += 1 }
        let id = nextID
        nextID += 1
        sequences[id] = entry
        return id
    }

    /// The paged batch of one attention step: `query` [S, Hq, Nq, D] against `sequences`' tokens.
    func batch(
        query: [Int], sequences ids: [Int], keyValueHeads: Int, headDim: Int, valueDim: Int,
        options: AttentionOptions, storage: StorageType
    ) throws(AttentionError) -> SequenceBatch {
        guard query.count == 4, query[0] == ids.count, query[3] == headDim else {
            throw .shapeMismatch("query must be [\(ids.count) sequences, Hq, Nq, \(headDim)], got \(query)")
        }
        var lengths: [Int32] = []
        var rows: [[Int32]] = []
        for id in ids {
            guard let entry = sequences[id] else { throw .unknownSequence(id) }
            lengths.append(Int32(entry.length))
            rows.append(entry.pages)
        }
        let maxPages = max(1, rows.map(\.count).max() ?? 1)
        var table = [Int32](repeating: -1, count: ids.count * maxPages)
        for (b, pages) in rows.enumerated() {
            for (slot, page) in pages.enumerated() { table[b * maxPages + slot] = page }
        }
        return try SequenceBatch(
            query: query, key: [capacity, pageSize, keyValueHeads, headDim],
            value: [capacity, pageSize, keyValueHeads, valueDim],
            layout: .paged(
                lengths: lengths, table: PageTable(pageSize: pageSize, maxPages: maxPages, blockTable: table)),
            options: options, storage: StorageTypes(keyValue: storage))
    }
}
