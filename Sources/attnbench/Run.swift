import ArgumentParser
import AttentionKit
import Dispatch
import Foundation
import NumPyIO

extension BackendChoice: ExpressibleByArgument {}

extension BLASTiling: ExpressibleByArgument {
    /// "RxK", e.g. "128x512".
    public init?(argument: String) {
        let parts = argument.lowercased().split(separator: "x")
        guard parts.count == 2, let rows = Int(parts[0]), let keys = Int(parts[1]), rows > 0, keys > 0 else { return nil }
        self.init(queryRows: rows, keyBlock: keys)
    }
}

extension AttentionWindow: ExpressibleByArgument {
    /// "L,R", each an integer >= -1 (-1 = unbounded).
    public init?(argument: String) {
        let parts = argument.split(separator: ",", omittingEmptySubsequences: false)
        guard parts.count == 2,
              let left = Int(parts[0].trimmingCharacters(in: .whitespaces)),
              let right = Int(parts[1].trimmingCharacters(in: .whitespaces))
        else { return nil }
        self.init(left: left, right: right)
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compute attention on .npy files.",
        discussion: """
        Q [B, Hq, Nq, D], K [B, Hkv, Nk, D], V [B, Hkv, Nk, Dv] as .npy (<f4; <f8 and <f2 are converted).
        The mask (optional) is |b1 (true = may attend) or float (added to scores), broadcastable to
        [B, Hq, Nq, Nk]. Causal masking is bottom-right aligned: query i sees key j iff j <= i + Nk - Nq.
        """
    )

    @Option(name: .customLong("q"), help: "Query .npy file, [B, Hq, Nq, D].") var queryPath: String
    @Option(name: .customLong("k"), help: "Key .npy file, [B, Hkv, Nk, D].") var keyPath: String
    @Option(name: .customLong("v"), help: "Value .npy file, [B, Hkv, Nk, Dv].") var valuePath: String
    @Option(name: .customLong("mask"), help: "Mask .npy file (bool or float), broadcastable to [B, Hq, Nq, Nk].")
    var maskPath: String?
    @Flag(help: "Bottom-right aligned causal masking.") var causal = false
    @Option(help: ArgumentHelp("Sliding window L,R (-1 = unbounded side; write --window=-1,0 when L is negative).", valueName: "L,R"))
    var window: AttentionWindow?
    @Option(help: "Score scale (default 1/sqrt(D)).") var scale: Float?
    @Option(help: "Softcap c > 0: scores become c*tanh(s/c).") var softcap: Float?
    @Option(help: "Backend: naive, blas, opencl or auto.") var backend: BackendChoice = .auto
    @Option(help: "OpenCL device index (see `attnbench devices`).") var device: Int = 0
    @Option(help: ArgumentHelp("OpenCL kernel configuration, e.g. vec=16,rows=4,wg=4,local=0,decoderows=8,split=256 (omitted keys: the device table).",
                               valueName: "k=v,..."))
    var kernelConfig: String?
    @Flag(help: "OpenCL: never use the split-KV decode kernel.") var noSplitKV = false
    @Flag(help: "OpenCL with --repeat: upload Q, K, V once and time device-resident calls (a KV cache on the device).")
    var resident = false
    @Option(name: .customLong("out"), help: "Output .npy file for O, [B, Hq, Nq, Dv].") var outPath: String
    @Option(name: .customLong("lse"), help: "Output .npy file for the log-sum-exp, [B, Hq, Nq].") var lsePath: String?
    @Option(name: .customLong("repeat"), help: "Timed repetitions after a warm-up (0.2 s for short calls); prints median time and GFLOP/s to stderr.")
    var repetitions: Int?
    @Option(help: "Worker threads for the CPU backends (default: all cores).") var threads: Int?
    @Option(help: ArgumentHelp("BLAS tiling: query rows x key block (default: from the tiling table).", valueName: "RxK"))
    var tiling: BLASTiling?

    func validate() throws {
        if let repetitions, repetitions < 1 { throw ValidationError("--repeat must be >= 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be >= 1") }
    }

    func run() throws {
        let q = try loadFloats(queryPath, role: "query")
        let k = try loadFloats(keyPath, role: "key")
        let v = try loadFloats(valuePath, role: "value")
        var options = AttentionOptions(scale: scale, softcap: softcap, causal: causal, window: window)
        if let maskPath { options.mask = try loadMask(maskPath) }

        let problem: AttentionProblem
        do {
            problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, options: options)
        } catch {
            throw CLIError("\(error) (query: \(queryPath), key: \(keyPath), value: \(valuePath)\(maskPath.map { ", mask: \($0)" } ?? ""))")
        }
        var selection = try BackendSelection.select(backend, for: problem, threads: threads, tiling: tiling, device: device)
        if selection.backend is OpenCLBackend && (kernelConfig != nil || noSplitKV) {
            let base = OpenCLBackend(device: device)
            let config = try parseKernelConfig(kernelConfig ?? "", base: base.kernelConfig(for: problem))
            let tuned = OpenCLBackend(device: device, config: config, allowSplitKV: !noSplitKV)
            selection = BackendSelection(backend: tuned, reason: "requested, \(config.map { "\($0)" } ?? "table config"), \(tuned.kernelChoice(for: problem).choice)")
        }
        let result = try selection.backend.attention(problem, query: q, key: k, value: v)

