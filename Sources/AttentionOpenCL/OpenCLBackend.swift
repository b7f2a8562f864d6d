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

    public var id: BackendID { .opencl(device: index) }

    /// The kernel configuration a problem runs with, decided here and nowhere else: the fixed
    /// `config` if one was given, else the tuned one of the nearest head dimension, else the table.
    public func kernelConfig(for problem: AttentionProblem) -> OpenCLKernelConfig? {
        guard let device else { return nil }
        if let config { return config }
        if let tuned = tunedConfigs.nearest(to: max(problem.headDim, problem.valueDim)) { return tuned }
        return .default(for: device.info, headDim: problem.headDim, valueDim: problem.valueDim)
    }

    /// The kernel this backend would run, and why.
    public func kernelChoice(for problem: AttentionProblem) -> (choice: OpenCLKernelChoice, reason: String) {
        guard let device, let cfg = kernelConfig(for: problem) else { return (.flash, "no device") }
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
        let (choice, _) = kernelChoice(for: problem)
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

    /// Device memory of a call: copies of the inputs and outputs, the mask and the temporaries.
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

    /// Bytes of every device buffer a call allocates (inputs, outputs, mask, temporaries).
    private func bufferBytes(_ p: AttentionProblem, choice: OpenCLKernelChoice) -> [Int] {
        var sizes = [p.queryShape, p.keyShape, p.valueShape, p.outputShape, p.lseShape].map { 4 * $0.reduce(1, *) }
        if let mask = p.options.mask {
            switch mask.values {
            case .boolean(let values): sizes.append(values.count)
            case .additive(let values): sizes.append(4 * values.count)
            }
        }
        let vec = kernelConfig(for: p)?.vectorWidth ?? 16
        switch choice {
        case .flash:
            sizes.append(4 * p.batch * p.keyValueHeads * p.headDim * ((p.keyLength + vec - 1) / vec * vec))
        case .splitKV(let splits, _):
            let rows = p.batch * p.queryHeads * p.queryLength
            sizes.append(4 * splits * rows * p.valueDim)
            sizes.append(4 * splits * rows)
        }
        return sizes
    }

    // MARK: Host tensors

    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        guard let device else { throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device") }
        let launch = try prepare(problem)
        let zeroCopy = device.info.isCPU || device.info.hostUnifiedMemory
        do {
            try device.withExecution { (state) throws(OpenCLError) in
                let readOnly = Int32(CL_MEM_READ_ONLY)
                let q = try state.buffer(
                    bytes: buffers.query.count * 4, flags: readOnly, host: buffers.query.baseAddress,
                    useHostMemory: zeroCopy)
                let k = try state.buffer(
                    bytes: buffers.key.count * 4, flags: readOnly, host: buffers.key.baseAddress,
                    useHostMemory: zeroCopy)
                let v = try state.buffer(
                    bytes: buffers.value.count * 4, flags: readOnly, host: buffers.value.baseAddress,
                    useHostMemory: zeroCopy)
                // The flash kernel accumulates in O, so outputs are read and written.
                let readWrite = Int32(CL_MEM_READ_WRITE)
                let o = try state.buffer(
                    bytes: buffers.output.count * 4, flags: readWrite,
                    host: zeroCopy ? UnsafeRawPointer(buffers.output.baseAddress) : nil, useHostMemory: zeroCopy)
                let lseCount = problem.lseShape.reduce(1, *)
                let lseHost = buffers.logSumExp.flatMap { zeroCopy ? UnsafeRawPointer($0.baseAddress) : nil }
                let lse = try state.buffer(
                    bytes: lseCount * 4, flags: readWrite, host: lseHost, useHostMemory: lseHost != nil)
                try execute(problem, launch, state: state, q: q, k: k, v: v, o: o, lse: lse)
                if zeroCopy {
                    try state.synchronizeHostMemory(o)
                    if lseHost != nil { try state.synchronizeHostMemory(lse) }
                } else {
                    try state.read(
                        o, into: UnsafeMutableRawPointer(buffers.output.baseAddress!), bytes: buffers.output.count * 4)
                }
                if let host = buffers.logSumExp, lseHost == nil {
                    try state.read(lse, into: UnsafeMutableRawPointer(host.baseAddress!), bytes: lseCount * 4)
                }
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
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
        let launch = try prepare(problem)
        do {
            return try device.withExecution { (state) throws(OpenCLError) in
                let o = try state.buffer(bytes: 4 * problem.outputShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
                let lse = try state.buffer(bytes: 4 * problem.lseShape.reduce(1, *), flags: Int32(CL_MEM_READ_WRITE))
                try execute(
                    problem, launch, state: state, q: query.buffer, k: key.buffer, v: value.buffer, o: o, lse: lse)
                return (
                    OpenCLTensor(shape: problem.outputShape, buffer: o, device: device),
                    OpenCLTensor(shape: problem.lseShape, buffer: lse, device: device)
                )
            }
        } catch {
            throw .backendFailure(backend: name, message: error.description)
        }
    }

    // MARK: Kernels

    /// What a call launches: the configuration, the kernel choice and the program source it needs.
    private struct Launch {
        var config: OpenCLKernelConfig
        var choice: OpenCLKernelChoice
        var source: String
    }

    /// Resolves configuration and program source before any device work; a build that lacks a kernel
    /// is an error, never a silent no-op.
    private func prepare(_ p: AttentionProblem) throws(AttentionError) -> Launch {
        guard let config = kernelConfig(for: p) else {
            throw .unsupported(backend: name, reason: unavailableReason ?? "no OpenCL device")
        }
        let choice = kernelChoice(for: p).choice
        let file: String
        switch choice {
        case .flash: file = "attention"
        case .splitKV: file = "decode"
        }
        guard let source = programs(file) else {
            throw .backendFailure(backend: name, message: "kernel program '\(file).cl' is missing from this build")
        }
        return Launch(config: config, choice: choice, source: source)
    }

    /// The buffers of one call: inputs, outputs, and the mask in whichever form it has.
    private struct CallBuffers {
        var q, k, v, o, lse: CLBuffer
        var additiveMask: CLBuffer
        var booleanMask: CLBuffer
    }

    private func execute(
        _ p: AttentionProblem, _ launch: Launch, state: ExecutionState,
        q: CLBuffer, k: CLBuffer, v: CLBuffer, o: CLBuffer, lse: CLBuffer
    ) throws(OpenCLError) {
        var params = Self.parameters(p, keyPadding: launch.config.vectorWidth)
        var buffers = CallBuffers(
            q: q, k: k, v: v, o: o, lse: lse, additiveMask: state.placeholder,
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
            try launchFlash(p, params, launch, buffers, state: state)
        case .splitKV(let splits, let keysPerSplit):
            try launchSplitKV(p, params, launch, buffers, splits: splits, keysPerSplit: keysPerSplit, state: state)
        }
        try state.finish()
    }

    /// The kernels' parameter block (`AKParams` in common.cl); K padded to a multiple of `keyPadding`.
    private static func parameters(_ p: AttentionProblem, keyPadding vec: Int) -> AKParams {
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
        params.winLeft = Int32(p.options.window?.left ?? -1)
        params.winRight = Int32(p.options.window?.right ?? -1)
        params.maskBatchStride = Int32(p.maskLayout?.batchStride ?? 0)
        params.maskHeadStride = Int32(p.maskLayout?.headStride ?? 0)
        return params
    }

    /// K re-laid in key blocks, then the flash kernel over row blocks.
    private func launchFlash(
        _ p: AttentionProblem, _ params: AKParams, _ launch: Launch, _ b: CallBuffers, state: ExecutionState
    ) throws(OpenCLError) {
        let cfg = launch.config
        let (vec, nkPad) = (cfg.vectorWidth, Int(params.NkPad))
        let kt = try state.buffer(
            bytes: 4 * p.batch * p.keyValueHeads * p.headDim * nkPad, flags: Int32(CL_MEM_READ_WRITE))
        let transpose = try state.kernel("transpose_keys", source: launch.source, options: cfg.flashOptions)
        try transpose.set(0, b.k)
        try transpose.set(1, kt)
        try transpose.set(2, value: Int32(p.keyLength))
        try transpose.set(3, value: Int32(p.headDim))
        try transpose.set(4, value: Int32(nkPad))
        try state.enqueue(transpose, global: [nkPad, p.headDim, p.batch * p.keyValueHeads], local: nil)

        let flash = try state.kernel("flash_attention", source: launch.source, options: cfg.flashOptions)
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
    private func launchSplitKV(
        _ p: AttentionProblem, _ params: AKParams, _ launch: Launch, _ b: CallBuffers, splits: Int, keysPerSplit: Int,
        state: ExecutionState
    ) throws(OpenCLError) {
        let totalRows = p.batch * p.queryHeads * p.queryLength
        let oPart = try state.buffer(bytes: 4 * splits * totalRows * p.valueDim, flags: Int32(CL_MEM_READ_WRITE))
        let lsePart = try state.buffer(bytes: 4 * splits * totalRows, flags: Int32(CL_MEM_READ_WRITE))
        let options = launch.config.decodeOptions(rows: p.groupSize * p.queryLength)
        let partial = try state.kernel("decode_partial", source: launch.source, options: options)
        for (i, buffer) in [b.q, b.k, b.v, b.additiveMask, b.booleanMask, oPart, lsePart].enumerated() {
            try partial.set(i, buffer)
        }
        try partial.set(7, value: params)
        try partial.set(8, value: Int32(keysPerSplit))
        try partial.set(9, value: Int32(splits))
        // One work-item per group: drivers left to choose (PoCL) may pack the whole small range
        // into a single group, which then runs on one core.
        try state.enqueue(partial, global: [splits, p.batch * p.keyValueHeads], local: [1, 1])

        let merge = try state.kernel("decode_merge", source: launch.source, options: options)
        try merge.set(0, oPart)
        try merge.set(1, lsePart)
        try merge.set(2, b.o)
        try merge.set(3, b.lse)
        try merge.set(4, value: Int32(totalRows))
        try merge.set(5, value: Int32(p.valueDim))
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
