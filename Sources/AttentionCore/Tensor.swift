/// A dense, row-major, contiguous fp32 tensor on the host.
///
/// Attention tensors use PyTorch's `scaled_dot_product_attention` order: Q is [B, Hq, Nq, D],
/// K is [B, Hkv, Nk, D], V is [B, Hkv, Nk, Dv], O is [B, Hq, Nq, Dv].
public struct Tensor: Sendable, Equatable {
    /// The dimensions, outermost first.
    public let shape: [Int]
    /// The elements in row-major order; `storage.count == shape.reduce(1, *)`.
    public private(set) var storage: [Float]

    /// Wraps existing storage. Throws when a dimension is negative or the counts disagree.
    public init(shape: [Int], storage: [Float], name: String = "tensor") throws(AttentionError) {
        let count = try Tensor.elementCount(of: shape, name: name)
        guard count == storage.count else {
            throw .storageSizeMismatch(tensor: name, shape: shape, expectedCount: count, actualCount: storage.count)
        }
        self.shape = shape
        self.storage = storage
    }

    /// A tensor filled with `value`.
    public init(shape: [Int], repeating value: Float = 0, name: String = "tensor") throws(AttentionError) {
        let count = try Tensor.elementCount(of: shape, name: name)
        self.shape = shape
        self.storage = [Float](repeating: value, count: count)
    }

    /// The number of elements.
    public var count: Int { storage.count }

    /// Reads or writes one element by its multi-index (slow; for tests and small tools).
    public subscript(_ index: Int...) -> Float {
        get { storage[flatIndex(index)] }
        set { storage[flatIndex(index)] = newValue }
    }

    private func flatIndex(_ index: [Int]) -> Int {
        precondition(index.count == shape.count, "index rank \(index.count) != tensor rank \(shape.count)")
        var flat = 0
        for (i, dim) in zip(index, shape) {
            precondition(i >= 0 && i < dim, "index \(index) out of bounds for shape \(shape)")
            flat = flat * dim + i
        }
        return flat
    }

    /// Gives the elements as a mutable buffer for bulk writes.
    public mutating func withUnsafeMutableBufferPointer<R, E: Error>(
        _ body: (inout UnsafeMutableBufferPointer<Float>) throws(E) -> R
    ) throws(E) -> R {
        try storage.withUnsafeMutableBufferPointer { (buffer) throws(E) -> R in try body(&buffer) }
    }

    /// The element count of `shape`, or an error naming `name` when a dimension is negative or the
    /// product overflows.
    public static func elementCount(of shape: [Int], name: String) throws(AttentionError) -> Int {
        var count = 1
        for dim in shape {
            guard dim >= 0 else { throw .invalidShape(tensor: name, shape: shape) }
            let (product, overflow) = count.multipliedReportingOverflow(by: dim)
            guard !overflow else { throw .invalidShape(tensor: name, shape: shape) }
            count = product
        }
        return count
    }
}
