/// Whether a backend can run a problem, and if not, why.
public enum BackendSupport: Sendable, Equatable, CustomStringConvertible {
    case supported
    case unsupported(reason: String)

    public var isSupported: Bool { self == .supported }
    public var description: String {
        switch self {
        case .supported: return "supported"
        case .unsupported(let reason): return "unsupported: \(reason)"
        }
    }
}

/// Borrowed views of one call's host buffers, valid only for the duration of the call.
///
/// `query` [B, Hq, Nq, D], `key` [B, Hkv, Nk, D], `value` [B, Hkv, Nk, Dv] are read; `output`
/// [B, Hq, Nq, Dv] and `logSumExp` [B, Hq, Nq] (optional; dense fp32) are written completely. Each
/// of the four tensors may be strided and stored as fp32, fp16 or bf16 (`TensorView`); the mask, if
/// any, is read from `problem.options.mask`.
///
/// `@unchecked Sendable`: backends hand these views to their worker threads, which read the inputs
/// concurrently and write disjoint parts of the outputs; the caller must not touch the outputs
/// until the call returns.
public struct AttentionBuffers: @unchecked Sendable {
    public let query: TensorView
    public let key: TensorView
    public let value: TensorView
    public let output: TensorView
    public let logSumExp: UnsafeMutableBufferPointer<Float>?

    /// Views of any layout and storage type.
    public init(
        query: TensorView, key: TensorView, value: TensorView, output: TensorView,
        logSumExp: UnsafeMutableBufferPointer<Float>?
    ) {
        self.query = query
        self.key = key
        self.value = value
        self.output = output
        self.logSumExp = logSumExp
    }

    /// Dense fp32 buffers in [B, H, N, D] order.
    public init(
        query: UnsafeBufferPointer<Float>, key: UnsafeBufferPointer<Float>, value: UnsafeBufferPointer<Float>,
        output: UnsafeMutableBufferPointer<Float>, logSumExp: UnsafeMutableBufferPointer<Float>?
    ) {
        self.init(
            query: TensorView(query), key: TensorView(key), value: TensorView(value), output: TensorView(output),
            logSumExp: logSumExp)
    }

    /// Throws unless every view matches `problem`: storage types as declared, strides that are not
    /// negative and stay inside each buffer, an output whose elements do not overlap one another or
    /// any input, and a log-sum-exp buffer of exactly [B, Hq, Nq] elements.
    public func check(against problem: AttentionProblem) throws(AttentionError) {
        let types = problem.storage
        try check(
            operands: [
                ("query", query, problem.queryShape, types.query), ("key", key, problem.keyShape, types.keyValue),
                ("value", value, problem.valueShape, types.keyValue),
                ("output", output, problem.outputShape, types.output),
            ], logSumExpCount: problem.lseShape.reduce(1, *))
    }

    /// The checks of `check(against:)` for operands of any logical [B, H, N, D] shapes, in the order
    /// query, key, value, output.
    public func check(operands: [(String, TensorView, [Int], StorageType)], logSumExpCount: Int) throws(AttentionError)
    {
        var extents: [(String, ClosedRange<UInt>)] = []
        for (name, view, shape, expected) in operands {
            guard view.storage == expected else {
                throw .storageTypeMismatch(tensor: name, expected: expected.rawValue, actual: view.storage.rawValue)
            }
            // An operand without elements (a varlen batch with no rows) is neither read nor written.
            guard !shape.contains(0) else { continue }
            let last = try Self.lastElement(of: view, shape: shape, name: name)
            let start = UInt(bitPattern: view.address)
            extents.append((name, start...(start + UInt((last + 1) * view.storage.byteSize) - 1)))
        }
        let outputShape = operands[3].2
        if !outputShape.contains(0) {
            try Self.checkNoSelfOverlap(output.strides(for: outputShape), shape: outputShape)
        }
        if let outputExtent = extents.first(where: { $0.0 == operands[3].0 })?.1 {
            for (name, extent) in extents where name != operands[3].0 && extent.overlaps(outputExtent) {
                throw .overlappingOutput("the output's memory overlaps the \(name)'s")
            }
        }
        if let lse = logSumExp {
            guard lse.count == logSumExpCount else {
                throw .outputSizeMismatch(buffer: "logSumExp", expectedCount: logSumExpCount, actualCount: lse.count)
            }
            if let base = lse.baseAddress, lse.count > 0 {
                let start = UInt(bitPattern: base)
                let lseExtent = start...(start + UInt(lse.count * 4) - 1)
                for (name, extent) in extents where extent.overlaps(lseExtent) {
                    throw .overlappingOutput("the log-sum-exp buffer overlaps the \(name)")
                }
            }
        }
    }

