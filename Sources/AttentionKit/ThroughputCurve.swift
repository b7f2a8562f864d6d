import Foundation

/// Throughput against key length: measured or default points, interpolated log-linearly in Nk
/// and held constant beyond the ends.
public struct ThroughputCurve: Codable, Sendable, Equatable {
    public struct Point: Codable, Sendable, Equatable {
        public var keyLength: Int
        public var value: Double
        public init(keyLength: Int, value: Double) {
            self.keyLength = keyLength
            self.value = value
        }
    }

    public var points: [Point]

    public init(_ points: [(Int, Double)]) {
        self.points = points.map { Point(keyLength: $0.0, value: $0.1) }.sorted { $0.keyLength < $1.keyLength }
    }

    public func value(at keyLength: Int) -> Double {
        guard let first = points.first, let last = points.last else { return 0 }
        if keyLength <= first.keyLength { return first.value }
        if keyLength >= last.keyLength { return last.value }
        let x = log2(Double(keyLength))
        for (a, b) in zip(points, points.dropFirst()) where keyLength <= b.keyLength {
            let (xa, xb) = (log2(Double(a.keyLength)), log2(Double(b.keyLength)))
            let t = xb > xa ? (x - xa) / (xb - xa) : 0
            return a.value + (b.value - a.value) * t
        }
        return last.value
    }
}
