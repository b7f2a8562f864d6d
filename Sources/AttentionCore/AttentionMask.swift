/// An explicit attention mask, broadcast over [B|1, Hq|1, Nq, Nk].
///
/// Leading dimensions may be omitted (a [Nq, Nk] mask applies to every batch and head), as in
/// NumPy broadcasting. It combines with `causal` and `window` by logical AND.
public struct AttentionMask: Sendable, Equatable {
    public enum Values: Sendable, Equatable {
        /// `true` = the query may attend to the key.
        case boolean([Bool])
        /// Added to the score after scaling and softcap; `-infinity` hides the key.
        case additive([Float])
    }

    /// The mask's own shape, rank 2 to 4.
    public let shape: [Int]
    public let values: Values

    /// A boolean mask (`true` = may attend).
    public init(shape: [Int], allowed: [Bool]) throws(AttentionError) {
        try Self.check(shape: shape, count: allowed.count)
        self.shape = shape
        self.values = .boolean(allowed)
    }

    /// An additive float mask: finite values, or -infinity to hide a key. +infinity and NaN are refused
    /// (they would make the softmax undefined: every backend would return NaN).
    public init(shape: [Int], additive: [Float]) throws(AttentionError) {
        try Self.check(shape: shape, count: additive.count)
        if let i = additive.firstIndex(where: { $0.isNaN || $0 == .infinity }) {
            throw .unsupportedOption(
                "additive mask element \(i) is \(additive[i]): values must be finite, or -infinity to hide a key")
        }
        self.shape = shape
        self.values = .additive(additive)
    }

    private static func check(shape: [Int], count: Int) throws(AttentionError) {
        guard (2...4).contains(shape.count) else {
            throw .invalidRank(tensor: "mask", expected: "2, 3 or 4", actual: shape)
        }
        let expected = try Tensor.elementCount(of: shape, name: "mask")
        guard !shape.contains(0) else { throw .zeroSizedDimension(tensor: "mask", shape: shape) }
        guard expected == count else {
            throw .storageSizeMismatch(tensor: "mask", shape: shape, expectedCount: expected, actualCount: count)
        }
    }

    public var isBoolean: Bool {
        if case .boolean = values { return true }
        return false
    }
}

/// How a mask maps onto [B, Hq, Nq, Nk]: element (b, h, i, j) lives at
/// `b * batchStride + h * headStride + i * Nk + j` (strides are 0 for broadcast dimensions).
public struct MaskLayout: Sendable, Equatable {
    public let batchStride: Int
    public let headStride: Int
    public let rowStride: Int

    @inlinable
    public func offset(batch: Int, head: Int, row: Int) -> Int {
        batch * batchStride + head * headStride + row * rowStride
    }
}
