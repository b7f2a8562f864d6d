import Foundation

// SVG building blocks shared by the plot and the heatmap.

/// Escapes text for SVG/XML.
func xml(_ s: String) -> String {
    s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
}

/// "Nice" axis steps: 1, 2 or 5 times a power of ten.
func niceTicks(max: Double, count: Int = 5) -> [Double] {
    guard max > 0, max.isFinite else { return [0] }
    let raw = max / Double(count)
    let magnitude = pow(10, floor(log10(raw)))
    let step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? raw
    return stride(from: 0, through: max, by: step).map { $0 }
}
