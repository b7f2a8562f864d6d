import ArgumentParser
import AttentionKit
import AttentionVerification
import Dispatch
import Foundation
import NumPyIO

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compute attention on .npy files.",
        discussion: """
            Q [B, Hq, Nq, D], K [B, Hkv, Nk, D], V [B, Hkv, Nk, Dv] as .npy (<f4 or <f2; <f8 is converted), or
            with --layout bshd [B, N, H, D] files (O is written in the same layout). A <f2 file stays fp16 for
            the call unless --dtype/--kv-dtype say otherwise. The mask (optional) is |b1 (true = may attend) or \
            float (added to scores), broadcastable to
            [B, Hq, Nq, Nk]. Causal masking is bottom-right aligned: query i sees key j iff j <= i + Nk - Nq.
            """
    )

    @Option(name: .customLong("q"), help: "Query .npy file, [B, Hq, Nq, D].") var queryPath: String
    @Option(name: .customLong("k"), help: "Key .npy file, [B, Hkv, Nk, D].") var keyPath: String
    @Option(name: .customLong("v"), help: "Value .npy file, [B, Hkv, Nk, Dv].") var valuePath: String
    @Option(name: .customLong("mask"), help: "Mask .npy file (bool or float), broadcastable to [B, Hq, Nq, Nk].")
    var maskPath: String?
    @Flag(help: "Bottom-right aligned causal masking.") var causal = false
    @Option(
        help: ArgumentHelp(
            "Sliding window L,R (-1 = unbounded side; write --window=-1,0 when L is negative).", valueName: "L,R"))
    var window: AttentionWindow?
    @Option(help: "Score scale (default 1/sqrt(D)).") var scale: Float?
    @Option(help: "Softcap c > 0: scores become c*tanh(s/c).") var softcap: Float?
    @Option(help: "Backend: auto, naive, blas, opencl or opencl:N.") var backend: BackendChoice = .auto
    @Option(help: "OpenCL device index with --backend opencl (see `attnbench devices`).") var device: Int?
    @Option(
        help: ArgumentHelp(
            "OpenCL kernel configuration, e.g. vec=16,rows=4,wg=4,local=0,decoderows=8,split=256; "
                + "gpu=NVIDIA|AMD|Intel|Mali (that GPU's table configuration, on any device); "
                + "tiles=32x32x16x128, decodetiles=8x64x32x128 (rows x keys x items per row x items of the "
                + "GPU kernel) or off (omitted keys: the device table).",
            valueName: "k=v,..."))
    var kernelConfig: String?
    @Flag(help: "OpenCL: never use the split-KV decode kernel.") var noSplitKV = false
    @Flag(help: "OpenCL with --repeat: upload Q, K, V once and time device-resident calls (a KV cache on the device).")
    var resident = false
    @Option(name: .customLong("out"), help: "Output .npy file for O, [B, Hq, Nq, Dv].") var outPath: String
    @Option(name: .customLong("lse"), help: "Output .npy file for the log-sum-exp, [B, Hq, Nq].") var lsePath: String?
    @Option(
        name: .customLong("repeat"),
        help: "Timed repetitions after a warm-up (0.2 s for short calls); prints median time and GFLOP/s to stderr.")
    var repetitions: Int?
    @Option(help: "Worker threads for the CPU backends (default: all cores).") var threads: Int?
    @Option(help: "How the .npy files are laid out: bhsd ([B, H, N, D]) or bshd ([B, N, H, D]).")
    var layout: TensorLayout = .bhsd
    @Option(
        help: ArgumentHelp(
            "Storage of Q, K and V for the call: f32, f16 or bf16 (inputs rounded to nearest even first; "
                + "default: f16 for <f2 files, else f32)."))
    var dtype: StorageType?
    @Option(help: "Storage of K and V for the call (overrides --dtype for them).") var kvDtype: StorageType?
    @Option(help: "Storage of O: f32 (written as <f4) or f16 (written as <f2).") var outDtype: StorageType = .f32
    @Option(
        help: ArgumentHelp("BLAS tiling: query rows x key block (default: from the tiling table).", valueName: "RxK"))
    var tiling: BLASTiling?
    @Option(help: "BLAS prefill products: automatic, sgemm (OpenBLAS) or tiled (the CPU kernels' own).")
    var products: BLASProducts?
    @Option(
        name: .customLong("cu-seqlens-q"),
        help: "Varlen: S + 1 query offsets (.npy, int32 or int64); Q/K/V/O files are then packed [total, H, D].")
    var cuSeqlensQ: String?
    @Option(name: .customLong("cu-seqlens-k"), help: "Varlen: S + 1 key offsets (.npy, int32 or int64).")
    var cuSeqlensK: String?
    @Option(
        name: .customLong("cache-lengths"),
        help: "Cache lengths [B] (.npy, int32 or int64): K/V files are caches [B, Hkv, C, D] (bshd: [B, C, Hkv, D]).")
    var cacheLengthsPath: String?
    @Option(
        help: "Run the batch through paged K/V: pages of this many keys (power of two, 1-1024) in shuffled order.")
    var pageSize: Int?

    func validate() throws {
        if let repetitions, repetitions < 1 { throw ValidationError("--repeat must be >= 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be >= 1") }
    }

    func run() throws {
        if outDtype == .bf16 { throw CLIError("--out-dtype: .npy has no bf16; use f32 or f16") }
        if cuSeqlensQ != nil || cuSeqlensK != nil || cacheLengthsPath != nil || pageSize != nil {
            return try runBatch()
        }
        if resident && (layout != .bhsd || dtype != nil || kvDtype != nil || outDtype != .f32) {
            throw CLIError("--resident times fp32 [B, H, N, D] tensors only")
        }
        let (q, qHalf) = try loadOperand(queryPath, role: "query", layout: layout)
        let (k, kHalf) = try loadOperand(keyPath, role: "key", layout: layout)
        let (v, vHalf) = try loadOperand(valuePath, role: "value", layout: layout)
        var options = AttentionOptions(scale: scale, softcap: softcap, causal: causal, window: window)
        if let maskPath { options.mask = try loadMask(maskPath) }
        let storage = StorageTypes(
            query: dtype ?? (qHalf ? .f16 : .f32), keyValue: kvDtype ?? dtype ?? (kHalf || vHalf ? .f16 : .f32),
            output: outDtype)

        let problem: AttentionProblem
        do {
            problem = try AttentionProblem(
                query: q.shape, key: k.shape, value: v.shape, options: options, storage: storage)
        } catch {
            throw CLIError(
                "\(error) (query: \(queryPath), key: \(keyPath), value: "
                    + "\(valuePath)\(maskPath.map { ", mask: \($0)" } ?? ""))"
            )
        }
        let selection = try select(problem)
        let memory = try OperandMemory(problem, layout: layout == .bhsd ? .bhsd : .bshd, q: q, k: k, v: v)
        defer { memory.deallocate() }
        var lse = [Float](repeating: 0, count: problem.lseShape.reduce(1, *))
        let run = try lse.withUnsafeMutableBufferPointer { buffer in
            try selection.run(problem, memory.buffers(logSumExp: buffer))
        }
        try writeOutput(memory.readOutput(), problem.outputShape)
        if let lsePath { try NPYArray(shape: problem.lseShape, floats: lse).write(to: lsePath) }
        printError(
            "\(run.backend) (\(selection.reason)): O \(problem.outputShape) [\(storage), \(layout)] "
                + "written to \(outPath)")
        if run.fellBack { printError("warning: ran on \(run)") }

        if let repetitions {
            let times = try time(selection.backend, problem, memory, (q, k, v), repetitions: repetitions)
            printError(describeTimes(times, backend: selection.backend, problem, repetitions: repetitions))
        }
    }

    /// O (logical order, fp32) to `--out` in the files' layout and `--out-dtype`.
    private func writeOutput(_ values: [Float], _ shape: [Int]) throws {
        let stored = layout == .bhsd ? values : permuteHeadsAndPositions(values, shape)
        let fileShape = layout.storedShape(shape)
        if outDtype == .f16 {
            try NPYArray(shape: fileShape, halfBits: stored.map(StorageType.encodeHalf)).write(to: outPath)
        } else {
            try NPYArray(shape: fileShape, floats: stored).write(to: outPath)
        }
    }

    /// The backend: `--backend` (with `--device`), then the OpenCL tuning flags.
    private func select(_ problem: AttentionProblem) throws -> BackendSelection {
        var choice = backend
        if case .backend(.opencl) = backend, let device { choice = .opencl(device: device) }
        let selection = try BackendSelection.select(choice, for: problem, threads: threads, tiling: tiling)
        if let products, selection.backend.id == .blas {
            let blas = BLASBackend(threads: threads, tiling: tiling, products: products)
            return BackendSelection(
                backend: blas, reason: "\(selection.reason); \(products) products (\(blas.plan(for: problem).path))")
        }
        guard case .opencl(let index) = selection.backend.id, kernelConfig != nil || noSplitKV else { return selection }
        let config = try parseKernelConfig(kernelConfig ?? "", device: index, problem: problem)
        let tuned = OpenCLBackend(device: index, config: config, allowSplitKV: !noSplitKV)
        let described = config.map { "\($0)" } ?? "table config"
        return BackendSelection(
            backend: tuned, reason: "requested, \(described), \(tuned.kernelChoice(for: problem).choice)")
    }

    /// Sorted seconds of `repetitions` timed calls on the laid-out operands (device-resident fp32
    /// tensors with `--resident`).
    private func time(
        _ backend: any AttentionBackend, _ problem: AttentionProblem, _ memory: OperandMemory,
        _ tensors: (Tensor, Tensor, Tensor), repetitions: Int
    ) throws -> [Double] {
        guard resident else {
            let buffers = memory.buffers(logSumExp: nil)
            return try timeCalls(repetitions: repetitions, budget: .infinity) { try backend.forward(problem, buffers) }
        }
        guard case .opencl(let index) = backend.id else { throw CLIError("--resident needs --backend opencl") }
        let opencl = OpenCLBackend(device: index)
        let (dq, dk, dv) = (try opencl.upload(tensors.0), try opencl.upload(tensors.1), try opencl.upload(tensors.2))
        return try timeCalls(repetitions: repetitions, budget: .infinity) {
            _ = try opencl.attention(problem, query: dq, key: dk, value: dv)
        }
    }

    /// Median, spread and the ratios to this machine's SGEMM (and read bandwidth, decode-like)
    /// measured right now.
    private func describeTimes(
        _ times: [Double], backend: any AttentionBackend, _ problem: AttentionProblem, repetitions: Int
    ) -> String {
        let median = times[times.count / 2]
        let gflops = problem.flops / median / 1e9
        let sgemm = MachineProbes.measureSGEMM()
        var line =
            "\(backend.name): median \(format(median * 1e3)) ms over \(repetitions) runs "
            + "(min \(format((times.first ?? 0) * 1e3)), max \(format((times.last ?? 0) * 1e3))), "
            + "\(format(gflops)) GFLOP/s = \(format(gflops / sgemm)) x SGEMM (\(format(sgemm)) GFLOP/s measured now, "
            + "OpenBLAS core \(CPUInfo.openBLASCore)\(coreTypeNote))"
        if problem.regime == .decodeLike {
            let bandwidth = MachineProbes.measureReadBandwidth()
            let rate = problem.keyValueBytes / median / 1e9
            line +=
                ", K/V read \(format(rate)) GB/s = \(format(rate / bandwidth)) x memory read bandwidth "
                + "(\(format(bandwidth)) GB/s measured now)"
        }
        return line
    }

    /// `--kernel-config`: keys over the table's configuration of the device. `gpu=VENDOR` starts from a
    /// typical VENDOR GPU's configuration instead (GPU-shaped kernels on any device); `tiles=` and
    /// `decodetiles=` take `ROWSxKEYSxPERROWxITEMS` (the tiled kernel) or `off` (the CPU-shaped kernels).
    private func parseKernelConfig(_ text: String, device index: Int, problem: AttentionProblem) throws
        -> OpenCLKernelConfig?
    {
        let backend = OpenCLBackend(device: index)
        let items = text.split(separator: ",").filter { !$0.isEmpty }
        let vendor = items.first { $0.lowercased().hasPrefix("gpu=") }.map { String($0.dropFirst(4)) }
        guard var config = (vendor.map { backend.gpuShaped(as: $0) } ?? backend).kernelConfig(for: problem) else {
            return nil
        }
        for item in items where !item.lowercased().hasPrefix("gpu=") {
            let parts = item.split(separator: "=")
            if parts.count == 2, ["tiles", "decodetiles"].contains(parts[0].lowercased()) {
                let tiles = try parseTiles(String(parts[1]))
                if parts[0].lowercased() == "tiles" { config.tiles = tiles } else { config.decodeTiles = tiles }
                continue
            }
            guard parts.count == 2, let value = Int(parts[1]) else {
                throw CLIError("--kernel-config: cannot read '\(item)'")
            }
            switch parts[0].lowercased() {
            case "vec":
                guard OpenCLKernelConfig.vectorWidths.contains(value) else {
                    throw CLIError("--kernel-config: vec must be 4, 8 or 16")
                }
                config.vectorWidth = value
            case "rows": config.rows = max(1, value)
            case "wg": config.workGroup = max(1, value)
            case "local": config.useLocalMemory = value != 0
            case "decoderows": config.decodeRows = max(1, value)
            case "split": config.minKeysPerSplit = max(16, value)
            default:
                throw CLIError(
                    "--kernel-config: unknown key '\(parts[0])' (gpu, tiles, decodetiles, vec, rows, wg, local, "
                        + "decoderows, split)")
            }
        }
        return config
    }

    /// `ROWSxKEYSxPERROWxITEMS` (nil for `off`), checked for shape.
    private func parseTiles(_ text: String) throws -> GPUTiles? {
        if text.lowercased() == "off" { return nil }
        let numbers = text.lowercased().split(separator: "x").compactMap { Int($0) }
        guard numbers.count == 4 else {
            throw CLIError("--kernel-config: tiles '\(text)' is not ROWSxKEYSxPERROWxITEMS (e.g. 32x32x16x128) or off")
        }
        let tiles = GPUTiles(rows: numbers[0], keys: numbers[1], rowThreads: numbers[2], workGroup: numbers[3])
        if let problem = tiles.problem { throw CLIError("--kernel-config: tiles \(text): \(problem)") }
        return tiles
    }

    private var coreTypeNote: String {
        ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"].map { ", forced by OPENBLAS_CORETYPE=\($0)" } ?? ""
    }
}
