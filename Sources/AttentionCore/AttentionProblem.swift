/// A validated attention problem: shapes, resolved scale, visibility rules and mask layout.
///
/// Dimension letters: B batch, Hq query heads, Hkv key/value heads (Hq % Hkv == 0; query head h
/// reads key/value head h / (Hq / Hkv)), Nq queries, Nk keys, D query/key head size, Dv value head size.
public struct AttentionProblem: Sendable, Equatable {
    public let batch: Int
    public let queryHeads: Int
    public let keyValueHeads: Int
    public let queryLength: Int
    public let keyLength: Int
    public let headDim: Int
    public let valueDim: Int
    /// The scale actually used (the default 1 / sqrt(D) resolved).
    public let scale: Float
    public let options: AttentionOptions
    /// Where mask element (b, h, i, 0) lives, when there is a mask.
    public let maskLayout: MaskLayout?
    /// How Q, K/V and O are stored (fp32 unless declared; arithmetic is fp32 regardless).
    public let storage: StorageTypes

    /// Validates shapes and options. Q: [B, Hq, Nq, D], K: [B, Hkv, Nk, D], V: [B, Hkv, Nk, Dv] (logical
    /// shapes: the buffers may be strided); `storage` declares how the buffers hold their elements.
    public init(
        query: [Int], key: [Int], value: [Int], options: AttentionOptions = .init(), storage: StorageTypes = .f32
    ) throws(AttentionError) {
        for (name, shape) in [("query", query), ("key", key), ("value", value)] {
            guard shape.count == 4 else {
                throw .invalidRank(tensor: name, expected: "4 ([B, H, N, D])", actual: shape)
            }
            _ = try Tensor.elementCount(of: shape, name: name)
            guard !shape.contains(0) else { throw .zeroSizedDimension(tensor: name, shape: shape) }
        }
        guard key[0] == query[0], value[0] == query[0] else {
            throw .shapeMismatch("batch sizes differ: query \(query[0]), key \(key[0]), value \(value[0])")
        }
        guard key[1] == value[1] else {
            throw .shapeMismatch("key has \(key[1]) heads but value has \(value[1])")
        }
        guard key[2] == value[2] else {
            throw .shapeMismatch("key has \(key[2]) positions but value has \(value[2])")
        }
        guard key[3] == query[3] else {
            throw .shapeMismatch("query head dimension D = \(query[3]) but key has D = \(key[3])")
        }
        guard query[1] % key[1] == 0 else { throw .headsNotDivisible(queryHeads: query[1], keyValueHeads: key[1]) }

        batch = query[0]
        queryHeads = query[1]
        queryLength = query[2]
        headDim = query[3]
        keyValueHeads = key[1]
        keyLength = key[2]
        valueDim = value[3]
        // The output must be addressable too.
        _ = try Tensor.elementCount(of: [batch, queryHeads, queryLength, valueDim], name: "output")

        if let scale = options.scale {
            guard scale.isFinite else { throw .invalidScale(scale) }
            self.scale = scale
        } else {
            self.scale = 1 / Float(headDim).squareRoot()
        }
        if let cap = options.softcap {
            guard cap.isFinite, cap > 0 else { throw .invalidSoftcap(cap) }
        }
        if let window = options.window {
            guard window.left >= -1, window.right >= -1 else {
                throw .invalidWindow(left: window.left, right: window.right)
            }
        }
        if let mask = options.mask {
            maskLayout = try Self.layout(
                of: mask.shape, batch: batch, heads: queryHeads, nq: queryLength, nk: keyLength)
        } else {
            maskLayout = nil
        }
        self.options = options
        self.storage = storage
    }

