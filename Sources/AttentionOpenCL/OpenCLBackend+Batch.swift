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
                let readOnly = Int32(CL_MEM_READ_ONLY)
                let readWrite = Int32(CL_MEM_READ_WRITE)
                func input(_ operand: DeviceOperand, _ view: TensorView) throws(OpenCLError) -> CLBuffer {
                    try state.buffer(bytes: operand.bytes, flags: readOnly, host: view.address, useHostMemory: zeroCopy)
                }
                func small(_ values: [Int32]) throws(OpenCLError) -> CLBuffer {
                    try withBytes(of: values) { (raw) throws(OpenCLError) in
                        try state.buffer(bytes: raw.count, flags: readOnly, host: raw.baseAddress)
                    }
                }
                let oHost = try state.buffer(
                    bytes: o.bytes, flags: readWrite, host: UnsafeRawPointer(buffers.output.address),
                    useHostMemory: zeroCopy)
                let lseCount = batch.logSumExpCount
                let lseHost = buffers.logSumExp.flatMap { zeroCopy ? UnsafeRawPointer($0.baseAddress) : nil }
                let lse = try state.buffer(
                    bytes: lseCount * 4, flags: readWrite, host: lseHost, useHostMemory: lseHost != nil)
                // The kernel reads dense fp32 Q and writes dense fp32 O (converted where they are not).
                let qBuffer = try input(q, buffers.query)
                let qDense = q.isDenseF32 ? qBuffer : try denseF32((qBuffer, q), launch, state: state)
                let oDense =
                    o.isDenseF32
                    ? oHost : try state.buffer(bytes: 4 * batch.outputShape.reduce(1, *), flags: readWrite)

                var params = Self.parameters(problem, keyPadding: launch.config.vectorWidth)
                (params.kStrideB, params.kStrideH, params.kStrideS) = (
                    Int32(k.strides.batch), Int32(k.strides.head), Int32(k.strides.sequence)
                )
                (params.vStrideB, params.vStrideH, params.vStrideS) = (
                    Int32(v.strides.batch), Int32(v.strides.head), Int32(v.strides.sequence)
                )
                let totalRows = lseCount
                let oPart = try state.buffer(bytes: 4 * plan.splits * totalRows * batch.valueDim, flags: readWrite)
                let lsePart = try state.buffer(bytes: 4 * plan.splits * totalRows, flags: readWrite)
                let options =
                    launch.config.decodeOptions(rows: batch.groupSize * problem.queryLength)
                    + " -DKV_TYPE=\(k.type.kernelCode) -DBATCH_FORM=\(plan.form)"
                // A head's rows far apart (pages, [B, N, H, D] caches): each work-item walks its keys
                // across every head, reading adjacent memory; else one work-item per K/V head.
                let acrossHeads = k.strides.sequence != batch.headDim || v.strides.sequence != batch.valueDim
                let partial = try state.kernel(
                    acrossHeads ? "decode_partial_heads" : "decode_partial", source: launch.source, options: options)
                var arguments = [
                    qDense, try input(k, buffers.key), try input(v, buffers.value), state.placeholder,
                    state.placeholder, oPart, lsePart,
                ]
                if acrossHeads {
                    arguments.append(try state.buffer(bytes: 12 * plan.splits * totalRows, flags: readWrite))
                }
                for (i, buffer) in arguments.enumerated() { try partial.set(i, buffer) }
                let next = arguments.count
                try partial.set(next, value: params)
                try partial.set(next + 1, value: Int32(plan.keysPerSplit))
                try partial.set(next + 2, value: Int32(plan.splits))
                // Held until the launches have finished (a released buffer is no argument).
                let (lengthBuffer, tableBuffer) = (try small(lengths), try small(table))
                try partial.set(next + 3, lengthBuffer)
                try partial.set(next + 4, tableBuffer)
                try partial.set(next + 5, value: Int32(pageSize))
                try partial.set(next + 6, value: Int32(maxPages))
                // One work-item per group, as in the single-problem launch.
                let items = acrossHeads ? batch.count : batch.count * batch.keyValueHeads
                try state.enqueue(partial, global: [plan.splits, items], local: [1, 1])

                let merge = try state.kernel("decode_merge", source: launch.source, options: options)
                try merge.set(0, oPart)
                try merge.set(1, lsePart)
                try merge.set(2, oDense)
                try merge.set(3, lse)
                try merge.set(4, value: Int32(totalRows))
                try merge.set(5, value: Int32(batch.valueDim))
                try merge.set(6, value: Int32(plan.splits))
                try state.enqueue(merge, global: [totalRows], local: nil)
                if !o.isDenseF32 { try scatter(oDense, into: (oHost, o), launch, state: state) }
                try state.finish()
                withExtendedLifetime((arguments, lengthBuffer, tableBuffer)) {}
                if zeroCopy {
                    try state.synchronizeHostMemory(oHost)
                    if lseHost != nil { try state.synchronizeHostMemory(lse) }
                } else {
                    try state.read(oHost, into: buffers.output.address, bytes: o.bytes)
                }
                if let host = buffers.logSumExp, let base = host.baseAddress, lseHost == nil {
                    try state.read(lse, into: UnsafeMutableRawPointer(base), bytes: lseCount * 4)
                }
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    /// The one-launch plan of a batch: the problem its kernel parameters come from (every sequence
    /// at the longest length), the key splits, and the kernel's `BATCH_FORM`; nil when the batch
    /// runs sequence by sequence.
    func batchDecodePlan(_ batch: SequenceBatch)
        -> (problem: AttentionProblem, splits: Int, keysPerSplit: Int, form: Int)?
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
                storage: batch.storage),
            case .splitKV(let splits, let keysPerSplit) = kernelChoice(for: problem).choice
        else { return nil }
        return (problem, splits, keysPerSplit, form)
    }
}
