import AttentionCore
import AttentionKernels
import COpenCL
import Foundation

/// Attention on an OpenCL device: a tiled flash kernel for prefill and general problems, and
/// split-KV decode (flash-decoding) for few queries against long keys.
///
/// Same contract as every backend (README, "The contract"). When OpenCL is missing (no loader, no
/// platform) or the device index does not exist, `support(for:)` says so and nothing runs.
/// On CPU devices host memory is used in place (`CL_MEM_USE_HOST_PTR`); elsewhere it is copied.
/// Calls on one device are serialised.
public struct OpenCLBackend: AttentionBackend {
    public let device: OpenCLDevice?
    /// Why there is no device, when there is none.
    public let unavailableReason: String?
    /// A fixed kernel configuration, or `nil` to choose per problem (see `kernelConfig(for:)`).
    public let config: OpenCLKernelConfig?
    /// Configurations measured by `attnbench tune`, by head dimension.
    public let tunedConfigs: [Tuned<OpenCLKernelConfig>]
    /// Forces the flash kernel (`false`) or lets decode-shaped problems use split-KV (`true`).
    public let allowSplitKV: Bool
    /// Runs the GPU table's configuration of a typical GPU of this vendor ("NVIDIA", "AMD", "Intel",
    /// anything else: a small mobile GPU) on this device, whatever it is (`GPUTiles.GPU.typical`):
    /// GPU-shaped kernels verified on PoCL. nil: the table for this device.
    public var gpuShapedAs: String?
    private let index: Int
    /// The complete source of a kernel program by file name ("attention", "decode").
    private let programs: @Sendable (String) -> String?

    /// The backend on device `index` of `OpenCLRuntime.devices`.
    public init(
        device index: Int = 0, config: OpenCLKernelConfig? = nil, tunedConfigs: [Tuned<OpenCLKernelConfig>] = [],
        allowSplitKV: Bool = true
    ) {
        self.init(
            device: index, config: config, tunedConfigs: tunedConfigs, allowSplitKV: allowSplitKV,
            programs: { KernelSources.program($0) })
    }

    /// The same with another source of kernel programs (tests: a build that lacks a kernel).
    package init(
        device index: Int, config: OpenCLKernelConfig?, tunedConfigs: [Tuned<OpenCLKernelConfig>], allowSplitKV: Bool,
        programs: @escaping @Sendable (String) -> String?
    ) {
        self.index = index
        self.config = config
        self.tunedConfigs = tunedConfigs
        self.allowSplitKV = allowSplitKV
        self.programs = programs
        switch OpenCLRuntime.devices {
        case .success(let devices) where index >= 0 && index < devices.count:
            device = devices[index]
            unavailableReason = nil
        case .success(let devices):
            device = nil
            unavailableReason =
                "no OpenCL device \(index) (this machine has \(devices.count): 0...\(devices.count - 1))"
        case .failure(let reason):
            device = nil
            unavailableReason = reason.reason
        }
    }

    /// The backend on a device found through another loader (`OpenCLRuntime.discover(libraryPath:)`);
    /// its identity is `.opencl(device: device.info.index)`.
    public init(
        device: OpenCLDevice, config: OpenCLKernelConfig? = nil, tunedConfigs: [Tuned<OpenCLKernelConfig>] = [],
        allowSplitKV: Bool = true
    ) {
        self.index = device.info.index
        self.device = device
        self.unavailableReason = nil
        self.config = config
        self.tunedConfigs = tunedConfigs
        self.allowSplitKV = allowSplitKV
        self.programs = { KernelSources.program($0) }
    }

    public var id: BackendID { .opencl(device: index) }

    /// This backend with the GPU table's configuration of a typical `vendor` GPU (see `gpuShapedAs`).
    public func gpuShaped(as vendor: String) -> OpenCLBackend {
        var copy = self
        copy.gpuShapedAs = vendor
        return copy
    }

    /// The kernel configuration a problem runs with, decided here and nowhere else: the fixed
    /// `config` if one was given, else the tuned one of the nearest head dimension, else the table.
    public func kernelConfig(for problem: AttentionProblem) -> OpenCLKernelConfig? {
        guard let device else { return nil }
        if let config { return config }
        if let tuned = tunedConfigs.nearest(to: max(problem.headDim, problem.valueDim)) { return tuned }
        if let vendor = gpuShapedAs {
            return .gpu(.typical(vendor, on: device.info), headDim: problem.headDim, valueDim: problem.valueDim)
        }
        return .default(for: device.info, headDim: problem.headDim, valueDim: problem.valueDim)
    }

