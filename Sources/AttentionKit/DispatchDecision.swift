import AttentionCore
import Foundation

/// The dispatcher's decision for one problem, as data: every candidate, whether it can run the
/// problem and why not, its estimated time, and the winner.
public struct DispatchDecision: Sendable, CustomStringConvertible {
    public struct Option: Sendable {
        public let backend: BackendID
        public let device: String
        /// Supported, or why not (including the memory guard).
        public let support: BackendSupport
        /// Estimated seconds from the profile (nil when unsupported).
        public let estimatedSeconds: Double?
        /// The regime, the backend's path and its workspace ("decode-like, split-KV decode (...)").
        public let detail: String
    }

    public let options: [Option]
    /// Index into `options` of the winner.
    public let chosenIndex: Int
    public let chosen: any AttentionBackend
    /// Where the profile came from ("built-in defaults", "measured by attnbench tune on ...").
    public let profileSource: String

    public var winner: Option { options[chosenIndex] }

    public var reason: String {
        let runnersUp = options.enumerated().filter { $0.offset != chosenIndex && $0.element.estimatedSeconds != nil }
            .sorted { $0.element.estimatedSeconds! < $1.element.estimatedSeconds! }
        var text = "\(winner.backend) estimated fastest (\(Self.ms(winner.estimatedSeconds)))"
        if let next = runnersUp.first {
            text += ", next \(next.element.backend) (\(Self.ms(next.element.estimatedSeconds)))"
        }
        let refused = options.filter { !$0.support.isSupported }
        if !refused.isEmpty {
            text +=
                "; not possible: "
                + refused.map { option -> String in
                    if case .unsupported(let why) = option.support { return "\(option.backend) (\(why))" }
                    return option.backend.description
                }.joined(separator: ", ")
        }
        return text + "; profile: \(profileSource)"
    }

    public var description: String { reason }

    static func ms(_ seconds: Double?) -> String {
        guard let seconds else { return "-" }
        let value = seconds * 1e3
        return value >= 100 ? "\(Int(value.rounded())) ms" : String(format: "%.3g ms", value)
    }
}
