import AttentionKit
import Dispatch
import Foundation

/// One cell of a benchmark: a shape on a backend/device, or why it was skipped.
struct BenchRow: Codable {
    var shape: String
    var shapeSummary: String
    var backend: String
    var device: String
    var kernel: String?
    var medianSeconds: Double?
    var minSeconds: Double?
    var maxSeconds: Double?
    var repetitions: Int
    var gflops: Double?
    var rooflineFraction: Double?
    var keyValueGBps: Double?
    var bandwidthFraction: Double?
    var maxAbsError: Double?
    var maxRelError: Double?
    var nmse: Double?
    var errorRowsChecked: Int?
    var withinTolerance: Bool?
    var peakExtraBytes: Int?
    var dispatcherPick: String
    var skipped: String?
    /// "naive", "blas", "auto", or "opencl:N".
    var backendName: String
}

/// A backend as the harness sees it: how to build it, what device it is on, how fast it is
/// expected to be (to skip cells that would blow the time budget).
struct BenchBackend {
    let backend: any AttentionBackend
    let device: String
    /// Expected GFLOP/s, from the roofline; nil: no estimate (never skipped for time).
    let expectedGFLOPS: Double?
    /// This backend's own cap on the estimated seconds per run (nil: the harness's).
    var maxRunSeconds: Double? = nil

    /// `choice`: "all" (naive, blas, every OpenCL device, auto) or a comma-separated list.
    static func all(choice: String, devices: [Int]?, roofline: Roofline) throws -> [BenchBackend] {
        let cpu = CPUInfo.modelName ?? "CPU"
        var list: [BenchBackend] = []
        let wanted = choice == "all" ? ["naive", "blas", "opencl", "auto"] : choice.split(separator: ",").map(String.init)
        for name in wanted {
            switch name {
            case "naive":
                // The reference is for checking: only where a run takes a couple of seconds at most.
                list.append(BenchBackend(backend: NaiveBackend(), device: cpu, expectedGFLOPS: 2, maxRunSeconds: 2))
            case "blas": list.append(BenchBackend(backend: BLASBackend(), device: cpu, expectedGFLOPS: 0.5 * roofline.sgemmGFLOPS))
            case "opencl":
                let available = OpenCLRuntime.availableDevices
                for index in devices ?? Array(available.indices) {
                    let backend = OpenCLBackend(device: index)
                    let info = backend.device?.info
                    list.append(BenchBackend(backend: backend, device: info.map { "\($0.name) [\($0.type)]" } ?? "device \(index)",
                                             expectedGFLOPS: info?.isCPU == true ? 0.3 * roofline.sgemmGFLOPS : nil))
                }
                if available.isEmpty {
                    // No OpenCL: one entry whose cells are skipped with the reason.
                    list.append(BenchBackend(backend: OpenCLBackend(device: 0), device: "none", expectedGFLOPS: nil))
                }
            case "auto": list.append(BenchBackend(backend: AutoBackend(), device: "auto", expectedGFLOPS: nil))
            default: throw CLIError("unknown backend '\(name)' (naive, blas, opencl, auto, all)")
            }
        }
        return list
    }
}

/// The backend `BackendSelection.select(.auto, ...)` picks, per problem, as a backend of its own.
struct AutoBackend: AttentionBackend {
    var name: String { "auto" }
    /// The naive reference supports every valid problem, so auto always has a backend; a forced
    /// (ATTENTIONKIT_BACKEND) backend that cannot run it throws from `run` with the reason. One
    /// selection per call, as a user of `.auto` would pay.
    func support(for problem: AttentionProblem) -> BackendSupport { .supported }
    func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        try BackendSelection.select(.auto, for: problem).backend.forward(problem, buffers)
    }
}

/// Runs benchmark cells. The backends of one shape are timed round-robin (one call each per
/// round, on the same inputs), so that a machine whose speed drifts during the run affects them
/// alike and the ratios between them stay meaningful.
struct BenchEngine {
    var repetitions: Int
    /// Most seconds one cell may spend on timed runs (at least one run is made).
    var cellBudget: Double
    /// Cells whose single run is expected to take longer than this are skipped.
    var maxRunSeconds: Double
    var roofline: Roofline

