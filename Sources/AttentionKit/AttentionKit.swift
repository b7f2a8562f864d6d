@_exported import AttentionBLAS
@_exported import AttentionCore
@_exported import AttentionOpenCL
import Foundation

/// The backends AttentionKit knows, by name.
public enum BackendChoice: String, Sendable, CaseIterable {
    /// The float64 reference.
    case naive
    /// OpenBLAS tiles on the CPU.
    case blas
    /// OpenCL kernels on a device (`device` picks which).
    case opencl
    /// The dispatcher's choice (see `Dispatcher`), unless `ATTENTIONKIT_BACKEND` forces one.
    case auto
}

/// A backend chosen for a problem, and why.
public struct BackendSelection: Sendable {
    public let backend: any AttentionBackend
    /// The dispatcher's full decision, when it made one.
    public let decision: DispatchDecision?
    private let forcedReason: String?

    /// Why this backend was chosen, in one line (built on demand: selection stays cheap).
    public var reason: String { decision.map { "auto: " + $0.reason } ?? forcedReason ?? "" }

    public init(backend: any AttentionBackend, reason: String) {
        self.backend = backend
        self.forcedReason = reason
        self.decision = nil
    }

    init(backend: any AttentionBackend, decision: DispatchDecision) {
        self.backend = backend
        self.forcedReason = nil
        self.decision = decision
    }

    /// The environment variable that forces a backend for `.auto`: naive, blas, opencl, opencl:N.
    public static let overrideVariable = "ATTENTIONKIT_BACKEND"

    /// `ATTENTIONKIT_BACKEND` as this process started with it (read once).
    static let processOverride: String? = ProcessInfo.processInfo.environment[overrideVariable]

    /// Selects a backend. A forced choice (`.naive`, `.blas`, `.opencl`, or `.auto` overridden by
    /// `ATTENTIONKIT_BACKEND`) that cannot run the problem throws `.unsupported` with the reason;
    /// `.auto` otherwise asks the dispatcher. Tuned block sizes from the machine profile apply to
    /// every choice unless `tiling` is given.
    public static func select(
        _ choice: BackendChoice, for problem: AttentionProblem, threads: Int? = nil, tiling: BLASTiling? = nil,
        device: Int = 0, dispatcher: Dispatcher? = nil, environment: [String: String]? = nil
    ) throws(AttentionError) -> BackendSelection {
        let dispatcher = dispatcher ?? Dispatcher.current(threads: threads)
        func forced(_ name: String, reason: String) throws(AttentionError) -> BackendSelection {
            var backend: any AttentionBackend
            if let candidate = dispatcher.candidates.first(where: { $0.profile.backend == name }) {
                backend = candidate.make(problem)
            } else if name.hasPrefix("opencl:"), let index = Int(name.dropFirst("opencl:".count)) {
                backend = OpenCLBackend(device: index)  // says which devices exist
            } else {
                let known = dispatcher.candidates.map(\.profile.backend).joined(separator: ", ")
                throw .unsupported(backend: name, reason: "no such backend on this machine (have: \(known))")
            }
            if name == "blas", let tiling { backend = BLASBackend(threads: threads, tiling: tiling) }
            if case let .unsupported(why) = backend.support(for: problem) { throw .unsupported(backend: backend.name, reason: why) }
            return BackendSelection(backend: backend, reason: reason)
        }
        switch choice {
        case .naive: return try forced("naive", reason: "requested")
        case .blas: return try forced("blas", reason: "requested")
        case .opencl: return try forced("opencl:\(device)", reason: "requested")
        case .auto:
            let override = environment.map { $0[overrideVariable] } ?? processOverride
            if let value = override, !value.isEmpty, value != "auto" {
                let name = value == "opencl" ? "opencl:0" : value
                return try forced(name, reason: "forced by \(overrideVariable)=\(value)")
            }
            let decision = dispatcher.decide(problem)
            var backend = decision.chosen
            if decision.winner.backend == "blas", let tiling { backend = BLASBackend(threads: threads, tiling: tiling) }
            return BackendSelection(backend: backend, decision: decision)
        }
    }
}
