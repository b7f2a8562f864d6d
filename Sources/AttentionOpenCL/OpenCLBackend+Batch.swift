import AttentionCore
import COpenCL

extension OpenCLBackend {
    /// Batches of sequences. Decode-like batches of caches or pages run in one launch of the
    /// split-KV kernel built for batches (`BATCH_FORM` in decode.cl): every sequence's K/V head is a
    /// row of work-items over its own keys, read in place from the caches or through the block
    /// table, then the exact merge. Other batches (packed sequences, prefill-like batches, keys too
    /// few to split) run one sequence at a time (`runBySequence`).
    public func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        guard let device, let plan = batchDecodePlan(batch) else { return try runBySequence(batch, buffers) }
        let problem = plan.problem
        let launch = try prepare(problem)
        let q = try DeviceOperand(buffers.query, shape: batch.queryShape, name: "query", backend: name)
        let k = try DeviceOperand(buffers.key, shape: batch.keyShape, name: "key", backend: name)
        let v = try DeviceOperand(buffers.value, shape: batch.valueShape, name: "value", backend: name)
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
                    let call = CallBuffers(
                        q: qDense, k: try hostInput(k, buffers.key, zeroCopy: zeroCopy, state: state),
                        v: try hostInput(v, buffers.value, zeroCopy: zeroCopy, state: state), o: oDense, lse: lse,
                        additiveMask: state.placeholder, booleanMask: state.placeholder)
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
    func batchDecodePlan(_ batch: SequenceBatch)
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
        if case .flash = choice { return nil }
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
