import AttentionCore

/// Reproducible masks for verification: boolean masks with a share of hidden keys and fully hidden
/// rows, additive masks with -inf entries.
public enum MaskGenerator {
    /// A boolean mask of `shape` (last two dimensions Nq, Nk): about `visible` of the keys allowed,
    /// and every `hiddenRowEvery`-th row fully hidden.
    public static func boolean(
        shape: [Int], visible: Double = 0.7, hiddenRowEvery: Int = 5, seed: UInt64
    ) throws(AttentionError) -> AttentionMask {
        var rng = SplitMix64(seed: seed)
        let nk = shape.last ?? 1
        let count = try Tensor.elementCount(of: shape, name: "mask")
        let allowed = (0..<count).map { i in
            (i / nk) % hiddenRowEvery != hiddenRowEvery - 1 && Double.random(in: 0..<1, using: &rng) < visible
        }
        return try AttentionMask(shape: shape, allowed: allowed)
    }

    /// An additive mask of `shape`: about `hidden` of the entries -inf, the rest uniform in [-2, 2].
    public static func additive(shape: [Int], hidden: Double = 0.2, seed: UInt64) throws(AttentionError)
        -> AttentionMask
    {
        var rng = SplitMix64(seed: seed)
        let count = try Tensor.elementCount(of: shape, name: "mask")
        let values = (0..<count).map { _ -> Float in
            Double.random(in: 0..<1, using: &rng) < hidden ? -.infinity : Float.random(in: -2...2, using: &rng)
        }
        return try AttentionMask(shape: shape, additive: values)
    }
}
