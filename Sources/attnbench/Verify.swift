import ArgumentParser
import AttentionKit
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
        tolerance |o - ref| <= 3e-4 + 2e-5 |ref| and the log-sum-exp, NaN where the reference has none, that inputs \
        padded with NaN past their end give bitwise the same output (no out-of-bounds reads), and that two runs \
        are bitwise equal. Exits non-zero on any failure.
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

/// Problems of the parity matrix.
struct VerifyCase {
    var name: String
    var q: [Int], k: [Int], v: [Int]
    var options: AttentionOptions
    var amplitude: Float = 1
}

func verificationCases(quick: Bool, seed: UInt64) throws -> [VerifyCase] {
    func c(_ name: String, b: Int = 1, hq: Int, hkv: Int, nq: Int, nk: Int, d: Int, dv: Int, _ options: AttentionOptions = .init(), x: Float = 1) -> VerifyCase {
        VerifyCase(name: name, q: [b, hq, nq, d], k: [b, hkv, nk, d], v: [b, hkv, nk, dv], options: options, amplitude: x)
    }
    func boolMask(_ nq: Int, _ nk: Int, seed: UInt64) throws -> AttentionMask {
        var rng = SplitMix64(seed: seed)
        // ~70% visible; every fifth row fully hidden.
        return try AttentionMask(shape: [nq, nk], allowed: (0..<(nq * nk)).map { ($0 / nk) % 5 != 4 && Double.random(in: 0..<1, using: &rng) < 0.7 })
    }
    func floatMask(_ b: Int, _ nq: Int, _ nk: Int, seed: UInt64) throws -> AttentionMask {
        var rng = SplitMix64(seed: seed)
        return try AttentionMask(shape: [b, 1, nq, nk], additive: (0..<(b * nq * nk)).map { _ in
            Double.random(in: 0..<1, using: &rng) < 0.2 ? -.infinity : Float.random(in: -2...2, using: &rng) })
    }
    var cases: [VerifyCase] = [
        c("tiny", hq: 1, hkv: 1, nq: 1, nk: 1, d: 1, dv: 1),
        c("odd", b: 2, hq: 4, hkv: 4, nq: 7, nk: 65, d: 3, dv: 5),
        c("gqa-causal", hq: 8, hkv: 2, nq: 130, nk: 130, d: 80, dv: 80, .init(causal: true)),
        c("mqa-decode", hq: 8, hkv: 1, nq: 1, nk: 777, d: 128, dv: 64, .init(causal: true)),
        c("cross Nq>Nk causal", hq: 4, hkv: 4, nq: 65, nk: 7, d: 32, dv: 32, .init(causal: true)),
        c("sliding window", hq: 4, hkv: 2, nq: 200, nk: 300, d: 64, dv: 48, .init(causal: true, window: .init(left: 37, right: 0))),
        c("two-sided window", hq: 2, hkv: 2, nq: 64, nk: 64, d: 16, dv: 16, .init(window: .init(left: 5, right: 3))),
        c("bool mask", b: 2, hq: 4, hkv: 4, nq: 33, nk: 100, d: 32, dv: 32, .init(mask: try boolMask(33, 100, seed: seed))),
        c("float mask", b: 2, hq: 2, hkv: 1, nq: 40, nk: 90, d: 24, dv: 40, .init(mask: try floatMask(2, 40, 90, seed: seed))),
        c("softcap", hq: 4, hkv: 4, nq: 64, nk: 64, d: 64, dv: 64, .init(softcap: 5), x: 4),
        c("scale", hq: 2, hkv: 2, nq: 50, nk: 70, d: 40, dv: 40, .init(scale: 0.9, causal: true)),
        c("large logits", hq: 4, hkv: 2, nq: 130, nk: 200, d: 64, dv: 64, x: 20),
        c("D 512", hq: 1, hkv: 1, nq: 17, nk: 300, d: 512, dv: 512, .init(causal: true)),
        c("decode long", b: 2, hq: 8, hkv: 2, nq: 1, nk: 3000, d: 128, dv: 128),
    ]
    if !quick {
        cases += [
            c("odd 777", hq: 1, hkv: 1, nq: 777, nk: 777, d: 80, dv: 80, .init(causal: true)),
            c("D 256 Dv 200", hq: 2, hkv: 1, nq: 64, nk: 130, d: 256, dv: 200),
            c("decode 2 tokens", hq: 32, hkv: 8, nq: 2, nk: 4096, d: 128, dv: 128, .init(causal: true)),
            c("softcap window mask", b: 2, hq: 4, hkv: 2, nq: 100, nk: 300, d: 64, dv: 32,
              .init(softcap: 30, causal: true, window: .init(left: 64, right: 0), mask: try boolMask(100, 300, seed: seed + 1))),
        ]
        var rng = SplitMix64(seed: seed)
        for index in 0..<24 {
            let hkv = [1, 2, 4].randomElement(using: &rng)!
            let hq = hkv * [1, 2, 4].randomElement(using: &rng)!
            let nq = [1, 2, 7, 64, 65, 130, 200].randomElement(using: &rng)!
            let nk = [1, 7, 64, 65, 130, 500].randomElement(using: &rng)!
            let d = [1, 3, 32, 64, 80, 128].randomElement(using: &rng)!
            let dv = Bool.random(using: &rng) ? d : [8, 48, 96].randomElement(using: &rng)!
            var options = AttentionOptions(causal: Bool.random(using: &rng))
            if Int.random(in: 0..<3, using: &rng) == 0 { options.window = .init(left: Int.random(in: -1...50, using: &rng), right: Int.random(in: -1...10, using: &rng)) }
            if Int.random(in: 0..<4, using: &rng) == 0 { options.softcap = Float.random(in: 1...30, using: &rng) }
            if Int.random(in: 0..<4, using: &rng) == 0 { options.mask = try boolMask(nq, nk, seed: seed &+ UInt64(index)) }
            cases.append(c("random \(index)", b: Int.random(in: 1...2, using: &rng), hq: hq, hkv: hkv, nq: nq, nk: nk, d: d, dv: dv, options,
                           x: [1, 1, 5, 20].randomElement(using: &rng)!))
        }
    }
    return cases
}

