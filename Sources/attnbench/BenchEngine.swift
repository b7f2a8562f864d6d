import AttentionKit
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
    var backendLabel: String { backendName }
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
    func support(for problem: AttentionProblem) -> BackendSupport {
        (try? BackendSelection.select(.auto, for: problem)) != nil ? .supported : .unsupported(reason: "no backend supports it")
    }
    func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        try BackendSelection.select(.auto, for: problem).backend.forward(problem, buffers)
    }
}

/// Runs benchmark cells.
struct BenchEngine {
    var repetitions: Int
    /// Most seconds one cell may spend on timed runs (at least one run is made).
    var cellBudget: Double
    /// Cells whose single run is expected to take longer than this are skipped.
    var maxRunSeconds: Double
    var roofline: Roofline

    func run(_ shape: ShapeSpec, on entry: BenchBackend) -> BenchRow {
        let name = entry.backend.name
        var row = BenchRow(shape: shape.name, shapeSummary: shape.summary, backend: name.split(separator: ":").first.map(String.init) ?? name,
                           device: entry.device, repetitions: 0, dispatcherPick: "", backendName: name)
        let problem: AttentionProblem
        do {
            problem = try shape.problem()
        } catch {
            row.skipped = "\(error)"
            return row
        }
        row.dispatcherPick = (try? BackendSelection.select(.auto, for: problem).backend.name) ?? "none"
        if case let .unsupported(reason) = entry.backend.support(for: problem) {
            row.skipped = reason
            return row
        }
        let inputBytes = 4 * (problem.queryShape.reduce(1, *) + problem.keyShape.reduce(1, *) + problem.valueShape.reduce(1, *)
            + problem.outputShape.reduce(1, *))
        let physical = Int(ProcessInfo.processInfo.physicalMemory)
        if inputBytes > physical / 2 {
            row.skipped = "needs \(inputBytes >> 20) MiB of host memory, more than half of this machine's \(physical >> 20) MiB"
            return row
        }
        if let expected = entry.expectedGFLOPS {
            let estimate = problem.flops / (expected * 1e9)
            let cap = entry.maxRunSeconds.map { min($0, maxRunSeconds) } ?? maxRunSeconds
            if estimate > cap {
                row.skipped = "estimated \(format(estimate)) s per run exceeds the \(format(cap)) s budget"
                return row
            }
        }
        if let opencl = entry.backend as? OpenCLBackend { row.kernel = opencl.kernelChoice(for: problem).choice.description }
        do {
            let q = try Tensor.random(shape: problem.queryShape, seed: 1)
            let k = try Tensor.random(shape: problem.keyShape, seed: 2)
            let v = try Tensor.random(shape: problem.valueShape, seed: 3)
            var result: AttentionResult?
            var times: [Double] = []
            row.peakExtraBytes = try PeakMemory.measure {
                result = try entry.backend.attention(problem, query: q, key: k, value: v)
            }
            times = try timeCalls(repetitions: repetitions, budget: cellBudget) {
                _ = try entry.backend.attention(problem, query: q, key: k, value: v)
            }
            let median = times[times.count / 2]
            row.repetitions = times.count
            row.medianSeconds = median
            row.minSeconds = times.first
            row.maxSeconds = times.last
            row.gflops = problem.flops / median / 1e9
            row.rooflineFraction = row.gflops.map { $0 / roofline.sgemmGFLOPS }
            if shape.isDecode {
                row.keyValueGBps = problem.keyValueBytes / median / 1e9
                row.bandwidthFraction = row.keyValueGBps.map { $0 / roofline.memoryReadGBps }
            }
            if let result {
                let error = SampledError(problem, q: q, k: k, v: v, result: result)
                row.maxAbsError = error.maxAbs
                row.maxRelError = error.maxRel
                row.nmse = error.nmse
                row.errorRowsChecked = error.rows
                row.withinTolerance = error.violations == 0
            }
        } catch {
            row.skipped = "failed: \(error)"
        }
        return row
    }
}
