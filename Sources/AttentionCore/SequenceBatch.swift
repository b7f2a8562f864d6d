/// Paged K/V: which pages of a pool hold each sequence's keys (vLLM / FlashInfer block tables).
///
/// Key j of sequence b lives in row `j % pageSize` of page `blockTable[b * maxPages + j / pageSize]`.
public struct PageTable: Sendable, Equatable {
    /// Keys per page: a power of two from 1 to 1024.
    public let pageSize: Int
    /// Columns of the block table: the most pages any sequence may use.
    public let maxPages: Int
    /// [B, maxPages] page indices, row-major. Entries past a sequence's length are never read.
    public let blockTable: [Int32]

    public init(pageSize: Int, maxPages: Int, blockTable: [Int32]) {
        self.pageSize = pageSize
        self.maxPages = maxPages
        self.blockTable = blockTable
    }

    /// The page holding key `j` of sequence `b`.
    @inlinable
    public func page(sequence b: Int, key j: Int) -> Int { Int(blockTable[b * maxPages + j / pageSize]) }
}

/// How the sequences of a serving batch lie in the buffers (ATTENTION.md, "Batches of sequences").
public enum SequenceLayout: Sendable, Equatable {
    /// Sequences packed end to end without padding (`flash_attn_varlen_func`): Q [totalQ, Hq, D],
    /// K [totalK, Hkv, D], V [totalK, Hkv, Dv], O [totalQ, Hq, Dv], LSE [totalQ, Hq]. Sequence s owns
    /// query rows [queryOffsets[s], queryOffsets[s+1]) and keys [keyOffsets[s], keyOffsets[s+1]).
    case packed(queryOffsets: [Int32], keyOffsets: [Int32])
    /// Per-sequence caches (`flash_attn_with_kvcache`): Q [B, Hq, Nq, D], K/V [B, Hkv, C, D] with
    /// capacity C (any layout); sequence b sees keys [0, lengths[b]).
    case cacheLengths([Int32])
    /// Paged caches: Q [B, Hq, Nq, D]; K and V are pools of pages, logically [numPages, Hkv,
    /// pageSize, D] (dense order [numPages, pageSize, Hkv, D] unless strides say otherwise: the
    /// view's batch stride steps pages); sequence b sees keys [0, lengths[b]) through `table`.
    case paged(lengths: [Int32], table: PageTable)

    /// The form's name, for messages and tables.
    public var name: String {
        switch self {
        case .packed: return "varlen"
        case .cacheLengths: return "cache-lengths"
        case .paged: return "paged"
        }
    }
}

/// A validated batch of attention problems, one per sequence, over shared buffers.
///
/// Every option applies to each sequence on its own: causal and window bottom-right aligned to the
/// sequence's own key length. A sequence with no queries writes nothing; one with no keys gets
/// zero rows and -inf log-sum-exp. Masks are refused (they have no per-sequence meaning here).
public struct SequenceBatch: Sendable, Equatable {
    public let layout: SequenceLayout
    public let queryHeads: Int
    public let keyValueHeads: Int
    public let headDim: Int
    public let valueDim: Int
    public let options: AttentionOptions
    public let storage: StorageTypes
    /// Queries and keys of each sequence.
    public let queryLengths: [Int]
    public let keyLengths: [Int]
    /// Logical [B, H, N, D] shapes of the four buffers as the views address them (packed tensors
    /// are [1, H, total, D]; page pools [numPages, Hkv, pageSize, D]).
    public let queryShape: [Int]
    public let keyShape: [Int]
    public let valueShape: [Int]
    public let outputShape: [Int]

