/// Which backend a caller wants: one by its identity, or the dispatcher's choice.
public enum BackendChoice: Sendable, Equatable, CustomStringConvertible {
    /// The dispatcher's choice (see `Dispatcher`), unless `ATTENTIONKIT_BACKEND` forces one.
    case auto
    /// That backend, or an error saying why it cannot run the problem.
    case backend(BackendID)

    /// The float64 reference.
    public static let naive = BackendChoice.backend(.naive)
    /// OpenBLAS tiles on the CPU.
    public static let blas = BackendChoice.backend(.blas)
    /// OpenCL kernels on device 0.
    public static let opencl = BackendChoice.backend(.opencl(device: 0))
    /// OpenCL kernels on a device.
    public static func opencl(device: Int) -> BackendChoice { .backend(.opencl(device: device)) }

    /// `auto`, or a backend name (`naive`, `blas`, `opencl`, `opencl:N`).
    public init(parsing text: String) throws(AttentionError) {
        self = text.lowercased() == "auto" ? .auto : .backend(try BackendID(parsing: text))
    }

    public var description: String {
        switch self {
        case .auto: return "auto"
        case .backend(let id): return id.description
        }
    }
}

/// A backend chosen for a problem, and why.
public struct BackendSelection: Sendable {
    public let backend: any AttentionBackend
    /// The dispatcher's full decision, when it made one.
    public let decision: DispatchDecision?
    private let forcedReason: String?
    /// Where `.auto` selections find the backends to fall back on.
    private let dispatcher: Dispatcher?

    /// Why this backend was chosen, in one line (built on demand: selection stays cheap).
    public var reason: String { decision.map { "auto: " + $0.reason } ?? forcedReason ?? "" }

    public init(backend: any AttentionBackend, reason: String) {
        self.backend = backend
        self.forcedReason = reason
        self.decision = nil
        self.dispatcher = nil
    }

    init(backend: any AttentionBackend, decision: DispatchDecision, dispatcher: Dispatcher) {
        self.backend = backend
        self.forcedReason = nil
        self.decision = decision
        self.dispatcher = dispatcher
    }

    /// Selects a backend for `problem` from `dispatcher`'s candidates (default: this machine's, with
    /// this process's configuration and profile).
    ///
    /// A forced choice (`.backend(id)`, or `.auto` overridden by the dispatcher configuration's
    /// `ATTENTIONKIT_BACKEND`) that cannot run the problem throws `.unsupported` with the reason;
    /// `.auto` otherwise asks the dispatcher. `tiling` replaces the BLAS backend's own choice.
    public static func select(
        _ choice: BackendChoice, for problem: AttentionProblem, threads: Int? = nil, tiling: BLASTiling? = nil,
        dispatcher: Dispatcher? = nil
    ) throws(AttentionError) -> BackendSelection {
        let dispatcher = dispatcher ?? (threads == nil ? .process : Dispatcher(threads: threads))
        func withTiling(_ backend: any AttentionBackend) -> any AttentionBackend {
            guard let tiling, backend.id == .blas else { return backend }
            return BLASBackend(threads: threads, tiling: tiling, configuration: dispatcher.configuration)
        }
        return try resolve(
            choice, dispatcher: dispatcher, adapt: withTiling, support: { $0.support(for: problem) },
            decide: { dispatcher.decide(problem) })
    }

    /// The one resolution of a choice: a forced backend (requested, or `.auto` overridden by
    /// `ATTENTIONKIT_BACKEND`) must be supported; `.auto` takes the dispatcher's decision.
    private static func resolve(
        _ choice: BackendChoice, dispatcher: Dispatcher, adapt: (any AttentionBackend) -> any AttentionBackend,
        support: (any AttentionBackend) -> BackendSupport, decide: () -> DispatchDecision
    ) throws(AttentionError) -> BackendSelection {
        func forced(_ id: BackendID, reason: String) throws(AttentionError) -> BackendSelection {
            let backend = adapt(try dispatcher.backend(id))
            if case .unsupported(let why) = support(backend) {
                throw .unsupported(backend: id.description, reason: why)
            }
            return BackendSelection(backend: backend, reason: reason)
        }
        switch choice {
        case .backend(let id):
            return try forced(id, reason: "requested")
        case .auto:
            if let id = try dispatcher.configuration.backendOverride.get() {
                return try forced(id, reason: "forced by \(AttentionConfiguration.backendVariable)=\(id)")
            }
            let decision = decide()
            return BackendSelection(backend: adapt(decision.chosen), decision: decision, dispatcher: dispatcher)
        }
    }
}