    /// The kernel this backend would run, and why.
    public func kernelChoice(for problem: AttentionProblem) -> (choice: OpenCLKernelChoice, reason: String) {
        guard let device, let cfg = kernelConfig(for: problem) else { return (.flash, "no device") }
        if let tiles = cfg.tiles { return tiledChoice(problem, cfg, tiles, computeUnits: device.info.computeUnits) }
        let rows = problem.groupSize * problem.queryLength
        guard allowSplitKV else { return (.flash, "split-KV disabled") }
        guard rows <= cfg.decodeRows else {
            return (.flash, "\(rows) query rows per K/V head > \(cfg.decodeRows): enough rows for the flash kernel")
        }
        guard problem.keyLength >= 2 * cfg.minKeysPerSplit else {
            return (.flash, "Nk = \(problem.keyLength) too short to split (< \(2 * cfg.minKeysPerSplit))")
        }
        let heads = problem.batch * problem.keyValueHeads
        let target = max(1, (device.info.isGPU ? 64 : 8) * device.info.computeUnits)
        let splits = max(1, min((target + heads - 1) / heads, problem.keyLength / cfg.minKeysPerSplit))
        let perSplit =
            ((problem.keyLength + splits - 1) / splits + cfg.vectorWidth - 1) / cfg.vectorWidth * cfg.vectorWidth
        let used = (problem.keyLength + perSplit - 1) / perSplit
        return (
            .splitKV(splits: used, keysPerSplit: perSplit),
            "\(rows) query rows per K/V head: decode-shaped, keys split across \(used) work-items per head"
        )
    }

    public func support(for problem: AttentionProblem) -> BackendSupport {
        guard let device else { return .unsupported(reason: unavailableReason ?? "no OpenCL device") }
        let p = problem
        let limit = Int(Int32.max)
        let maskStride = p.maskLayout.map { max($0.batchStride, $0.headStride) } ?? 0
        if [p.batch * p.queryHeads, p.queryLength, p.keyLength + 64, p.headDim, p.valueDim, maskStride].contains(
            where: { $0 >= limit })
        {
            return .unsupported(reason: "a dimension or mask stride exceeds the kernels' 32-bit index range")
        }
        // Strides are 32-bit kernel arguments; the largest dense one is a batch stride H * N * D.
        for shape in [p.queryShape, p.keyShape, p.valueShape, p.outputShape]
        where shape.dropFirst().reduce(1, *) >= limit {
            return .unsupported(reason: "a tensor of shape \(shape) has strides beyond the kernels' 32-bit range")
        }
        let (choice, _) = kernelChoice(for: problem)
        if case .tiled(let launch) = choice, let reason = tiledProblem(launch.tiles, problem, device.info) {
            return .unsupported(reason: reason)
        }
        let sizes = bufferBytes(problem, choice: choice)
        let total = sizes.reduce(0, +)
        if let largest = sizes.max(), UInt64(largest) > device.info.maxAllocationBytes {
            return .unsupported(
                reason:
                    "needs a \(largest >> 20) MiB buffer; \(device.info.name) allows "
                    + "\(device.info.maxAllocationBytes >> 20) MiB per buffer"
            )
        }
        if UInt64(total) > device.info.globalMemoryBytes {
            return .unsupported(
                reason:
                    "needs \(total >> 20) MiB of device memory; \(device.info.name) has "
                    + "\(device.info.globalMemoryBytes >> 20) MiB"
            )
        }
        return .supported
    }

    /// Memory a call adds: the temporaries and the mask, plus copies of the inputs and outputs on
    /// devices that do not work on host memory in place (on CPU and host-unified devices the caller's
    /// operands are used where they are).
    public func workspaceBytes(for problem: AttentionProblem) -> Int {
        bufferBytes(problem, choice: kernelChoice(for: problem).choice).reduce(0, +)
    }

    public func plan(for problem: AttentionProblem) -> ExecutionPlan {
        let support = support(for: problem)
        guard let device, support.isSupported else { return ExecutionPlan(support: support, workspaceBytes: 0) }
        let choice = kernelChoice(for: problem).choice
        return ExecutionPlan(
            support: support, workspaceBytes: bufferBytes(problem, choice: choice).reduce(0, +),
            deviceMemoryBytes: device.info.globalMemoryBytes, path: choice.description)
    }

