import AttentionCore
import COpenCL

extension OpenCLBackend {
    /// Batches of sequences. Decode-like batches of caches or pages run in one launch of the
    /// split-KV kernel built for batches (`BATCH_FORM` in decode.cl): every sequence's K/V head is a
    /// row of work-items over its own keys, read in place from the caches or through the block
    /// table, then the exact merge. Other batches (packed sequences, prefill-like batches, keys too
    /// few to split) run one sequence at a time (`runBySequence`).
    public func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        guard device != nil, let plan = batchDecodePlan(batch) else { return try runBySequence(batch, buffers) }
        let k = try DeviceOperand(buffers.key, shape: batch.keyShape, name: "key", backend: name)
        let v = try DeviceOperand(buffers.value, shape: batch.valueShape, name: "value", backend: name)
        try runBatch(batch, plan, buffers, keys: k, values: v) { (state, zeroCopy) throws(OpenCLError) in
            (
                try hostInput(k, buffers.key, zeroCopy: zeroCopy, state: state),
                try hostInput(v, buffers.value, zeroCopy: zeroCopy, state: state)
            )
        }
    }

    /// A decode-like batch whose K/V pools already live on this device (`residentKeys`,
    /// `residentValues`: dense pools in the batch's K/V storage type; a device-resident KV cache):
    /// Q, O and the LSE are the caller's host views (`buffers.key` / `buffers.value` are not read).
    /// Batches no single launch covers run the split-KV kernel with one split. Prefill-like batches
    /// are refused: the caller reads the pages back and runs them on the host path.
    package func run(
        batch: SequenceBatch, _ buffers: AttentionBuffers, residentKeys: CLBuffer, residentValues: CLBuffer
    ) throws(AttentionError) {
        guard device != nil else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        guard var plan = batchDecodePlan(batch, forceSplit: true) else {
            throw .unsupported(backend: name, reason: "device-resident K/V runs decode-like batches (Nq <= 16)")
        }
        if case .flash = plan.choice { plan.choice = .splitKV(splits: 1, keysPerSplit: plan.problem.keyLength) }
        let k = DeviceOperand(
            resident: batch.storage.keyValue, shape: batch.keyShape, strides: batch.defaultStrides(.key))
        let v = DeviceOperand(
            resident: batch.storage.keyValue, shape: batch.valueShape, strides: batch.defaultStrides(.value))
        guard residentKeys.byteCount >= k.bytes, residentValues.byteCount >= v.bytes else {
            throw .outputSizeMismatch(
                buffer: "resident K/V pool", expectedCount: k.bytes + v.bytes,
                actualCount: residentKeys.byteCount + residentValues.byteCount)
        }
        try runBatch(batch, plan, buffers, keys: k, values: v) { (_, _) throws(OpenCLError) in
            (residentKeys, residentValues)
        }
    }

    /// One launch for a batch: Q, O and LSE from the caller's host views, K and V from `keyValue`.
    private func runBatch(
        _ batch: SequenceBatch, _ plan: (problem: AttentionProblem, choice: OpenCLKernelChoice, form: Int),
        _ buffers: AttentionBuffers, keys k: DeviceOperand, values v: DeviceOperand,
        keyValue: (ExecutionState, Bool) throws(OpenCLError) -> (CLBuffer, CLBuffer)
    ) throws(AttentionError) {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        let problem = plan.problem
        let launch = try prepare(problem, choice: plan.choice)
        let q = try DeviceOperand(buffers.query, shape: batch.queryShape, name: "query", backend: name)
        let o = try DeviceOperand(buffers.output, shape: batch.outputShape, name: "output", backend: name)
        let zeroCopy = device.info.isCPU || device.info.hostUnifiedMemory
        let (pageSize, maxPages, table): (Int, Int, [Int32])
        if case .paged(_, let pages) = batch.layout {
            (pageSize, maxPages, table) = (pages.pageSize, pages.maxPages, pages.blockTable)
        } else {
            (pageSize, maxPages, table) = (1, 1, [0])
        }
        let lengths = batch.keyLengths.map { Int32($0) }
        do {
            try device.withExecution { (state) throws(OpenCLError) in
                func small(_ values: [Int32]) throws(OpenCLError) -> CLBuffer {
                    try withBytes(of: values) { (raw) throws(OpenCLError) in
                        try state.buffer(bytes: raw.count, flags: Int32(CL_MEM_READ_ONLY), host: raw.baseAddress)
                    }
                }
                try withHostOutputs(
                    buffers, output: o, logSumExpCount: batch.logSumExpCount, zeroCopy: zeroCopy, state: state
                ) { (oHost, lse) throws(OpenCLError) in
                    // The kernels read dense fp32 Q and write dense fp32 O (converted where they are not).
                    let qBuffer = try hostInput(q, buffers.query, zeroCopy: zeroCopy, state: state)
                    let qDense = q.isDenseF32 ? qBuffer : try denseF32((qBuffer, q), launch, state: state)
                    let oDense =
                        o.isDenseF32
                        ? oHost
                        : try state.buffer(bytes: 4 * batch.outputShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
                    var params = Self.parameters(problem, keyPadding: launch.config.vectorWidth)
                    (params.kStrideB, params.kStrideH, params.kStrideS) = (
                        Int32(k.strides.batch), Int32(k.strides.head), Int32(k.strides.sequence)
                    )
                    (params.vStrideB, params.vStrideH, params.vStrideS) = (
                        Int32(v.strides.batch), Int32(v.strides.head), Int32(v.strides.sequence)
                    )
                    let (kBuffer, vBuffer) = try keyValue(state, zeroCopy)
                    let call = CallBuffers(
                        q: qDense, k: kBuffer, v: vBuffer, o: oDense, lse: lse, additiveMask: state.placeholder,
                        booleanMask: state.placeholder)
                    let arguments = BatchArguments(
                        form: plan.form, lengths: try small(lengths), blockTable: try small(table),
                        pageSize: pageSize, maxPages: maxPages)
                    switch plan.choice {
                    case .tiled(let tiled):
                        // Dense Q and O (converted above where they are not).
                        let qs = Strides.bhsd(batch.queryShape)
                        let os = Strides.bhsd(batch.outputShape)
                        (params.qStrideB, params.qStrideH, params.qStrideS) = (
                            Int32(qs.batch), Int32(qs.head), Int32(qs.sequence)
                        )
                        (params.oStrideB, params.oStrideH, params.oStrideS) = (
                            Int32(os.batch), Int32(os.head), Int32(os.sequence)
                        )
                        try launchTiled(
                            problem, params, launch, call, tiled, keyValueType: k.type, state: state, batch: arguments)
                    case .splitKV(let splits, let keysPerSplit):
                        // A head's rows far apart (pages, [B, N, H, D] caches): each work-item walks its
                        // keys across every head, reading adjacent memory; else one work-item per K/V head.
                        let acrossHeads =
                            k.strides.sequence != batch.headDim || v.strides.sequence != batch.valueDim
                        try launchSplitKV(
                            problem, params, launch, call, keyValueType: k.type, acrossHeads: acrossHeads,
                            splits: splits, keysPerSplit: keysPerSplit, state: state, batch: arguments)
                    case .flash:
                        break  // never planned (batchDecodePlan)
                    }
                    if !o.isDenseF32 { try scatter(oDense, into: (oHost, o), launch, state: state) }
                    try state.finish()
                    // The buffers the launches used live until they have finished.
                    withExtendedLifetime((call, arguments)) {}
                }
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    /// The one-launch plan of a batch: the problem its kernel parameters come from (every sequence
    /// at the longest length), the kernel (split-KV decode, or the tiled kernel on GPU
    /// configurations) and its `BATCH_FORM`; nil when the batch runs sequence by sequence.
    func batchDecodePlan(_ batch: SequenceBatch, forceSplit: Bool = false)
        -> (problem: AttentionProblem, choice: OpenCLKernelChoice, form: Int)?
    {
        let form: Int
        switch batch.layout {
        case .packed: return nil
        case .cacheLengths: form = 1
        case .paged: form = 2
        }
        guard batch.regime == .decodeLike, let longest = batch.keyLengths.max(), longest > 0,
            batch.count * batch.keyValueHeads < Int(Int32.max),
            let problem = try? AttentionProblem(
                query: [batch.count, batch.queryHeads, batch.outputShape[2], batch.headDim],
                key: [batch.count, batch.keyValueHeads, longest, batch.headDim],
                value: [batch.count, batch.keyValueHeads, longest, batch.valueDim], options: batch.options,
                storage: batch.storage)
        else { return nil }
        let choice = kernelChoice(for: problem).choice
        if case .flash = choice, !forceSplit { return nil }
        return (problem, choice, form)
    }
}

/// The extra arguments of the split-KV kernels built for batches (`BATCH_FORM` in decode.cl).
struct BatchArguments {
    /// 1: cache lengths; 2: pages.
    let form: Int
    let lengths: CLBuffer
    let blockTable: CLBuffer
    let pageSize: Int
    let maxPages: Int
}
