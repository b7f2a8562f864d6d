/// Element strides of a [B, H, N, D] operand: how far apart (in elements) consecutive batch entries,
/// heads and sequence positions are. The last dimension is always contiguous (stride 1).
public struct Strides: Sendable, Equatable, Hashable, CustomStringConvertible {
    public var batch: Int
    public var head: Int
    public var sequence: Int

    public init(batch: Int, head: Int, sequence: Int) {
        self.batch = batch
        self.head = head
        self.sequence = sequence
    }

    /// Dense [B, H, N, D] (PyTorch `scaled_dot_product_attention` order).
    public static func bhsd(_ shape: [Int]) -> Strides {
        Strides(batch: shape[1] * shape[2] * shape[3], head: shape[2] * shape[3], sequence: shape[3])
    }

    /// Dense [B, N, H, D] (FlashAttention, llama.cpp, Hugging Face caches).
    public static func bshd(_ shape: [Int]) -> Strides {
        Strides(batch: shape[2] * shape[1] * shape[3], head: shape[3], sequence: shape[1] * shape[3])
    }

    public var description: String { "(batch \(batch), head \(head), sequence \(sequence))" }

    /// The offset of the last element of a [B, H, N, D] tensor with these strides, or nil when the
    /// offsets overflow (strides are assumed non-negative).
    public func lastOffset(of shape: [Int]) -> Int? {
        var last = shape[3] - 1
        for (extent, stride) in zip(shape.prefix(3), [batch, head, sequence]) {
            let (step, o1) = (extent - 1).multipliedReportingOverflow(by: stride)
            let (sum, o2) = last.addingReportingOverflow(step)
            guard !o1, !o2 else { return nil }
            last = sum
        }
        return last
    }

    /// The element offset of (b, h, n, 0).
    @inlinable
    public func offset(batch b: Int, head h: Int, position n: Int) -> Int { b * batch + h * head + n * sequence }
}

/// A named memory order for all four operands, for the common cases; anything else through strides.
public enum TensorLayout: String, Sendable, CaseIterable, Codable, CustomStringConvertible {
    /// [B, H, N, D], dense.
    case bhsd
    /// [B, N, H, D], dense.
    case bshd

    public var description: String { rawValue }

    /// The strides of a dense tensor of logical shape [B, H, N, D] stored in this order.
    public func strides(_ shape: [Int]) -> Strides { self == .bhsd ? .bhsd(shape) : .bshd(shape) }

    /// The memory shape of a logical [B, H, N, D] tensor in this order.
    public func storedShape(_ shape: [Int]) -> [Int] {
        self == .bhsd ? shape : [shape[0], shape[2], shape[1], shape[3]]
    }
}

/// One operand of a call as it lies in memory: its first element, storage type, strides, and how
/// many elements may be addressed from `address` (the bounds every access is checked against).
///
/// Borrowed for the duration of a call, like `AttentionBuffers`; inputs are only read.
public struct TensorView: @unchecked Sendable {
    public let address: UnsafeMutableRawPointer
    public let storage: StorageType
    /// nil: dense [B, H, N, D] for the problem's shape.
    public let strides: Strides?
    /// Elements addressable from `address`.
    public let capacity: Int

    public init(address: UnsafeMutableRawPointer, storage: StorageType, strides: Strides?, capacity: Int) {
        self.address = address
        self.storage = storage
        self.strides = strides
        self.capacity = capacity
    }

    /// A read-only operand (the view never writes through `address`).
    public init(reading address: UnsafeRawPointer, storage: StorageType, strides: Strides?, capacity: Int) {
        self.init(
            address: UnsafeMutableRawPointer(mutating: address), storage: storage, strides: strides, capacity: capacity)
    }

    /// A dense fp32 buffer.
    public init(_ buffer: UnsafeBufferPointer<Float>) {
        let base = buffer.baseAddress ?? UnsafePointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.init(reading: base, storage: .f32, strides: nil, capacity: buffer.count)
    }

    /// A dense fp32 output buffer.
    public init(_ buffer: UnsafeMutableBufferPointer<Float>) {
        let base = buffer.baseAddress ?? UnsafeMutablePointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.init(address: UnsafeMutableRawPointer(base), storage: .f32, strides: nil, capacity: buffer.count)
    }

    /// A 16-bit buffer (fp16 or bf16 bits) with the given strides (nil: dense). Declared `.f32`, it
    /// holds half as many elements.
    public init(_ buffer: UnsafeBufferPointer<UInt16>, storage: StorageType, strides: Strides? = nil) {
        let base = buffer.baseAddress ?? UnsafePointer(bitPattern: MemoryLayout<UInt16>.alignment)!
        let capacity = buffer.count * 2 / storage.byteSize
        self.init(reading: base, storage: storage, strides: strides, capacity: capacity)
    }

    /// A strided fp32 buffer.
    public init(_ buffer: UnsafeBufferPointer<Float>, strides: Strides?) {
        let base = buffer.baseAddress ?? UnsafePointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.init(reading: base, storage: .f32, strides: strides, capacity: buffer.count)
    }

    /// This view's strides for logical shape `shape` ([B, H, N, D]).
    @inlinable
    public func strides(for shape: [Int]) -> Strides { strides ?? .bhsd(shape) }

    /// Element (b, h, n, d) as fp32; `s` must be `strides(for:)` of the operand's shape.
    @inlinable
    public func load(_ s: Strides, _ b: Int, _ h: Int, _ n: Int, _ d: Int) -> Float {
        let index = s.offset(batch: b, head: h, position: n) + d
        switch storage {
        case .f32: return address.load(fromByteOffset: index * 4, as: Float.self)
        case .f16: return StorageType.decodeHalf(address.load(fromByteOffset: index * 2, as: UInt16.self))
        case .bf16: return StorageType.decodeBFloat(address.load(fromByteOffset: index * 2, as: UInt16.self))
        }
    }

    /// Stores `x` (rounded to this view's type) at element (b, h, n, d).
    @inlinable
    public func store(_ x: Float, _ s: Strides, _ b: Int, _ h: Int, _ n: Int, _ d: Int) {
        let index = s.offset(batch: b, head: h, position: n) + d
        switch storage {
        case .f32: address.storeBytes(of: x, toByteOffset: index * 4, as: Float.self)
        case .f16, .bf16: address.storeBytes(of: storage.encode(x), toByteOffset: index * 2, as: UInt16.self)
        }
    }
}
