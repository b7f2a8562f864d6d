@_exported import AttentionBLAS
@_exported import AttentionCore
@_exported import AttentionOpenCL

/// The backends AttentionKit knows, by name.
public enum BackendChoice: String, Sendable, CaseIterable {
    /// The float64 reference.
    case naive
    /// OpenBLAS tiles on the CPU.
    case blas
    /// OpenCL kernels on a device (`device` picks which).
    case opencl
    /// Chosen per problem (see `BackendSelection.select`).
    case auto
}

/// Picks a backend for a problem.
///
/// `auto` for now: the OpenCL backend when the device is a GPU and supports the problem; otherwise
/// the BLAS backend when it supports the problem (saying why OpenCL was not taken); otherwise the
/// naive reference. The measured, explainable dispatcher replaces this rule in a later release.
public struct BackendSelection: Sendable {
    public let backend: any AttentionBackend
    /// Why this backend was chosen, in one line.
    public let reason: String

    public init(backend: any AttentionBackend, reason: String) {
        self.backend = backend
        self.reason = reason
    }

    public static func select(
        _ choice: BackendChoice, for problem: AttentionProblem, threads: Int? = nil, tiling: BLASTiling? = nil,
        device: Int = 0
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
        case .opencl:
            let opencl = OpenCLBackend(device: device)
            if case let .unsupported(reason) = opencl.support(for: problem) {
                throw .unsupported(backend: opencl.name, reason: reason)
            }
            return BackendSelection(backend: opencl, reason: "requested, \(opencl.kernelChoice(for: problem).choice)")
        case .auto:
            let opencl = OpenCLBackend(device: device)
            let openclNote: String
            switch opencl.support(for: problem) {
            case .supported where opencl.device?.info.isGPU == true:
                return BackendSelection(backend: opencl, reason: "auto: OpenCL GPU \(opencl.device?.info.name ?? "")")
            case .supported:
                openclNote = "OpenCL device \(device) is a CPU, where BLAS is faster"
            case let .unsupported(reason):
                openclNote = "OpenCL unavailable (\(reason))"
            }
            switch blas.support(for: problem) {
            case .supported:
                return BackendSelection(backend: blas, reason: "auto: \(openclNote); using the CPU (blas)")
            case let .unsupported(reason):
                return BackendSelection(backend: NaiveBackend(), reason: "auto: \(openclNote); blas unsupported (\(reason)); using naive")
            }
        }
    }
}