func runVerification(quick: Bool, seed: UInt64) throws -> VerifyReport {
    let cases = try verificationCases(quick: quick, seed: seed)
    var backends: [(any AttentionBackend, String)] = [(NaiveBackend(), "CPU"), (BLASBackend(), "CPU")]
    for index in OpenCLRuntime.availableDevices.indices {
        let backend = OpenCLBackend(device: index)
        backends.append((backend, backend.device?.info.name ?? "device \(index)"))
        // The split-KV path where the table would not choose it, so both OpenCL kernels are verified.
        backends.append((OpenCLBackend(device: index, allowSplitKV: false), (backend.device?.info.name ?? "") + " (flash only)"))
    }
    let progress = Progress(total: cases.count)
    var cells: [VerifyCell] = []
    for (index, vc) in cases.enumerated() {
        let problem = try AttentionProblem(query: vc.q, key: vc.k, value: vc.v, options: vc.options)
        let range = -vc.amplitude...vc.amplitude
        let q = try Tensor.random(shape: vc.q, seed: seed &+ UInt64(3 * index), in: range)
        let k = try Tensor.random(shape: vc.k, seed: seed &+ UInt64(3 * index + 1), in: range)
        let v = try Tensor.random(shape: vc.v, seed: seed &+ UInt64(3 * index + 2))
        let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
        for (backend, device) in backends {
            cells.append(verifyCell(backend, device: device, name: vc.name, problem: problem, q: q, k: k, v: v, reference: reference))
        }
        progress.step(vc.name)
    }
    progress.finish()
    let failures = cells.filter { !$0.failures.isEmpty }.count
    return VerifyReport(cells: cells, passed: failures == 0, failures: failures)
}