        try write(result.output, to: outPath)
        if let lsePath { try write(result.logSumExp, to: lsePath) }
        printError("\(selection.backend.name) (\(selection.reason)): O \(problem.outputShape) written to \(outPath)")

        if let repetitions {
            let times: [Double]
            if resident {
                guard let opencl = selection.backend as? OpenCLBackend else { throw CLIError("--resident needs --backend opencl") }
                let (dq, dk, dv) = (try opencl.upload(q), try opencl.upload(k), try opencl.upload(v))
                times = try timeCalls(repetitions: repetitions, budget: .infinity) { _ = try opencl.attention(problem, query: dq, key: dk, value: dv) }
            } else {
                times = try timeCalls(repetitions: repetitions, budget: .infinity) {
                    _ = try selection.backend.attention(problem, query: q, key: k, value: v)
                }
            }
            let median = times[times.count / 2]
            let gflops = problem.flops / median / 1e9
            let sgemm = CPUInfo.measureSGEMM()
            var line = "\(selection.backend.name): median \(format(median * 1e3)) ms over \(repetitions) runs "
                + "(min \(format(times.first! * 1e3)), max \(format(times.last! * 1e3))), "
                + "\(format(gflops)) GFLOP/s = \(format(gflops / sgemm)) x SGEMM (\(format(sgemm)) GFLOP/s measured now, "
                + "OpenBLAS core \(CPUInfo.openBLASCore)\(coreTypeNote))"
            if problem.queryLength <= 16 {
                let bandwidth = CPUInfo.measureReadBandwidth()
                let rate = problem.keyValueBytes / median / 1e9
                line += ", K/V read \(format(rate)) GB/s = \(format(rate / bandwidth)) x memory read bandwidth (\(format(bandwidth)) GB/s measured now)"
            }
            printError(line)
        }
    }

    private func parseKernelConfig(_ text: String, base: OpenCLKernelConfig?) throws -> OpenCLKernelConfig? {
        guard var config = base else { return nil }
        for item in text.split(separator: ",") where !item.isEmpty {
            let parts = item.split(separator: "=")
            guard parts.count == 2, let value = Int(parts[1]) else { throw CLIError("--kernel-config: cannot read '\(item)'") }
            switch parts[0].lowercased() {
            case "vec":
                guard [4, 8, 16].contains(value) else { throw CLIError("--kernel-config: vec must be 4, 8 or 16") }
                config.vectorWidth = value
            case "rows": config.rows = max(1, value)
            case "wg": config.workGroup = max(1, value)
            case "local": config.useLocalMemory = value != 0
            case "decoderows": config.decodeRows = max(1, value)
            case "split": config.minKeysPerSplit = max(16, value)
            default: throw CLIError("--kernel-config: unknown key '\(parts[0])' (vec, rows, wg, local, decoderows, split)")
            }
        }
        return config
    }

    private var coreTypeNote: String {
        ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"].map { ", forced by OPENBLAS_CORETYPE=\($0)" } ?? ""
    }

    private func loadFloats(_ path: String, role: String) throws -> Tensor {
        let array = try NPYArray.read(contentsOf: path)
        guard let values = array.floats else {
            throw NPYError.wrongKind(file: path, expected: "floating-point \(role)", actual: array.fileDType.rawValue)
        }
        do {
            return try Tensor(shape: array.shape, storage: values, name: "\(role) (\(path))")
        } catch {
            throw CLIError("\(error)")
        }
    }

    private func loadMask(_ path: String) throws -> AttentionMask {
        let array = try NPYArray.read(contentsOf: path)
        do {
            switch array.storage {
            case let .bool(values): return try AttentionMask(shape: array.shape, allowed: values)
            case let .float32(values): return try AttentionMask(shape: array.shape, additive: values)
            }
        } catch {
            throw CLIError("\(path): \(error)")
        }
    }

    private func write(_ tensor: Tensor, to path: String) throws {
        try NPYArray(shape: tensor.shape, floats: tensor.storage).write(to: path)
    }
}

func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

func format(_ x: Double) -> String {
    if x == 0 || !x.isFinite { return "\(x)" }
    if abs(x) >= 100 { return String(format: "%.0f", x) }
    if abs(x) >= 1 { return String(format: "%.2f", x) }
    if abs(x) >= 0.01 { return String(format: "%.3f", x) }
    return String(format: "%.2e", x)
}
