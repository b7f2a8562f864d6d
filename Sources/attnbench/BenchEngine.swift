import AttentionKit
import AttentionVerification
import Dispatch
import Foundation

/// One cell of a benchmark: a shape on a backend/device, or why it was skipped.
struct BenchRow: Codable {
    var shape: String
    var shapeSummary: String
    /// Storage of Q, K/V and O ("f32", or "q f16, kv f16, o f16").
    var storage: String = StorageTypes.f32.description
    /// How the operands were laid out (bhsd, bshd, cacheView, packedQKV).
    var layout: String = OperandLayout.bhsd.description
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
    /// The same for a second call (`attnbench extremes`).
    var warmPeakExtraBytes: Int?
    var dispatcherPick: String
    var skipped: String?
    /// The row's label: a backend name ("naive", "blas", "opencl:N") or "auto".
    var backendName: String

    /// The shape with its storage and layout when they are not the defaults ("decode-32k [kv f16]").
    var label: String {
        var label = shape
        if storage != StorageTypes.f32.description { label += " [\(storage)]" }
        if layout != OperandLayout.bhsd.description { label += " [\(layout)]" }
        return label
    }
}

/// One row source of a benchmark: a backend on its device, or the dispatcher's pick per call.
struct BenchBackend {
    enum Kind {
        case backend(any AttentionBackend)
        /// `BackendSelection.select(.auto, ...)` on every call, as a user of `.auto` pays.
        case auto
    }

    let kind: Kind
    let device: String
    /// Expected GFLOP/s, from the roofline; nil: no estimate (never skipped for time).
    let expectedGFLOPS: Double?
    /// This backend's own cap on the estimated seconds per run (nil: the harness's).
    var maxRunSeconds: Double? = nil

    /// The row label and family ("blas"; "opencl:1" in "opencl"; "auto").
    var label: String {
        if case .backend(let backend) = kind { return backend.name }
        return "auto"
    }
    var family: String {
        if case .backend(let backend) = kind { return backend.id.family }
        return "auto"
    }

    func support(for problem: AttentionProblem) -> BackendSupport {
        if case .backend(let backend) = kind { return backend.support(for: problem) }
        return .supported  // the reference supports every valid problem; a forced backend throws from run
    }

    /// The kernel or path the backend takes, for the table's note.
    func path(for problem: AttentionProblem) -> String? {
        guard case .backend(let backend) = kind else { return nil }
        let path = backend.plan(for: problem).path
        return path.isEmpty ? nil : path
    }