extension BackendSelection {
    /// Selects a backend for a batch of sequences, as `select(_:for:)` does for one problem: a forced
    /// choice must support the batch; `.auto` asks the dispatcher, which sums work over sequences.
    public static func select(
        _ choice: BackendChoice, for batch: SequenceBatch, dispatcher: Dispatcher = .process
    ) throws(AttentionError) -> BackendSelection {
        try resolve(
            choice, dispatcher: dispatcher, adapt: { $0 }, support: { $0.support(for: batch) },
            decide: { dispatcher.decide(batch) })
    }
}

/// What `BackendSelection.run` did: the backend whose result the caller has, and every backend that
/// failed at run time before it.
public struct AttentionRun: Sendable, CustomStringConvertible {
    public struct Failure: Sendable {
        public let backend: BackendID
        /// Always `.backendFailure`: the device error (the OpenCL call and its status, a build log...).
        public let error: AttentionError
    }

    /// The backend that computed the outputs.
    public let backend: BackendID
    /// Backends that failed first, in the order they were tried (empty: no fallback).
    public let failures: [Failure]

    public var fellBack: Bool { !failures.isEmpty }

    /// "opencl:0", or "blas (after opencl:0 failed: clEnqueueNDRangeKernel(...) failed with CL_OUT_OF_RESOURCES)".
    public var description: String {
        guard !failures.isEmpty else { return backend.description }
        let reasons = failures.map { failure -> String in
            if case .backendFailure(_, let message) = failure.error { return "\(failure.backend) failed: \(message)" }
            return "\(failure.backend) failed: \(failure.error)"
        }
        return "\(backend) (after \(reasons.joined(separator: "; ")))"
    }
}

extension BackendSelection {
    /// Validates and runs `problem` on the selected backend.
    ///
    /// When `.auto` chose the backend and it fails at run time (`.backendFailure`: an OpenCL call
    /// that failed, a program that did not build, a device out of memory), the next supported
    /// candidate by estimated time runs instead, and so on; the result says which backend produced
    /// the outputs and why the others did not. Backends overwrite every output element, so nothing
    /// of a failed attempt remains. Invalid input is thrown at once; a forced backend never falls back.
    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) -> AttentionRun {
        try runWithFallback { (backend) throws(AttentionError) in try backend.forward(problem, buffers) }
    }

    /// The same for a batch of sequences.
    public func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) -> AttentionRun {
        try runWithFallback { (backend) throws(AttentionError) in try backend.forward(batch, buffers) }
    }

    private func runWithFallback(_ body: (any AttentionBackend) throws(AttentionError) -> Void)
        throws(AttentionError) -> AttentionRun
    {
        do {
            try body(backend)
            return AttentionRun(backend: backend.id, failures: [])
        } catch {
            guard case .backendFailure = error, let decision, let dispatcher else { throw error }
            var failures = [AttentionRun.Failure(backend: backend.id, error: error)]
            let alternatives = decision.options.filter { $0.backend != backend.id && $0.estimatedSeconds != nil }
                .sorted { ($0.estimatedSeconds ?? 0) < ($1.estimatedSeconds ?? 0) }
            for option in alternatives {
                guard let next = try? dispatcher.backend(option.backend) else { continue }
                do {
                    try body(next)
                    return AttentionRun(backend: next.id, failures: failures)
                } catch {
                    guard case .backendFailure = error else { throw error }
                    failures.append(AttentionRun.Failure(backend: next.id, error: error))
                }
            }
            let summary = failures.map { failure -> String in
                if case .backendFailure(_, let message) = failure.error { return "\(failure.backend): \(message)" }
                return "\(failure.backend): \(failure.error)"
            }
            throw .backendFailure(
                backend: backend.id.description,
                message: "every candidate failed (\(summary.joined(separator: "; ")))")
        }
    }
}