func verifyCell(_ backend: any AttentionBackend, device: String, name: String, problem: AttentionProblem,
                q: Tensor, k: Tensor, v: Tensor, reference: (output: [Double], logSumExp: [Double])) -> VerifyCell {
    var cell = VerifyCell(backend: backend.name, device: device, problem: name, maxAbsError: 0, maxRelError: 0, nmse: 0, failures: [])
    do {
        let first = try backend.attention(problem, query: q, key: k, value: v)
        let report = AccuracyReport(result: first, reference: reference, valueDim: problem.valueDim)
        cell.maxAbsError = report.maxAbsError
        cell.maxRelError = report.maxRelError
        cell.nmse = report.nmse
        if report.violations > 0 { cell.failures.append("tolerance: \(report.violations) elements") }
        if report.lseViolations > 0 { cell.failures.append("log-sum-exp: \(report.lseViolations) rows") }
        let second = try backend.attention(problem, query: q, key: k, value: v)
        if second.output.storage.map(\.bitPattern) != first.output.storage.map(\.bitPattern) {
            cell.failures.append("non-deterministic")
        }
        let padded = try runPadded(backend, problem: problem, q: q, k: k, v: v)
        if padded.map(\.bitPattern) != first.output.storage.map(\.bitPattern) {
            cell.failures.append("out-of-bounds: NaN-padded inputs change the output")
        }
    } catch {
        cell.failures.append("error: \(error)")
    }
    return cell
}

/// Runs with every input followed by NaN in memory: a read past the end poisons the output.
func runPadded(_ backend: any AttentionBackend, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor) throws -> [Float] {
    let pad = [Float](repeating: .nan, count: 1024)
    let (qp, kp, vp) = (q.storage + pad, k.storage + pad, v.storage + pad)
    var out = [Float](repeating: .nan, count: problem.outputShape.reduce(1, *) + 1024)
    var lse = [Float](repeating: .nan, count: problem.lseShape.reduce(1, *))
    try qp.withUnsafeBufferPointer { qb in try kp.withUnsafeBufferPointer { kb in try vp.withUnsafeBufferPointer { vb in
        try out.withUnsafeMutableBufferPointer { ob in try lse.withUnsafeMutableBufferPointer { lb in
            try backend.forward(problem, AttentionBuffers(
                query: UnsafeBufferPointer(rebasing: qb[0..<q.count]), key: UnsafeBufferPointer(rebasing: kb[0..<k.count]),
                value: UnsafeBufferPointer(rebasing: vb[0..<v.count]),
                output: UnsafeMutableBufferPointer(rebasing: ob[0..<(ob.count - 1024)]), logSumExp: lb))
        } }
    } } }
    return Array(out.prefix(out.count - 1024))
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
        return Line(backend: cells[0].backend, device: cells[0].device, cells: "\(cells.count)",
                    worstAbs: format(cells.map(\.maxAbsError).max() ?? 0), worstNMSE: format(cells.map(\.nmse).max() ?? 0),
                    result: failed.isEmpty ? "pass" : "FAIL: " + failed.prefix(3).map { "\($0.problem): \($0.failures.joined(separator: "; "))" }.joined(separator: " | "))
    }
    let table = TextTable<Line> {
        [Column(title: "backend", value: $0.backend), Column(title: "device", value: $0.device),
         Column(title: "problems", value: $0.cells, align: .right), Column(title: "worst max abs err", value: $0.worstAbs, align: .right),
         Column(title: "worst NMSE", value: $0.worstNMSE, align: .right), Column(title: "result", value: $0.result)]
    }
    return "Verification against the float64 reference (tolerance 3e-4 + 2e-5|ref|, LSE, NaN, NaN-padding, determinism):\n"
        + (table.string(for: lines) ?? "")
}