    /// One call on laid-out operands.
    func forward(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws {
        switch kind {
        case .backend(let backend): try backend.forward(problem, buffers)
        case .auto: try BackendSelection.select(.auto, for: problem).backend.forward(problem, buffers)
        }
    }

    /// One call on a batch of sequences.
    func forward(_ batch: SequenceBatch, _ buffers: AttentionBuffers) throws {
        switch kind {
        case .backend(let backend): try backend.forward(batch, buffers)
        case .auto: try Dispatcher.process.decide(batch).chosen.forward(batch, buffers)
        }
    }

    /// The entries `names` asks for: "all" (naive, blas, every OpenCL device, auto) or some of
    /// naive, blas, opencl (every device in `devices`), opencl:N, multi:A+B, auto.
    static func all(
        names: [String], devices: [Int]?, roofline: Roofline, products: BLASProducts = .automatic
    ) throws -> [BenchBackend] {
        let cpu = CPUInfo.modelName ?? "CPU"
        let wanted = names.isEmpty || names == ["all"] ? ["naive", "blas", "opencl", "auto"] : names
        var list: [BenchBackend] = []
        for name in wanted {
            if name == "auto" {
                list.append(BenchBackend(kind: .auto, device: "auto", expectedGFLOPS: nil))
                continue
            }
            switch try BackendID(parsing: name) {
            case .naive:
                // The reference is for checking: only where a run takes a couple of seconds at most.
                list.append(
                    BenchBackend(kind: .backend(NaiveBackend()), device: cpu, expectedGFLOPS: 2, maxRunSeconds: 2))
            case .blas:
                list.append(
                    BenchBackend(
                        kind: .backend(BLASBackend(products: products)), device: cpu,
                        expectedGFLOPS: 0.5 * roofline.sgemmGFLOPS)
                )
            case .opencl(let device):
                // "opencl" alone: all of them.
                let everyDevice = name.lowercased() == BackendID.opencl(device: 0).family
                let indices = everyDevice ? devices ?? Array(OpenCLRuntime.availableDevices.indices) : [device]
                // No OpenCL: one entry whose cells are skipped with the reason.
                list += (indices.isEmpty ? [0] : indices).map { openCL(device: $0, roofline: roofline) }
            case .multi(let members):
                // One call split across the members (weights from the machine profile).
                let backend = try Dispatcher.process.backend(.multi(members))
                list.append(
                    BenchBackend(
                        kind: .backend(backend), device: members.map(\.description).joined(separator: " + "),
                        expectedGFLOPS: nil))
            }
        }
        return list
    }

    private static func openCL(device index: Int, roofline: Roofline) -> BenchBackend {
        let backend = OpenCLBackend(device: index)
        let info = backend.device?.info
        return BenchBackend(
            kind: .backend(backend), device: info.map { "\($0.name) [\($0.type)]" } ?? "none",
            expectedGFLOPS: info?.isCPU == true ? 0.3 * roofline.sgemmGFLOPS : nil)
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

    /// How the operands of every cell are stored and laid out.
    var storage = StorageTypes.f32
    var layout = OperandLayout.bhsd
    /// Also measure the peak memory of a second call (`warmPeakExtraBytes`): without the one-time
    /// costs of the first (OpenCL program builds, worker threads, first-touch of library state).
    var measureMemoryWhenWarm = false

    /// One shape's operands: the problem (with its storage types), the inputs as rounded to those
    /// types (for the error against the reference), and the laid-out memory the calls use.
    struct Inputs {
        let problem: AttentionProblem
        let rounded: (Tensor, Tensor, Tensor)
        let memory: OperandMemory
        let buffers: AttentionBuffers
    }

    /// Every backend on one shape: a row each, skipped ones with the reason.
    func run(_ shape: ShapeSpec, on entries: [BenchBackend]) -> [BenchRow] {
        var rows = entries.map { entry in
            BenchRow(
                shape: shape.name, shapeSummary: shape.summary, storage: storage.description,
                layout: layout.description, backend: entry.family, device: entry.device,
                repetitions: 0, dispatcherPick: "", backendName: entry.label)
        }
        let problem: AttentionProblem
        do {
            problem = try shape.problem(storage: storage)
            guard layout.fits(try VerificationCase(shape), storage) else {
                throw CLIError("layout \(layout) needs Nq = Nk and one storage type for Q and K/V")
            }
        } catch {
            for index in rows.indices { rows[index].skipped = "\(error)" }
            return rows
        }
        let active = admit(problem, entries, &rows)
        guard !active.isEmpty else { return rows }
        let inputs: Inputs
        do {
            inputs = try makeInputs(shape, problem)
        } catch {
            for index in active { rows[index].skipped = "failed: \(error)" }
            return rows
        }
        defer { inputs.memory.deallocate() }
        let running = firstCalls(inputs, entries, active, &rows)
        let times = timedRounds(inputs, entries, running, &rows)
        for index in running where rows[index].skipped == nil {
            record(times[index] ?? [], problem, shape, into: &rows[index])
        }
        return rows
    }

    private func makeInputs(_ shape: ShapeSpec, _ problem: AttentionProblem) throws -> Inputs {
        let (q, k, v) = try shape.inputs()
        let rounded = (
            try q.rounded(to: storage.query), try k.rounded(to: storage.keyValue), try v.rounded(to: storage.keyValue)
        )
        let memory = try OperandMemory(problem, layout: layout, q: rounded.0, k: rounded.1, v: rounded.2)
        return Inputs(problem: problem, rounded: rounded, memory: memory, buffers: memory.buffers(logSumExp: nil))
    }

    /// The dispatcher's pick, skip reasons and kernel notes; the indices of the entries that run.
    private func admit(_ problem: AttentionProblem, _ entries: [BenchBackend], _ rows: inout [BenchRow]) -> [Int] {
        let pick = (try? BackendSelection.select(.auto, for: problem).backend.name) ?? "none"
        var active: [Int] = []
        for (index, entry) in entries.enumerated() {
            rows[index].dispatcherPick = pick
            if let reason = skipReason(problem, entry) {
                rows[index].skipped = reason
            } else {
                rows[index].kernel = entry.path(for: problem)
                active.append(index)
            }
        }
        return active
    }

    /// Per entry: one measured call (peak memory, error against the reference of sampled rows),
    /// then warm-up. Returns the entries that ran.
    private func firstCalls(
        _ inputs: Inputs, _ entries: [BenchBackend], _ active: [Int], _ rows: inout [BenchRow]
    ) -> [Int] {
        let problem = inputs.problem
        var running: [Int] = []
        for index in active {
            let entry = entries[index]
            do {
                rows[index].peakExtraBytes = try PeakMemory.measure { try entry.forward(problem, inputs.buffers) }
                if measureMemoryWhenWarm {
                    rows[index].warmPeakExtraBytes = try PeakMemory.measure {
                        try entry.forward(problem, inputs.buffers)
                    }
                }
                let output = try Tensor(shape: problem.outputShape, storage: inputs.memory.readOutput())
                let lse = try Tensor(shape: problem.lseShape)
                let (q, k, v) = inputs.rounded
                let error = AccuracyReport.sampled(
                    problem, query: q, key: k, value: v, result: AttentionResult(output: output, logSumExp: lse),
                    outputType: storage.output)
                rows[index].maxAbsError = error.maxAbsError
                rows[index].maxRelError = error.maxRelError
                rows[index].nmse = error.nmse
                rows[index].errorRowsChecked = error.rowsChecked
                rows[index].withinTolerance = error.violations == 0
                _ = try timeCalls(repetitions: 0, budget: 0) { try entry.forward(problem, inputs.buffers) }
                running.append(index)
            } catch {
                rows[index].skipped = "failed: \(error)"
            }
        }
        return running
    }

    /// Round-robin timed calls until each entry has `repetitions` or has spent its budget.
    private func timedRounds(
        _ inputs: Inputs, _ entries: [BenchBackend], _ running: [Int], _ rows: inout [BenchRow]
    ) -> [Int: [Double]] {
        var times: [Int: [Double]] = [:]
        var spent: [Int: Double] = [:]
        for round in 0..<repetitions {
            for index in running where rows[index].skipped == nil {
                let last = times[index]?.last ?? 0
                guard round == 0 || (spent[index] ?? 0) + last <= cellBudget else { continue }
                let start = DispatchTime.now().uptimeNanoseconds
                do {
                    try entries[index].forward(inputs.problem, inputs.buffers)
                } catch {
                    rows[index].skipped = "failed: \(error)"
                    continue
                }
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                times[index, default: []].append(seconds)
                spent[index, default: 0] += seconds
            }
        }
        return times
    }

    /// Median, spread and the roofline ratios of one row.
    private func record(_ times: [Double], _ problem: AttentionProblem, _ shape: ShapeSpec, into row: inout BenchRow) {
        let sorted = times.sorted()
        guard !sorted.isEmpty else { return }
        let median = sorted[sorted.count / 2]
        row.repetitions = sorted.count
        row.medianSeconds = median
        row.minSeconds = sorted.first
        row.maxSeconds = sorted.last
        row.gflops = problem.flops / median / 1e9
        row.rooflineFraction = row.gflops.map { $0 / roofline.sgemmGFLOPS }
        if shape.regime == .decodeLike {
            row.keyValueGBps = problem.keyValueBytes / median / 1e9
            row.bandwidthFraction = row.keyValueGBps.map { $0 / roofline.memoryReadGBps }
        }
    }

    /// Why a backend does not run this shape (unsupported, memory, time budget), or nil.
    private func skipReason(_ problem: AttentionProblem, _ entry: BenchBackend) -> String? {
        if case .unsupported(let reason) = entry.support(for: problem) { return reason }
        let inputBytes =
            4
            * (problem.queryShape.reduce(1, *) + problem.keyShape.reduce(1, *) + problem.valueShape.reduce(1, *)
                + problem.outputShape.reduce(1, *))
        let physical = Int(ProcessInfo.processInfo.physicalMemory)
        if inputBytes > physical / 2 {
            return
                "needs \(inputBytes >> 20) MiB of host memory, more than half of this machine's \(physical >> 20) MiB"
        }
        if let expected = entry.expectedGFLOPS {
            let estimate = problem.flops / (expected * 1e9)
            let cap = entry.maxRunSeconds.map { min($0, maxRunSeconds) } ?? maxRunSeconds
            if estimate > cap { return "estimated \(format(estimate)) s per run exceeds the \(format(cap)) s budget" }
        }
        return nil
    }
}
