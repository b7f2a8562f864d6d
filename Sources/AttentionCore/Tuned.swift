/// A tuned value (block sizes) for one head dimension.
public struct Tuned<Value: Codable & Sendable & Equatable>: Codable, Sendable, Equatable {
    public var headDim: Int
    public var value: Value
    public init(headDim: Int, value: Value) {
        self.headDim = headDim
        self.value = value
    }
}

extension Array {
    /// The value tuned for the head dimension nearest to `headDim`, if any.
    public func nearest<Value>(to headDim: Int) -> Value? where Element == Tuned<Value> {
        self.min { abs($0.headDim - headDim) < abs($1.headDim - headDim) }?.value
    }
}
