/// A sliding window: query i (at key position i' = i + Nk - Nq) sees key j iff
/// `i' - left <= j <= i' + right`. `-1` leaves that side unbounded.
/// `causal: true` with `AttentionWindow(left: L, right: 0)` is Mistral-style sliding-window attention.
public struct AttentionWindow: Sendable, Equatable, Hashable {
    public var left: Int
    public var right: Int
    public init(left: Int, right: Int) {
        self.left = left
        self.right = right
    }

    /// This window with each bounded side at most `span`: a side reaching past every key is the same
    /// as an unbounded one, and clamping it keeps position arithmetic (`pos ± side`) from overflowing.
    @inlinable
    public func clamped(to span: Int) -> AttentionWindow {
        AttentionWindow(left: left < 0 ? left : min(left, span), right: right < 0 ? right : min(right, span))
    }
}

/// Everything about an attention call except the tensors' shapes.
public struct AttentionOptions: Sendable, Equatable {
    /// Multiplies q·k. `nil` means 1 / sqrt(D).
    public var scale: Float?
    /// If set (c > 0), scores become c * tanh(s / c) after scaling (Gemma 2 style).
    public var softcap: Float?
    /// Bottom-right aligned causal masking: query i sees key j iff j <= i + (Nk - Nq).
    /// Equal to PyTorch's `is_causal` only when Nq == Nk.
    public var causal: Bool
    /// Optional sliding window, combined with `causal` and `mask` by AND.
    public var window: AttentionWindow?
    /// Optional explicit mask.
    public var mask: AttentionMask?

    public init(
        scale: Float? = nil, softcap: Float? = nil, causal: Bool = false,
        window: AttentionWindow? = nil, mask: AttentionMask? = nil
    ) {
        self.scale = scale
        self.softcap = softcap
        self.causal = causal
        self.window = window
        self.mask = mask
    }
}