    /// Bytes of every buffer a call allocates (copies of inputs and outputs where the device cannot
    /// use host memory, mask, temporaries).
    private func bufferBytes(_ p: AttentionProblem, choice: OpenCLKernelChoice) -> [Int] {
        let types = p.storage
        var sizes = [4 * p.lseShape.reduce(1, *)]
        if let info = device?.info, !(info.isCPU || info.hostUnifiedMemory) {
            sizes += [
                types.query.byteSize * p.queryShape.reduce(1, *), types.keyValue.byteSize * p.keyShape.reduce(1, *),
                types.keyValue.byteSize * p.valueShape.reduce(1, *),
                types.output.byteSize * p.outputShape.reduce(1, *),
            ]
        }
        // Dense fp32 copies of operands stored otherwise (strided fp32 views need them too; their
        // layout is only known per call).
        if types.query != .f32 { sizes.append(4 * p.queryShape.reduce(1, *)) }
        if types.output != .f32 { sizes.append(4 * p.outputShape.reduce(1, *)) }
        if types.keyValue != .f32, choice == .flash { sizes.append(4 * p.valueShape.reduce(1, *)) }
        if let mask = p.options.mask {
            switch mask.values {
            case .boolean(let values): sizes.append(values.count)
            case .additive(let values): sizes.append(4 * values.count)
            }
        }
        let block = kernelConfig(for: p)?.flashKeyBlock ?? OpenCLKernelConfig.largestFlashKeyBlock
        switch choice {
        case .flash:
            sizes.append(4 * p.batch * p.keyValueHeads * p.headDim * ((p.keyLength + block - 1) / block * block))
        case .splitKV, .tiled:
            // Partial O and LSE per key split (none for an unsplit tiled launch).
            if choice.keySplits > 1 {
                let rows = p.batch * p.queryHeads * p.queryLength
                sizes.append(4 * choice.keySplits * rows * p.valueDim)
                sizes.append(4 * choice.keySplits * rows)
            }
        }
        return sizes
    }