    /// - Parameters:
    ///   - query, key, value: the stored shapes: packed `[total, H, D]`; cache lengths
    ///     `[B, H, N, D]` (K/V: N = capacity); paged Q `[B, Hq, Nq, D]` and pools
    ///     `[numPages, pageSize, Hkv, D]`.
    public init(
        query: [Int], key: [Int], value: [Int], layout: SequenceLayout, options: AttentionOptions = .init(),
        storage: StorageTypes = .f32
    ) throws(AttentionError) {
        guard options.mask == nil else {
            throw .unsupportedOption("masks are not accepted for a batch of sequences (\(layout.name))")
        }
        let rank = { () -> Int in if case .packed = layout { return 3 } else { return 4 } }()
        for (name, shape) in [("query", query), ("key", key), ("value", value)] {
            guard shape.count == rank else {
                let expected = rank == 3 ? "3 ([total, H, D])" : "4"
                throw .invalidRank(tensor: name, expected: expected, actual: shape)
            }
            _ = try Tensor.elementCount(of: shape, name: name)
            guard !shape.contains(0) || rank == 3 else { throw .zeroSizedDimension(tensor: name, shape: shape) }
        }
        let hq = query[1]
        let d = query[rank - 1]
        let (hkv, kd, vHeads, dv): (Int, Int, Int, Int)
        if case .paged = layout {
            (hkv, kd, vHeads, dv) = (key[2], key[3], value[2], value[3])
        } else {
            (hkv, kd, vHeads, dv) = (key[1], key[rank - 1], value[1], value[rank - 1])
        }
        guard hq > 0, hkv > 0, d > 0, dv > 0 else {
            throw .zeroSizedDimension(tensor: "query", shape: query)
        }
        guard kd == d else { throw .shapeMismatch("query head dimension D = \(d) but key has D = \(kd)") }
        guard vHeads == hkv else { throw .shapeMismatch("key has \(hkv) heads but value has \(vHeads)") }
        guard hq % hkv == 0 else { throw .headsNotDivisible(queryHeads: hq, keyValueHeads: hkv) }
        (queryHeads, keyValueHeads, headDim, valueDim) = (hq, hkv, d, dv)

        switch layout {
        case .packed(let cuQ, let cuK):
            guard key[0] == value[0] else {
                throw .shapeMismatch("key has \(key[0]) rows but value has \(value[0])")
            }
            let qLengths = try Self.lengths(of: cuQ, name: "cuSeqlensQ", total: query[0], exact: true)
            let kLengths = try Self.lengths(of: cuK, name: "cuSeqlensK", total: key[0], exact: false)
            guard qLengths.count == kLengths.count else {
                throw .invalidSequenceOffsets(
                    name: "cuSeqlensK", index: 0,
                    reason: "\(cuK.count) offsets for \(cuQ.count) query offsets (both must be S + 1)")
            }
            queryLengths = qLengths
            keyLengths = kLengths
            queryShape = [1, hq, query[0], d]
            keyShape = [1, hkv, key[0], d]
            valueShape = [1, hkv, value[0], dv]
            outputShape = [1, hq, query[0], dv]
        case .cacheLengths(let lengths):
            guard key[0] == query[0], value[0] == query[0] else {
                throw .shapeMismatch("batch sizes differ: query \(query[0]), key \(key[0]), value \(value[0])")
            }
            guard key[2] == value[2] else {
                throw .shapeMismatch("key cache has capacity \(key[2]) but value cache \(value[2])")
            }
            guard lengths.count == query[0] else {
                throw .shapeMismatch("\(lengths.count) cache lengths for a batch of \(query[0])")
            }
            for (b, length) in lengths.enumerated() where length < 0 || Int(length) > key[2] {
                throw .invalidCacheLength(sequence: b, length: Int(length), limit: key[2])
            }
            queryLengths = Array(repeating: query[2], count: query[0])
            keyLengths = lengths.map(Int.init)
            (queryShape, keyShape, valueShape) = (query, key, value)
            outputShape = [query[0], hq, query[2], dv]
        case .paged(let lengths, let table):
            let p = table.pageSize
            guard p >= 1, p <= 1024, p & (p - 1) == 0 else {
                throw .invalidPageTable(reason: "page size \(p) is not a power of two from 1 to 1024")
            }
            guard key[1] == p, value[1] == p, value[0] == key[0] else {
                throw .shapeMismatch(
                    "page pools must be [numPages, pageSize = \(p), Hkv, D]: key \(key), value \(value)")
            }
            guard lengths.count == query[0] else {
                throw .shapeMismatch("\(lengths.count) cache lengths for a batch of \(query[0])")
            }
            guard table.maxPages >= 1, table.blockTable.count == query[0] * table.maxPages else {
                throw .invalidPageTable(
                    reason: "block table has \(table.blockTable.count) entries, expected B \(query[0]) x "
                        + "maxPages \(table.maxPages)")
            }
            let pages = key[0]
            for (b, length) in lengths.enumerated() {
                guard length >= 0, Int(length) <= table.maxPages * p else {
                    throw .invalidCacheLength(sequence: b, length: Int(length), limit: table.maxPages * p)
                }
                for slot in 0..<((Int(length) + p - 1) / p) {
                    let page = table.blockTable[b * table.maxPages + slot]
                    guard page >= 0, Int(page) < pages else {
                        throw .invalidPageTable(
                            reason: "sequence \(b), slot \(slot) names page \(page); the pool has \(pages) pages")
                    }
                }
            }
            queryLengths = Array(repeating: query[2], count: query[0])
            keyLengths = lengths.map(Int.init)
            queryShape = query
            keyShape = [pages, hkv, p, d]
            valueShape = [pages, hkv, p, dv]
            outputShape = [query[0], hq, query[2], dv]
        }
        // Per-sequence options are validated once, through an ordinary problem.
        _ = try AttentionProblem(query: [1, hq, 1, d], key: [1, hkv, 1, d], value: [1, hkv, 1, dv], options: options)
        self.layout = layout
        self.options = options
        self.storage = storage
    }