    /// The largest element index `view` addresses for `shape`, once it is within the buffer.
    private static func lastElement(of view: TensorView, shape: [Int], name: String) throws(AttentionError) -> Int {
        let s = view.strides(for: shape)
        guard s.batch >= 0, s.head >= 0, s.sequence >= 0 else {
            throw .invalidStrides(tensor: name, strides: [s.batch, s.head, s.sequence], reason: "strides must be >= 0")
        }
        guard let last = s.lastOffset(of: shape) else {
            throw .invalidStrides(tensor: name, strides: [s.batch, s.head, s.sequence], reason: "offsets overflow")
        }
        if view.strides == nil, view.capacity != shape.reduce(1, *) {
            // A dense buffer holds exactly its elements.
            if name == "output" {
                throw .outputSizeMismatch(buffer: name, expectedCount: shape.reduce(1, *), actualCount: view.capacity)
            }
            throw .storageSizeMismatch(
                tensor: name, shape: shape, expectedCount: shape.reduce(1, *), actualCount: view.capacity)
        }
        guard last < view.capacity else {
            throw .invalidStrides(
                tensor: name, strides: [s.batch, s.head, s.sequence],
                reason:
                    "the last element of shape \(shape) is at offset \(last), past the \(view.capacity) "
                    + "elements of the buffer"
            )
        }
        return last
    }

    /// Distinct output elements must have distinct addresses: sorted by stride, each dimension's
    /// stride must step over everything the smaller ones span.
    private static func checkNoSelfOverlap(_ s: Strides, shape: [Int]) throws(AttentionError) {
        var dims = [(stride: 1, extent: shape[3])]
        for (stride, extent) in zip([s.batch, s.head, s.sequence], shape.prefix(3)) where extent > 1 {
            dims.append((stride, extent))
        }
        dims.sort { $0.stride < $1.stride }
        // `span`: the largest offset the smaller dimensions reach; the next one must start beyond it.
        var span = 0
        for dim in dims {
            guard dim.stride > span else {
                throw .overlappingOutput("output strides \(s) make different elements of shape \(shape) share memory")
            }
            span += (dim.extent - 1) * dim.stride
        }
    }
}

/// O and log-sum-exp of one attention call.
public struct AttentionResult: Sendable, Equatable {
    /// [B, Hq, Nq, Dv]. Rows with no visible key are exactly 0.
    public var output: Tensor
    /// [B, Hq, Nq]: m + log(l) per query, `-infinity` for rows with no visible key. Lets results over
    /// disjoint key ranges be merged exactly.
    public var logSumExp: Tensor

    public init(output: Tensor, logSumExp: Tensor) {
        self.output = output
        self.logSumExp = logSumExp
    }
}

/// What a backend would do with a problem: everything the dispatcher needs from it, in one call.
public struct ExecutionPlan: Sendable, Equatable {
    /// Whether the backend can run the problem, and if not, why.
    public var support: BackendSupport
    /// Extra memory a call needs beyond the caller's inputs and outputs (scratch, device copies).
    public var workspaceBytes: Int
    /// The memory the workspace must fit in: a device's memory, or nil for host memory (the
    /// dispatcher then applies its own host limit).
    public var deviceMemoryBytes: UInt64?
    /// The kernel or path the backend would take, for explanations ("split-KV decode (2 splits x
    /// 16384 keys)"); empty when there is nothing to say.
    public var path: String

    public init(support: BackendSupport, workspaceBytes: Int, deviceMemoryBytes: UInt64? = nil, path: String = "") {
        self.support = support
        self.workspaceBytes = workspaceBytes
        self.deviceMemoryBytes = deviceMemoryBytes
        self.path = path
    }
}

