import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TextTable

/// One verified cell: a problem on a backend, with its errors and which checks failed.
struct VerifyCell: Codable {
    var backend: String
    var device: String
    var problem: String
    var maxAbsError: Double
    var maxRelError: Double
    var nmse: Double
    var failures: [String]
}

struct VerifyReport: Codable {
    var cells: [VerifyCell]
    var passed: Bool
    var failures: Int
}

/// The parity matrix: every backend on every device against the float64 reference.
struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check every backend on every device against the float64 reference.",
        discussion: """
            A grid of shapes and features (odd sizes, GQA/MQA, Nq != Nk, causal, window, bool and float masks with \
            fully masked rows, softcap, custom scale, large logits) plus seeded random problems. Each cell checks the \
            tolerance |o - ref| <= 3e-4 + 2e-5 |ref| and the log-sum-exp, NaN where the reference has none, that \
            inputs \
            padded with NaN past their end give bitwise the same output (no out-of-bounds reads), and that two runs \
            are bitwise equal. Then every layout (bhsd, bshd, capacity-padded cache views, packed QKV views) \
            with seven fp32/fp16/bf16 combinations of Q, K/V and O, against the reference of the rounded \
            inputs (fp16/bf16 outputs allow one rounding of their type). Exits non-zero on any failure.
            """
    )

    @Flag(help: "A smaller grid (seconds instead of a minute).") var quick = false
    @Option(help: "Write the cells as JSON to this file.") var json: String?
    @Option(help: "Seed of the random problems.") var seed: UInt64 = 7

    func run() throws {
        let report = try runVerification(quick: quick, seed: seed)
        print(renderVerification(report))
        if let json { try writeJSON(report, to: json) }
        if !report.passed { throw CLIError("verification failed: \(report.failures) of \(report.cells.count) cells") }
    }
}

/// Every backend `verify` checks: naive, BLAS, and every OpenCL device twice (as chosen, and with
/// split-KV disabled so that both OpenCL kernels are verified), CPU devices a third time with the
/// GPU-shaped kernels.
func verificationBackends() -> [(backend: any AttentionBackend, device: String)] {
    var backends: [(any AttentionBackend, String)] = [(NaiveBackend(), "CPU"), (BLASBackend(), "CPU")]
    for index in OpenCLRuntime.availableDevices.indices {
        let backend = OpenCLBackend(device: index)
        let name = backend.device?.info.name ?? "device \(index)"
        backends.append((backend, name))
        backends.append((OpenCLBackend(device: index, allowSplitKV: false), name + " (flash only)"))
        if backend.device?.info.isGPU == false {
            // The GPU kernels, shaped as on a typical NVIDIA GPU, checked here too.
            backends.append((backend.gpuShaped(as: "NVIDIA"), name + " (GPU-shaped, NVIDIA tiles)"))
        }
    }
    return backends
}

func runVerification(quick: Bool, seed: UInt64) throws -> VerifyReport {
    let cases = try VerificationGrid.cases(quick: quick, seed: seed)
    let backends = verificationBackends()
    let layoutSteps = OperandLayout.allCases.count
    let progress = Progress(total: cases.count + layoutSteps)
    var cells: [VerifyCell] = []
    for vc in cases {
        let problem = try vc.problem()
        let (q, k, v) = try vc.inputs()
        let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
        for (backend, device) in backends {
            let check = VerificationCheck(backend, problem, query: q, key: k, value: v, reference: reference)
            cells.append(
                VerifyCell(
                    backend: backend.name, device: device, problem: vc.label, maxAbsError: check.report.maxAbsError,
                    maxRelError: check.report.maxRelError, nmse: check.report.nmse, failures: check.failures))
        }
        progress.step(vc.label)
    }
    cells += try layoutCells(quick: quick, seed: seed, backends: backends, progress: progress)
    progress.finish()
    let failures = cells.filter { !$0.failures.isEmpty }.count
    return VerifyReport(cells: cells, passed: failures == 0, failures: failures)
}

/// Every backend on every layout x storage combination of a few problems (against the reference of
/// the rounded inputs, with NaN around every operand and a check that nothing outside O is written).
func layoutCells(
    quick: Bool, seed: UInt64, backends: [(backend: any AttentionBackend, device: String)], progress: Progress
) throws -> [VerifyCell] {
    var cells: [VerifyCell] = []
    for layout in OperandLayout.allCases {
        for storage in VerificationGrid.storageCombinations {
            for c in VerificationGrid.layoutCases(quick: quick, seed: seed) where layout.fits(c, storage) {
                for (backend, device) in backends {
                    var cell = VerifyCell(
                        backend: backend.name, device: device, problem: "\(c.label) [\(layout), \(storage)]",
                        maxAbsError: 0, maxRelError: 0, nmse: 0, failures: [])
                    do {
                        let run = try LayoutRun(backend, c, layout: layout, storage: storage)
                        (cell.maxAbsError, cell.maxRelError, cell.nmse) = (
                            run.report.maxAbsError, run.report.maxRelError, run.report.nmse
                        )
                        if run.report.violations > 0 {
                            cell.failures.append("tolerance: \(run.report.violations) elements")
                        }
                        if run.report.lseViolations > 0 {
                            cell.failures.append("log-sum-exp: \(run.report.lseViolations) rows")
                        }
                        if !run.outputPaddingIntact { cell.failures.append("wrote outside the output view") }
                    } catch {
                        cell.failures.append("error: \(error)")
                    }
                    cells.append(cell)
                }
            }
        }
        progress.step("layout \(layout) x \(VerificationGrid.storageCombinations.count) storage combinations")
    }
    return cells
}

func renderVerification(_ report: VerifyReport) -> String {
    struct Line { var backend, device, cells, worstAbs, worstNMSE, result: String }
    var order: [String] = []
    var groups: [String: [VerifyCell]] = [:]
    for cell in report.cells {
        let key = cell.backend + "|" + cell.device
        if groups[key] == nil { order.append(key) }
        groups[key, default: []].append(cell)
    }
    let lines = order.map { key -> Line in
        let cells = groups[key]!
        let failed = cells.filter { !$0.failures.isEmpty }
        return Line(
            backend: cells[0].backend, device: cells[0].device, cells: "\(cells.count)",
            worstAbs: format(cells.map(\.maxAbsError).max() ?? 0), worstNMSE: format(cells.map(\.nmse).max() ?? 0),
            result: failed.isEmpty
                ? "pass"
                : "FAIL: "
                    + failed.prefix(3).map { "\($0.problem): \($0.failures.joined(separator: "; "))" }.joined(
                        separator: " | "))
    }
    let table = TextTable<Line> {
        [
            Column(title: "backend", value: $0.backend), Column(title: "device", value: $0.device),
            Column(title: "problems", value: $0.cells, align: .right),
            Column(title: "worst max abs err", value: $0.worstAbs, align: .right),
            Column(title: "worst NMSE", value: $0.worstNMSE, align: .right), Column(title: "result", value: $0.result),
        ]
    }
    return
        "Verification against the float64 reference (tolerance 3e-4 + 2e-5|ref|, LSE, NaN, NaN-padding, determinism):\n"
        + (table.string(for: lines) ?? "")
}