    private static func lengths(of offsets: [Int32], name: String, total: Int, exact: Bool) throws(AttentionError)
        -> [Int]
    {
        guard offsets.count >= 1 else {
            throw .invalidSequenceOffsets(name: name, index: 0, reason: "needs S + 1 >= 1 offsets")
        }
        guard offsets[0] == 0 else {
            throw .invalidSequenceOffsets(name: name, index: 0, reason: "starts at \(offsets[0]), not 0")
        }
        var lengths: [Int] = []
        lengths.reserveCapacity(offsets.count - 1)
        for s in 1..<offsets.count {
            guard offsets[s] >= offsets[s - 1] else {
                throw .invalidSequenceOffsets(
                    name: name, index: s, reason: "\(offsets[s]) is below the previous offset \(offsets[s - 1])")
            }
            guard Int(offsets[s]) <= total else {
                throw .invalidSequenceOffsets(
                    name: name, index: s, reason: "\(offsets[s]) is beyond the \(total) packed rows")
            }
            lengths.append(Int(offsets[s] - offsets[s - 1]))
        }
        if exact, Int(offsets[offsets.count - 1]) != total {
            throw .invalidSequenceOffsets(
                name: name, index: offsets.count - 1,
                reason: "ends at \(offsets[offsets.count - 1]) but the tensor has \(total) rows (every row is written)"
            )
        }
        return lengths
    }

    // MARK: Derived

    /// Sequences in the batch.
    public var count: Int { queryLengths.count }
    public var groupSize: Int { queryHeads / keyValueHeads }
    /// The scale actually used.
    public var scale: Float { options.scale ?? 1 / Float(headDim).squareRoot() }

    /// Elements of the log-sum-exp buffer: [totalQ, Hq] packed, [B, Hq, Nq] otherwise.
    public var logSumExpCount: Int { outputShape[0] * queryHeads * outputShape[2] }

    /// Default strides for views declared without strides: dense in the stored order.
    public func defaultStrides(_ operand: Operand) -> Strides {
        let shape: [Int]
        switch operand {
        case .query: shape = queryShape
        case .key: shape = keyShape
        case .value: shape = valueShape
        case .output: shape = outputShape
        }
        switch layout {
        case .packed: return .bshd(shape)
        case .cacheLengths: return .bhsd(shape)
        case .paged: return operand == .key || operand == .value ? .bshd(shape) : .bhsd(shape)
        }
    }

    /// The four operands.
    public enum Operand: Sendable { case query, key, value, output }

    /// Sequence s as an ordinary problem over its own keys (batch 1), or nil when it has no queries
    /// or no keys (the caller writes nothing, or zero rows and -inf).
    public func problem(sequence s: Int) -> AttentionProblem? {
        let (nq, nk) = (queryLengths[s], keyLengths[s])
        guard nq > 0, nk > 0 else { return nil }
        return try? AttentionProblem(
            query: [1, queryHeads, nq, headDim], key: [1, keyValueHeads, nk, headDim],
            value: [1, keyValueHeads, nk, valueDim], options: options, storage: storage)
    }

    /// The inclusive visible key range [lo, hi] of query i of sequence s (before clipping to
    /// anything else; empty when lo > hi).
    @inlinable
    public func visibleKeys(sequence s: Int, query i: Int) -> (lo: Int, hi: Int) {
        AttentionProblem.visibleKeys(
            query: i, queryLength: queryLengths[s], keyLength: keyLengths[s], causal: options.causal,
            window: options.window)
    }

    /// One problem with the most queries and the most keys of any sequence (nil when every
    /// sequence is empty): what support checks are made on.
    public var largestProblem: AttentionProblem? {
        guard let nq = queryLengths.max(), let nk = keyLengths.max(), nq > 0, nk > 0 else { return nil }
        return try? AttentionProblem(
            query: [1, queryHeads, nq, headDim], key: [1, keyValueHeads, nk, headDim],
            value: [1, keyValueHeads, nk, valueDim], options: options, storage: storage)
    }

    /// The largest query count of any sequence.
    public var maxQueryLength: Int { queryLengths.max() ?? 0 }

    /// Decode-like when every sequence has at most `AttentionProblem.decodeQueryLimit` queries.
    public var regime: AttentionProblem.Regime { AttentionProblem.regime(queryLength: maxQueryLength) }

    // MARK: Work (the sum over sequences, never the padded product)

    /// FLOPs summed over the sequences (FlashAttention convention per sequence).
    public var flops: Double {
        (0..<count).reduce(0) { $0 + (problem(sequence: $1)?.flops ?? 0) }
    }

    /// K/V bytes read once, summed over the sequences.
    public var keyValueBytes: Double {
        let perKey = Double(storage.keyValue.byteSize * keyValueHeads * (headDim + valueDim))
        return Double(keyLengths.reduce(0, +)) * perKey
    }

    /// The same sequences padded to the longest (queries and keys): what a caller without this
    /// form would run, for comparisons.
    public var paddedProblem: AttentionProblem? {
        guard let nq = queryLengths.max(), let nk = keyLengths.max(), nq > 0, nk > 0 else { return nil }
        return try? AttentionProblem(
            query: [count, queryHeads, nq, headDim], key: [count, keyValueHeads, nk, headDim],
            value: [count, keyValueHeads, nk, valueDim], options: options, storage: storage)
    }
}