    private static func layout(of shape: [Int], batch: Int, heads: Int, nq: Int, nk: Int) throws(AttentionError)
        -> MaskLayout
    {
        let full = Array(repeating: 1, count: 4 - shape.count) + shape
        let target = [batch, heads, nq, nk]
        guard full[2] == nq, full[3] == nk,
            full[1] == 1 || full[1] == heads,
            full[0] == 1 || full[0] == batch
        else { throw .maskNotBroadcastable(maskShape: shape, target: target) }
        let rowStride = nk
        let headStride = full[1] == 1 ? 0 : nq * nk
        let batchStride = full[0] == 1 ? 0 : full[1] * nq * nk
        return MaskLayout(batchStride: batchStride, headStride: headStride, rowStride: rowStride)
    }

    // MARK: Regime

    /// How a problem is bound: by arithmetic (prefill-like) or by reading K and V (decode-like).
    public enum Regime: String, Sendable, Equatable {
        /// Few query rows against the keys: time is K/V bytes over memory bandwidth.
        case decodeLike = "decode-like"
        /// Enough query rows that the products are matrix-matrix: time is FLOPs over throughput.
        case prefillLike = "prefill-like"
    }

    /// Problems with at most this many queries (Nq) are decode-like: single-token decode,
    /// speculative decoding, short chunks. The one place this threshold is stated.
    public static let decodeQueryLimit = 16

    /// The regime of problems with `queryLength` queries (see `decodeQueryLimit`).
    public static func regime(queryLength: Int) -> Regime {
        queryLength <= decodeQueryLimit ? .decodeLike : .prefillLike
    }

    /// This problem's regime.
    public var regime: Regime { Self.regime(queryLength: queryLength) }

    // MARK: Derived sizes

    public var queryShape: [Int] { [batch, queryHeads, queryLength, headDim] }
    public var keyShape: [Int] { [batch, keyValueHeads, keyLength, headDim] }
    public var valueShape: [Int] { [batch, keyValueHeads, keyLength, valueDim] }
    public var outputShape: [Int] { [batch, queryHeads, queryLength, valueDim] }
    public var lseShape: [Int] { [batch, queryHeads, queryLength] }
    /// Query heads per key/value head.
    public var groupSize: Int { queryHeads / keyValueHeads }

    // MARK: Visibility

    /// The inclusive key range [lo, hi] that causal and window rules leave visible to query `i`
    /// (before the mask); empty when lo > hi.
    @inlinable
    public func visibleKeys(forQuery i: Int) -> (lo: Int, hi: Int) {
        Self.visibleKeys(
            query: i, queryLength: queryLength, keyLength: keyLength, causal: options.causal, window: options.window)
    }

    /// The visibility rule itself (bottom-right aligned: query i sits at key position
    /// i + Nk - Nq), for any problem or sequence of a batch: the one place it is written.
    @inlinable
    public static func visibleKeys(
        query i: Int, queryLength: Int, keyLength: Int, causal: Bool, window: AttentionWindow?
    ) -> (lo: Int, hi: Int) {
        let pos = i + (keyLength - queryLength)
        var lo = 0
        var hi = keyLength - 1
        if causal { hi = min(hi, pos) }
        if let window = window?.clamped(to: keyLength + queryLength) {
            if window.left >= 0 { lo = max(lo, pos - window.left) }
            if window.right >= 0 { hi = min(hi, pos + window.right) }
        }
        return (lo, hi)
    }

    // MARK: Work

    /// FLOPs by the FlashAttention convention: 2·B·Hq·Nq·Nk·(D + Dv), halved for causal with Nq == Nk.
    public var flops: Double {
        let full =
            2.0 * Double(batch) * Double(queryHeads) * Double(queryLength) * Double(keyLength)
            * Double(headDim + valueDim)
        return options.causal && queryLength == keyLength ? full / 2 : full
    }

    /// Bytes of K and V read once in their storage type (the floor for memory-bound decode).
    public var keyValueBytes: Double {
        Double(storage.keyValue.byteSize) * Double(batch) * Double(keyValueHeads) * Double(keyLength)
            * Double(headDim + valueDim)
    }
}
