/// SplitMix64: a small, fast, seedable generator so that tests and benchmarks are reproducible.
public struct SplitMix64: RandomNumberGenerator, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension Tensor {
    /// A tensor of uniform values in `range`, reproducible from `seed`.
    public static func random(
        shape: [Int], seed: UInt64, in range: ClosedRange<Float> = -1...1
    ) throws(AttentionError) -> Tensor {
        var rng = SplitMix64(seed: seed)
        let count = try elementCount(of: shape, name: "tensor")
        let values = (0..<count).map { _ in Float.random(in: range, using: &rng) }
        return try Tensor(shape: shape, storage: values)
    }
}