/// One way of computing attention. Every backend obeys the same contract (README, "The contract");
/// a backend that cannot do a case says so through `support(for:)` and is never asked to compute
/// something else.
///
/// Conformers implement `id`, `support(for:)` and `run(_:_:)`, and `plan(for:)` when they have more
/// to say than support and workspace; callers use `forward(_:_:)` or
/// `attention(query:key:value:options:)`, which validate before calling `run`.
/// Backends are `Sendable`: one instance may serve concurrent calls.
public protocol AttentionBackend: Sendable {
    /// Which backend this is.
    var id: BackendID { get }
    /// Whether this backend can run `problem` on this machine, and if not, why.
    func support(for problem: AttentionProblem) -> BackendSupport
    /// Computes the problem. Called only with validated buffers and a supported problem.
    func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError)
    /// Extra memory a call needs beyond the caller's inputs and outputs (scratch, device copies),
    /// in bytes: what the dispatcher's memory guard compares with the device's memory.
    func workspaceBytes(for problem: AttentionProblem) -> Int
    /// Support, workspace and path together: what the dispatcher asks, once per candidate.
    func plan(for problem: AttentionProblem) -> ExecutionPlan
    /// Whether this backend can run a batch of sequences (default: every sequence's problem).
    func support(for batch: SequenceBatch) -> BackendSupport
    /// Computes a batch of sequences into validated buffers whose views all carry explicit strides
    /// (`AttentionBuffers.resolved(for:)`). Default: one sequence at a time (`runBySequence`).
    func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError)
}

extension AttentionBackend {
    public func workspaceBytes(for problem: AttentionProblem) -> Int { 0 }

    public func plan(for problem: AttentionProblem) -> ExecutionPlan {
        ExecutionPlan(support: support(for: problem), workspaceBytes: workspaceBytes(for: problem))
    }

    /// The backend's name as text (`id.description`): "naive", "blas", "opencl:0".
    public var name: String { id.description }
}

extension AttentionBackend {
    /// Checks support and buffer sizes, then runs the problem into the caller's buffers.
    public func forward(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        if case .unsupported(let reason) = support(for: problem) {
            throw .unsupported(backend: id.description, reason: reason)
        }
        try buffers.check(against: problem)
        try run(problem, buffers)
    }

    /// Computes attention of host tensors and returns O and the log-sum-exp.
    ///
    /// - Parameters:
    ///   - query: [B, Hq, Nq, D]
    ///   - key: [B, Hkv, Nk, D]
    ///   - value: [B, Hkv, Nk, Dv]
    public func attention(
        query: Tensor, key: Tensor, value: Tensor, options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        let problem = try AttentionProblem(query: query.shape, key: key.shape, value: value.shape, options: options)
        return try attention(problem, query: query, key: key, value: value)
    }

    /// Computes an already validated problem on host tensors.
    public func attention(
        _ problem: AttentionProblem, query: Tensor, key: Tensor, value: Tensor
    ) throws(AttentionError) -> AttentionResult {
        var output = try Tensor(shape: problem.outputShape, name: "output")
        var lse = try Tensor(shape: problem.lseShape, name: "logSumExp")
        try output.withUnsafeMutableBufferPointer { (out) throws(AttentionError) in
            try lse.withUnsafeMutableBufferPointer { (lseBuffer) throws(AttentionError) in
                try withBuffers(query, key, value) { (q, k, v) throws(AttentionError) in
                    try forward(
                        problem, AttentionBuffers(query: q, key: k, value: v, output: out, logSumExp: lseBuffer))
                }
            }
        }
        return AttentionResult(output: output, logSumExp: lse)
    }
}

/// Borrows three tensors' storage at once, with typed throws.
func withBuffers<R>(
    _ a: Tensor, _ b: Tensor, _ c: Tensor,
    _ body: (UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>) throws(AttentionError)
        -> R
) throws(AttentionError) -> R {
    try a.storage.withUnsafeBufferPointer { (pa) throws(AttentionError) -> R in
        try b.storage.withUnsafeBufferPointer { (pb) throws(AttentionError) -> R in
            try c.storage.withUnsafeBufferPointer { (pc) throws(AttentionError) -> R in try body(pa, pb, pc) }
        }
    }
}