    /// Every backend on one shape: a row each, skipped ones with the reason.
    func run(_ shape: ShapeSpec, on entries: [BenchBackend], progress: Progress? = nil) -> [BenchRow] {
        var rows = entries.map { entry -> BenchRow in
            let name = entry.backend.name
            return BenchRow(shape: shape.name, shapeSummary: shape.summary, backend: name.split(separator: ":").first.map(String.init) ?? name,
                            device: entry.device, repetitions: 0, dispatcherPick: "", backendName: name)
        }
        let problem: AttentionProblem
        let inputs: (Tensor, Tensor, Tensor)
        do {
            problem = try shape.problem()
        } catch {
            for index in rows.indices { rows[index].skipped = "\(error)" }
            return rows
        }
        let pick = (try? BackendSelection.select(.auto, for: problem).backend.name) ?? "none"
        var active: [Int] = []
        for (index, entry) in entries.enumerated() {
            rows[index].dispatcherPick = pick
            if let reason = skipReason(problem, entry) {
                rows[index].skipped = reason
            } else {
                active.append(index)
            }
            if let opencl = entry.backend as? OpenCLBackend, rows[index].skipped == nil {
                rows[index].kernel = opencl.kernelChoice(for: problem).choice.description
            }
        }
        guard !active.isEmpty else { return rows }
        do {
            inputs = (try Tensor.random(shape: problem.queryShape, seed: 1), try Tensor.random(shape: problem.keyShape, seed: 2),
                      try Tensor.random(shape: problem.valueShape, seed: 3))
        } catch {
            for index in active { rows[index].skipped = "failed: \(error)" }
            return rows
        }
        let (q, k, v) = inputs
        // First call (peak memory, error against the reference) and warm-up, per backend.
        var times: [Int: [Double]] = [:]
        var running: [Int] = []
        for index in active {
            let backend = entries[index].backend
            do {
                var result: AttentionResult?
                rows[index].peakExtraBytes = try PeakMemory.measure {
                    result = try backend.attention(problem, query: q, key: k, value: v)
                }
                if let result {
                    let error = SampledError(problem, q: q, k: k, v: v, result: result)
                    rows[index].maxAbsError = error.maxAbs
                    rows[index].maxRelError = error.maxRel
                    rows[index].nmse = error.nmse
                    rows[index].errorRowsChecked = error.rows
                    rows[index].withinTolerance = error.violations == 0
                }
                _ = try timeCalls(repetitions: 0, budget: 0) { _ = try backend.attention(problem, query: q, key: k, value: v) }
                times[index] = []
                running.append(index)
            } catch {
                rows[index].skipped = "failed: \(error)"
            }
        }
        // Timed rounds.
        var spent: [Int: Double] = [:]
        for round in 0..<repetitions {
            for index in running {
                let last = times[index]?.last ?? 0
                guard round == 0 || (spent[index] ?? 0) + last <= cellBudget else { continue }
                let start = DispatchTime.now().uptimeNanoseconds
                do {
                    _ = try entries[index].backend.attention(problem, query: q, key: k, value: v)
                } catch {
                    rows[index].skipped = "failed: \(error)"
                    continue
                }
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                times[index, default: []].append(seconds)
                spent[index, default: 0] += seconds
            }
        }
        for index in running where rows[index].skipped == nil {
            let sorted = (times[index] ?? []).sorted()
            guard !sorted.isEmpty else { continue }
            let median = sorted[sorted.count / 2]
            rows[index].repetitions = sorted.count
            rows[index].medianSeconds = median
            rows[index].minSeconds = sorted.first
            rows[index].maxSeconds = sorted.last
            rows[index].gflops = problem.flops / median / 1e9
            rows[index].rooflineFraction = rows[index].gflops.map { $0 / roofline.sgemmGFLOPS }
            if shape.isDecode {
                rows[index].keyValueGBps = problem.keyValueBytes / median / 1e9
                rows[index].bandwidthFraction = rows[index].keyValueGBps.map { $0 / roofline.memoryReadGBps }
            }
        }
        return rows
    }

    /// Why a backend does not run this shape (unsupported, memory, time budget), or nil.
    private func skipReason(_ problem: AttentionProblem, _ entry: BenchBackend) -> String? {
        if case let .unsupported(reason) = entry.backend.support(for: problem) { return reason }
        let inputBytes = 4 * (problem.queryShape.reduce(1, *) + problem.keyShape.reduce(1, *) + problem.valueShape.reduce(1, *)
            + problem.outputShape.reduce(1, *))
        let physical = Int(ProcessInfo.processInfo.physicalMemory)
        if inputBytes > physical / 2 {
            return "needs \(inputBytes >> 20) MiB of host memory, more than half of this machine's \(physical >> 20) MiB"
        }
        if let expected = entry.expectedGFLOPS {
            let estimate = problem.flops / (expected * 1e9)
            let cap = entry.maxRunSeconds.map { min($0, maxRunSeconds) } ?? maxRunSeconds
            if estimate > cap { return "estimated \(format(estimate)) s per run exceeds the \(format(cap)) s budget" }
        }
        return nil
    }
}