    // MARK: Host tensors

    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        let launch = try prepare(problem)
        let q = try DeviceOperand(buffers.query, shape: problem.queryShape, name: "query", backend: name)
        let k = try DeviceOperand(buffers.key, shape: problem.keyShape, name: "key", backend: name)
        let v = try DeviceOperand(buffers.value, shape: problem.valueShape, name: "value", backend: name)
        let o = try DeviceOperand(buffers.output, shape: problem.outputShape, name: "output", backend: name)
        let zeroCopy = device.info.isCPU || device.info.hostUnifiedMemory
        do {
            try device.withExecution { (state) throws(OpenCLError) in
                try withHostOutputs(
                    buffers, output: o, logSumExpCount: problem.lseShape.reduce(1, *), zeroCopy: zeroCopy, state: state
                ) { (oHost, lse) throws(OpenCLError) in
                    let call = DeviceCall(
                        q: (try hostInput(q, buffers.query, zeroCopy: zeroCopy, state: state), q),
                        k: (try hostInput(k, buffers.key, zeroCopy: zeroCopy, state: state), k),
                        v: (try hostInput(v, buffers.value, zeroCopy: zeroCopy, state: state), v), o: (oHost, o),
                        lse: lse)
                    try execute(problem, launch, call, state: state)
                }
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    /// A read-only device buffer of a caller's input view (its host memory itself where the device
    /// can use it).
    func hostInput(_ operand: DeviceOperand, _ view: TensorView, zeroCopy: Bool, state: ExecutionState)
        throws(OpenCLError) -> CLBuffer
    {
        try state.buffer(
            bytes: operand.bytes, flags: Int32(CL_MEM_READ_ONLY), host: view.address, useHostMemory: zeroCopy)
    }

    /// Device buffers for the caller's O and log-sum-exp, `body(o, lse)`, then the results in the
    /// caller's memory (synchronised in place, or read back).
    func withHostOutputs(
        _ buffers: AttentionBuffers, output o: DeviceOperand, logSumExpCount lseCount: Int, zeroCopy: Bool,
        state: ExecutionState, _ body: (CLBuffer, CLBuffer) throws(OpenCLError) -> Void
    ) throws(OpenCLError) {
        // The kernels may accumulate in O, so outputs are read and written. Copied devices start from
        // the host bytes too, so that reading the whole span back leaves the memory between a strided
        // output's elements as it was.
        let readWrite = Int32(CL_MEM_READ_WRITE)
        let oHost = try state.buffer(
            bytes: o.bytes, flags: readWrite, host: UnsafeRawPointer(buffers.output.address), useHostMemory: zeroCopy)
        let lseHost = buffers.logSumExp.flatMap { zeroCopy ? UnsafeRawPointer($0.baseAddress) : nil }
        let lse = try state.buffer(bytes: lseCount * 4, flags: readWrite, host: lseHost, useHostMemory: lseHost != nil)
        try body(oHost, lse)
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

    // MARK: Device-resident tensors

    /// Copies a host tensor to the device, where it can stay across calls (a KV cache).
    public func upload(_ tensor: Tensor) throws(AttentionError) -> OpenCLTensor {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        do {
            return try device.withExecution { (state) throws(OpenCLError) in
                let buffer = try withBytes(of: tensor.storage) { (raw) throws(OpenCLError) in
                    try state.buffer(
                        bytes: raw.count, flags: Int32(CL_MEM_READ_WRITE), host: raw.baseAddress, useHostMemory: false)
                }
                return OpenCLTensor(shape: tensor.shape, buffer: buffer, device: device)
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    /// Copies a device tensor back to the host.
    public func download(_ tensor: OpenCLTensor) throws(AttentionError) -> Tensor {
        var host = try Tensor(shape: tensor.shape, name: "download")
        do {
            try tensor.device.withExecution { (state) throws(OpenCLError) in
                try host.withUnsafeMutableBufferPointer { (out) throws(OpenCLError) in
                    try state.read(tensor.buffer, into: UnsafeMutableRawPointer(out.baseAddress!), bytes: out.count * 4)
                }
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
        return host
    }

    /// Attention on tensors already on this backend's device; O and the log-sum-exp stay there.
    public func attention(
        _ problem: AttentionProblem, query: OpenCLTensor, key: OpenCLTensor, value: OpenCLTensor
    ) throws(AttentionError) -> (output: OpenCLTensor, logSumExp: OpenCLTensor) {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        if case .unsupported(let reason) = support(for: problem) { throw .unsupported(backend: name, reason: reason) }
        for (label, tensor, shape) in [
            ("query", query, problem.queryShape), ("key", key, problem.keyShape), ("value", value, problem.valueShape),
        ] {
            guard tensor.shape == shape else {
                throw .shapeMismatch("device tensor \(label) has shape \(tensor.shape), problem needs \(shape)")
            }
            guard tensor.device === device else {
                throw .unsupported(
                    backend: name, reason: "\(label) lives on another device (\(tensor.device.info.name))")
            }
        }
        guard problem.storage == .f32 else {
            throw .unsupported(
                backend: name, reason: "device-resident tensors are fp32; this problem declares \(problem.storage)")
        }
        let launch = try prepare(problem)
        do {
            return try device.withExecution { (state) throws(OpenCLError) in
                let o = try state.buffer(bytes: 4 * problem.outputShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
                let lse = try state.buffer(bytes: 4 * problem.lseShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
                let call = DeviceCall(
                    q: (query.buffer, .dense(problem.queryShape)), k: (key.buffer, .dense(problem.keyShape)),
                    v: (value.buffer, .dense(problem.valueShape)), o: (o, .dense(problem.outputShape)), lse: lse)
                try execute(problem, launch, call, state: state)
                return (
                    OpenCLTensor(shape: problem.outputShape, buffer: o, device: device),
                    OpenCLTensor(shape: problem.lseShape, buffer: lse, device: device)
                )
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    /// The exact merge of partial results over disjoint key ranges that live on this device (the
    /// device counterpart of `AttentionResult.merging`): every part an output [..., Dv] and its LSE
    /// [...], all of one shape; merged left to right, two at a time (`merge_pair` in decode.cl), so the
    /// order, and with it every bit, is fixed. Rows no part saw are 0 / -inf; NaN parts give NaN rows.
    public func merge(_ parts: [(output: OpenCLTensor, logSumExp: OpenCLTensor)]) throws(AttentionError) -> (
        output: OpenCLTensor, logSumExp: OpenCLTensor
    ) {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        let (shape, lseShape) = try checkPartialShapes(parts.map { ($0.output.shape, $0.logSumExp.shape) })
        let first = parts[0]
        let dv = shape[shape.count - 1]
        for (index, part) in parts.enumerated()
        where part.output.device !== device || part.logSumExp.device !== device {
            throw .unsupported(
                backend: name,
                reason: "partial result \(index) lives on another device (\(part.output.device.info.name))")
        }
        guard let source = programs("decode") else {
            throw .backendFailure(backend: name, message: "kernel program 'decode.cl' is missing from this build")
        }
        let rows = lseShape.reduce(1, *)
        guard rows < Int(Int32.max), dv < Int(Int32.max) else {
            throw .unsupported(backend: name, reason: "\(rows) rows of \(dv) exceed the kernels' 32-bit index range")
        }
        do {
            return try device.withExecution { (state) throws(OpenCLError) in
                let readWrite = Int32(CL_MEM_READ_WRITE)
                let o = try state.buffer(bytes: 4 * max(rows * dv, 1), flags: readWrite)
                let lse = try state.buffer(bytes: 4 * max(rows, 1), flags: readWrite)
                var accumulated = (output: first.output.buffer, logSumExp: first.logSumExp.buffer)
                // A single part is merged with an empty one (LSE -inf everywhere, O never read): itself.
                var others = parts.dropFirst().map { (output: $0.output.buffer, logSumExp: $0.logSumExp.buffer) }
                if others.isEmpty {
                    let empty = try withBytes(of: [Float](repeating: -.infinity, count: max(rows, 1))) {
                        (raw) throws(OpenCLError) in
                        try state.buffer(bytes: raw.count, flags: Int32(CL_MEM_READ_ONLY), host: raw.baseAddress)
                    }
                    others = [(state.placeholder, empty)]
                }
                let kernel = try state.kernel("merge_pair", source: source, options: "-cl-std=CL1.2 -w")
                for part in others where rows > 0 {
                    for (index, buffer) in [
                        accumulated.output, accumulated.logSumExp, part.output, part.logSumExp, o, lse,
                    ]
                    .enumerated() {
                        try kernel.set(index, buffer)
                    }
                    try kernel.set(6, value: Int32(rows))
                    try kernel.set(7, value: Int32(dv))
                    try state.enqueue(kernel, global: [rows], local: nil)
                    accumulated = (o, lse)
                }
                try state.finish()
                return (
                    OpenCLTensor(shape: shape, buffer: o, device: device),
                    OpenCLTensor(shape: lseShape, buffer: lse, device: device)
                )
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    // MARK: Kernels

    /// What a call launches: the configuration, the kernel choice and the program source it needs.
    struct Launch {
        var config: OpenCLKernelConfig
        var choice: OpenCLKernelChoice
        var source: String
        /// Gather/scatter kernels for operands that are strided or not fp32.
        var convertSource: String
        /// The program holding decode_merge (the tiled kernel's key splits are merged by it).
        var mergeSource: String
    }

    /// Resolves configuration and program source before any device work; a build that lacks a kernel
    /// is an error, never a silent no-op.
    func prepare(_ p: AttentionProblem, choice forced: OpenCLKernelChoice? = nil) throws(AttentionError) -> Launch {
        guard let config = kernelConfig(for: p) else {
            throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device")
        }
        let choice = forced ?? kernelChoice(for: p).choice
        func program(_ file: String) throws(AttentionError) -> String {
            guard let source = programs(file) else {
                throw .backendFailure(backend: name, message: "kernel program '\(file).cl' is missing from this build")
            }
            return source
        }
        let source: String
        switch choice {
        case .flash: source = try program("attention")
        case .splitKV: source = try program("decode")
        case .tiled: source = try program("tiled")
        }
        return Launch(
            config: config, choice: choice, source: source, convertSource: try program("convert"),
            mergeSource: try program("decode"))
    }

    /// The buffers of one call as the attention kernels see them: dense fp32 Q (and V for the flash
    /// kernel), K and V as stored, a dense fp32 O, and the mask in whichever form it has.
    struct CallBuffers {
        var q, k, v, o, lse: CLBuffer
        var additiveMask: CLBuffer
        var booleanMask: CLBuffer
    }

    private func execute(
        _ p: AttentionProblem, _ launch: Launch, _ call: DeviceCall, state: ExecutionState
    ) throws(OpenCLError) {
        var params = Self.parameters(p, keyPadding: launch.config.flashKeyBlock)
        // The flash kernel reads fp32 Q and writes fp32 O through their strides, and (unless V is staged
        // in local memory) reads V as stored; the decode kernel reads K/V as stored and needs dense Q, O;
        // the tiled kernel reads fp32 Q, K and V as stored, and writes fp32 O through its strides
        // (dense partials when its keys are split).
        let qInPlace: Bool
        let oInPlace: Bool
        let vInPlace: Bool
        switch launch.choice {
        case .flash:
            qInPlace = call.q.layout.type == .f32
            oInPlace = call.o.layout.type == .f32
            // V rows far apart ([B, N, H, D]) cost the flash kernel a page per key: gathered in memory order.
            let vRowsAdjacent = call.v.layout.strides.sequence == p.valueDim
            vInPlace = (!launch.config.useLocalMemory && vRowsAdjacent) || call.v.layout.isDenseF32
        case .splitKV:
            (qInPlace, oInPlace, vInPlace) = (call.q.layout.isDenseF32, call.o.layout.isDenseF32, true)
        case .tiled(let tiled):
            qInPlace = call.q.layout.type == .f32
            oInPlace = tiled.splits == 1 ? call.o.layout.type == .f32 : call.o.layout.isDenseF32
            vInPlace = true
        }
        typealias Operand = (buffer: CLBuffer, layout: DeviceOperand)
        let q: Operand = qInPlace ? call.q : (try denseF32(call.q, launch, state: state), .dense(p.queryShape))
        let v: Operand = vInPlace ? call.v : (try denseF32(call.v, launch, state: state), .dense(p.valueShape))
        let o: Operand =
            oInPlace
            ? call.o
            : (
                try state.buffer(bytes: 4 * p.outputShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE)),
                DeviceOperand.dense(p.outputShape)
            )
        func strides(_ s: Strides) -> (Int32, Int32, Int32) { (Int32(s.batch), Int32(s.head), Int32(s.sequence)) }
        (params.kStrideB, params.kStrideH, params.kStrideS) = strides(call.k.layout.strides)
        (params.vStrideB, params.vStrideH, params.vStrideS) = strides(v.layout.strides)
        (params.qStrideB, params.qStrideH, params.qStrideS) = strides(q.layout.strides)
        (params.oStrideB, params.oStrideH, params.oStrideS) = strides(o.layout.strides)
        var buffers = CallBuffers(
            q: q.buffer, k: call.k.buffer, v: v.buffer, o: o.buffer, lse: call.lse, additiveMask: state.placeholder,
            booleanMask: state.placeholder)
        switch p.options.mask?.values {
        case nil:
            params.maskKind = 0
        case .additive(let values)?:
            params.maskKind = 1
            buffers.additiveMask = try withBytes(of: values) { (raw) throws(OpenCLError) in
                try state.buffer(bytes: raw.count, flags: Int32(CL_MEM_READ_ONLY), host: raw.baseAddress)
            }
        case .boolean(let values)?:
            params.maskKind = 2
            buffers.booleanMask = try withBytes(of: values) { (raw) throws(OpenCLError) in
                try state.buffer(bytes: raw.count, flags: Int32(CL_MEM_READ_ONLY), host: raw.baseAddress)
            }
        }
        switch launch.choice {
        case .flash:
            try launchFlash(p, params, launch, buffers, key: call.k.layout, valueType: v.layout.type, state: state)
        case .splitKV(let splits, let keysPerSplit):
            let adjacent = call.k.layout.strides.sequence == p.headDim && call.v.layout.strides.sequence == p.valueDim
            try launchSplitKV(
                p, params, launch, buffers, keyValueType: call.k.layout.type, acrossHeads: !adjacent, splits: splits,
                keysPerSplit: keysPerSplit, state: state)
        case .tiled(let tiled):
            try launchTiled(p, params, launch, buffers, tiled, keyValueType: call.k.layout.type, state: state)
        }
        if !oInPlace { try scatter(o.buffer, into: call.o, launch, state: state) }
        try state.finish()
    }

    /// The operand as dense fp32 [B, H, N, D]: itself, or a gathered copy.
    func denseF32(
        _ operand: (buffer: CLBuffer, layout: DeviceOperand), _ launch: Launch, state: ExecutionState
    ) throws(OpenCLError) -> CLBuffer {
        let layout = operand.layout
        guard !layout.isDenseF32 else { return operand.buffer }
        let shape = layout.shape
        let dense = try state.buffer(bytes: 4 * shape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
        let options = "-cl-std=CL1.2 -w -DSRC_TYPE=\(layout.type.kernelCode)"
        // Walk the source in memory order: by position first when heads are closer than positions.
        let byPosition = layout.strides.head < layout.strides.sequence
        let name = byPosition ? "gather_rows_by_position" : "gather_rows"
        let gather = try state.kernel(name, source: launch.convertSource, options: options)
        try gather.set(0, operand.buffer)
        try gather.set(1, dense)
        try setShapeArguments(gather, from: 2, layout)
        let global =
            byPosition ? [shape[3], shape[1], shape[0] * shape[2]] : [shape[3], shape[2], shape[0] * shape[1]]
        try state.enqueue(gather, global: global, local: nil)
        return dense
    }

    /// Writes dense fp32 `source` into the operand's layout and storage type (rounded to nearest even).
    func scatter(
        _ source: CLBuffer, into operand: (buffer: CLBuffer, layout: DeviceOperand), _ launch: Launch,
        state: ExecutionState
    ) throws(OpenCLError) {
        let layout = operand.layout
        let shape = layout.shape
        let options = "-cl-std=CL1.2 -w -DDST_TYPE=\(layout.type.kernelCode)"
        let byPosition = layout.strides.head < layout.strides.sequence
        let name = byPosition ? "scatter_rows_by_position" : "scatter_rows"
        let scatter = try state.kernel(name, source: launch.convertSource, options: options)
        try scatter.set(0, source)
        try scatter.set(1, operand.buffer)
        try setShapeArguments(scatter, from: 2, layout)
        let global =
            byPosition ? [shape[3], shape[1], shape[0] * shape[2]] : [shape[3], shape[2], shape[0] * shape[1]]
        try state.enqueue(scatter, global: global, local: nil)
    }

    /// Arguments H, N, D and the strides (batch, head, sequence) of a conversion kernel.
    private func setShapeArguments(_ kernel: CLKernel, from index: Int, _ layout: DeviceOperand) throws(OpenCLError) {
        let s = layout.strides
        for (offset, value) in [layout.shape[1], layout.shape[2], layout.shape[3], s.batch, s.head, s.sequence]
            .enumerated()
        {
            try kernel.set(index + offset, value: Int32(value))
        }
    }

    /// The kernels' parameter block (`AKParams` in common.cl); K padded to a multiple of `keyPadding`.
    static func parameters(_ p: AttentionProblem, keyPadding vec: Int) -> AKParams {
        var params = AKParams()
        params.B = Int32(p.batch)
        params.Hq = Int32(p.queryHeads)
        params.Hkv = Int32(p.keyValueHeads)
        params.Nq = Int32(p.queryLength)
        params.Nk = Int32(p.keyLength)
        params.D = Int32(p.headDim)
        params.Dv = Int32(p.valueDim)
        params.NkPad = Int32((p.keyLength + vec - 1) / vec * vec)
        params.scale = p.scale
        params.softcap = p.options.softcap ?? 0
        params.causal = p.options.causal ? 1 : 0
        let window = p.options.window?.clamped(to: p.queryLength + p.keyLength)
        params.winLeft = Int32(clamping: window?.left ?? -1)
        params.winRight = Int32(clamping: window?.right ?? -1)
        params.maskBatchStride = Int32(p.maskLayout?.batchStride ?? 0)
        params.maskHeadStride = Int32(p.maskLayout?.headStride ?? 0)
        return params
    }

    /// K re-laid in key blocks, then the flash kernel over row blocks.
    private func launchFlash(
        _ p: AttentionProblem, _ params: AKParams, _ launch: Launch, _ b: CallBuffers, key: DeviceOperand,
        valueType: StorageType, state: ExecutionState
    ) throws(OpenCLError) {
        let cfg = launch.config
        let (vec, nkPad) = (cfg.vectorWidth, Int(params.NkPad))
        let kt = try state.buffer(
            bytes: 4 * p.batch * p.keyValueHeads * p.headDim * nkPad, flags: Int32(CL_MEM_READ_WRITE))
        // One program per K and V storage type: transpose_keys reads K as stored, the flash kernel V.
        let options = cfg.flashOptions + " -DK_TYPE=\(key.type.kernelCode) -DKV_TYPE=\(valueType.kernelCode)"
        let transpose = try state.kernel("transpose_keys", source: launch.source, options: options)
        try transpose.set(0, b.k)
        try transpose.set(1, kt)
        let ks = key.strides
        for (index, value) in [p.keyLength, p.headDim, nkPad, p.keyValueHeads, ks.batch, ks.head, ks.sequence]
            .enumerated()
        {
            try transpose.set(2 + index, value: Int32(value))
        }
        try state.enqueue(transpose, global: [p.headDim, nkPad, p.batch * p.keyValueHeads], local: nil)

        let flash = try state.kernel("flash_attention", source: launch.source, options: options)
        for (i, buffer) in [b.q, kt, b.v, b.additiveMask, b.booleanMask, b.o, b.lse].enumerated() {
            try flash.set(i, buffer)
        }
        try flash.set(7, value: params)
        if cfg.useLocalMemory {
            try flash.setLocal(8, bytes: 4 * p.headDim * vec)
            try flash.setLocal(9, bytes: 4 * vec * p.valueDim)
        }
        let rowBlocks = (p.queryLength + cfg.rows - 1) / cfg.rows
        let group = cfg.workGroup
        let global = [(rowBlocks + group - 1) / group * group, p.batch * p.queryHeads]
        try state.enqueue(flash, global: global, local: [group, 1])
    }

    /// Partial O and LSE per key slice, then the exact merge.
    func launchSplitKV(
        _ p: AttentionProblem, _ params: AKParams, _ launch: Launch, _ b: CallBuffers, keyValueType: StorageType,
        acrossHeads: Bool, splits: Int, keysPerSplit: Int, state: ExecutionState, batch: BatchArguments? = nil
    ) throws(OpenCLError) {
        let totalRows = p.batch * p.queryHeads * p.queryLength
        let oPart = try state.buffer(bytes: 4 * splits * totalRows * p.valueDim, flags: Int32(CL_MEM_READ_WRITE))
        let lsePart = try state.buffer(bytes: 4 * splits * totalRows, flags: Int32(CL_MEM_READ_WRITE))
        // K and V are read in place, as stored: one program per storage type.
        let options =
            launch.config.decodeOptions(rows: p.groupSize * p.queryLength, cpuDevice: device?.info.isCPU ?? false)
            + " -DKV_TYPE=\(keyValueType.kernelCode)" + (batch.map { " -DBATCH_FORM=\($0.form)" } ?? "")
        // A head's rows far apart: each work-item walks its keys across every head (adjacent memory).
        let name = acrossHeads ? "decode_partial_heads" : "decode_partial"
        let partial = try state.kernel(name, source: launch.source, options: options)
        var arguments = [b.q, b.k, b.v, b.additiveMask, b.booleanMask, oPart, lsePart]
        if acrossHeads {
            arguments.append(try state.buffer(bytes: 12 * splits * totalRows, flags: Int32(CL_MEM_READ_WRITE)))
        }
        for (i, buffer) in arguments.enumerated() { try partial.set(i, buffer) }
        try partial.set(arguments.count, value: params)
        try partial.set(arguments.count + 1, value: Int32(keysPerSplit))
        try partial.set(arguments.count + 2, value: Int32(splits))
        if let batch {
            try partial.set(arguments.count + 3, batch.lengths)
            try partial.set(arguments.count + 4, batch.blockTable)
            try partial.set(arguments.count + 5, value: Int32(batch.pageSize))
            try partial.set(arguments.count + 6, value: Int32(batch.maxPages))
        }
        // One work-item per group: drivers left to choose (PoCL) may pack the whole small range
        // into a single group, which then runs on one core.
        let items = acrossHeads ? p.batch : p.batch * p.keyValueHeads
        try state.enqueue(partial, global: [splits, items], local: [1, 1])

        try enqueueMerge(
            oPart, lsePart, into: b, rows: totalRows, valueDim: p.valueDim, splits: splits, source: launch.source,
            options: options, state: state)
    }

    /// decode_merge: the exact combination of `splits` partial results per row into dense O and LSE.
    func enqueueMerge(
        _ oPart: CLBuffer, _ lsePart: CLBuffer, into b: CallBuffers, rows totalRows: Int, valueDim: Int, splits: Int,
        source: String, options: String, state: ExecutionState
    ) throws(OpenCLError) {
        let merge = try state.kernel("decode_merge", source: source, options: options)
        try merge.set(0, oPart)
        try merge.set(1, lsePart)
        try merge.set(2, b.o)
        try merge.set(3, b.lse)
        try merge.set(4, value: Int32(totalRows))
        try merge.set(5, value: Int32(valueDim))
        try merge.set(6, value: Int32(splits))
        try state.enqueue(merge, global: [totalRows], local: nil)
    }
}

/// A tensor in an OpenCL device's memory.
public final class OpenCLTensor: @unchecked Sendable {
    public let shape: [Int]
    public let device: OpenCLDevice
    package let buffer: CLBuffer

    init(shape: [Int], buffer: CLBuffer, device: OpenCLDevice) {
        self.shape = shape
        self.buffer = buffer
        self.device = device
    }
}

/// `Array.withUnsafeBytes` with a typed error.
func withBytes<T, R>(of array: [T], _ body: (UnsafeRawBufferPointer) throws(OpenCLError) -> R) throws(OpenCLError) -> R
{
    let result: Result<R, OpenCLError> = array.withUnsafeBytes { raw in
        do throws(OpenCLError) { return .success(try body(raw)) } catch { return .failure(error) }
    }
    return try result.get()
}

extension String {
    /// Decodes a NUL-terminated C string held in an array.
    init(cChars: [CChar]) {
        self = String(decoding: cChars.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}

/// How one operand lies in a device buffer: storage type, strides, and the bytes it spans.
struct DeviceOperand {
    let type: StorageType
    let strides: Strides
    let shape: [Int]
    /// Bytes from the first element to the end of the last.
    let bytes: Int

    var isDenseF32: Bool { type == .f32 && strides == .bhsd(shape) }

    /// A dense pool of `type` elements of `shape` laid out by `strides` (device-resident K/V caches).
    init(resident type: StorageType, shape: [Int], strides: Strides) {
        self.init(type: type, strides: strides, shape: shape, bytes: type.byteSize * shape.reduce(1, *))
    }

    /// Dense fp32 [B, H, N, D] (device-resident tensors).
    static func dense(_ shape: [Int]) -> DeviceOperand {
        DeviceOperand(type: .f32, strides: .bhsd(shape), shape: shape, bytes: 4 * shape.reduce(1, *))
    }

    private init(type: StorageType, strides: Strides, shape: [Int], bytes: Int) {
        (self.type, self.strides, self.shape, self.bytes) = (type, strides, shape, bytes)
    }

    /// A validated view (bounds and overlap are checked by `AttentionBuffers.check`); the kernels
    /// take 32-bit strides, so larger ones are refused here.
    init(_ view: TensorView, shape: [Int], name: String, backend: String) throws(AttentionError) {
        let s = view.strides(for: shape)
        guard [s.batch, s.head, s.sequence].allSatisfy({ $0 < Int(Int32.max) }) else {
            throw .unsupported(
                backend: backend, reason: "\(name) strides \(s) exceed the kernels' 32-bit index range")
        }
        // Validated views never overflow; 0 would only under-allocate an unvalidated one, never over-read.
        let last = s.lastOffset(of: shape) ?? 0
        self.init(type: view.storage, strides: s, shape: shape, bytes: (last + 1) * view.storage.byteSize)
    }
}

/// The device buffers of one call with their layouts.
struct DeviceCall {
    var q, k, v, o: (buffer: CLBuffer, layout: DeviceOperand)
    var lse: CLBuffer
}

extension StorageType {
    /// The kernels' name for the storage type (KV_TYPE, K_TYPE, SRC_TYPE, DST_TYPE).
    var kernelCode: Int {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .bf16: return 2
        }
    }
}
