@_exported import AttentionBLAS
@_exported import AttentionCore

/// The backends AttentionKit knows, by name.
public enum BackendChoice: String, Sendable, CaseIterable {
    /// The float64 reference.
    case naive
    /// OpenBLAS tiles on the CPU.
    case blas
    /// The first supported backend in order of expected speed.
    case auto
}

/// Picks a backend for a problem.
///
/// For now `auto` takes the BLAS backend whenever it supports the problem and the naive reference
/// otherwise; the measured, explainable dispatcher replaces this rule in a later release.
public struct BackendSelection: Sendable {
    public let backend: any AttentionBackend
    /// Why this backend was chosen, in one line.
    public let reason: String

    public static func select(
        _ choice: BackendChoice, for problem: AttentionProblem, threads: Int? = nil, tiling: BLASTiling? = nil
    ) throws(AttentionError) -> BackendSelection {
        let blas = BLASBackend(threads: threads, tiling: tiling)
        switch choice {
        case .naive:
            return BackendSelection(backend: NaiveBackend(), reason: "requested")
        case .blas:
            if case let .unsupported(reason) = blas.support(for: problem) {
                throw .unsupported(backend: blas.name, reason: reason)
            }
            return BackendSelection(backend: blas, reason: "requested")
        case .auto:
            switch blas.support(for: problem) {
            case .supported:
                return BackendSelection(backend: blas, reason: "auto: blas supports the problem")
            case let .unsupported(reason):
                return BackendSelection(backend: NaiveBackend(), reason: "auto: blas unsupported (\(reason)), using naive")
            }
        }
    }
}
