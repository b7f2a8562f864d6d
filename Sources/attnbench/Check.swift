import ArgumentParser
import AttentionKit
import Dispatch
import Foundation
import TextTable

/// Cross-validates every backend against the float64 reference on generated problems.
struct Check: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check every backend against the float64 reference on generated problems (default).",
        discussion: "Exits non-zero if any backend violates the tolerance |o - ref| <= 3e-4 + 2e-5 |ref|."
    )

    @Option(help: "Seed for the generated inputs.") var seed: UInt64 = 42
    @Option(help: "Worker threads for the CPU backends (default: all cores).") var threads: Int?

    struct Case {
        let name: String
        let q: [Int], k: [Int], v: [Int]
        let options: AttentionOptions
    }

    struct Row {
        let shape: String
        let backend: String
        let milliseconds: String
        let gflops: String
        let maxAbs: String
        let nmse: String
        let verdict: String
    }

    func run() throws {
        let cases = try makeCases()
        var backends: [any AttentionBackend] = [NaiveBackend(), BLASBackend(threads: threads)]
        backends += OpenCLRuntime.availableDevices.indices.map { OpenCLBackend(device: $0) }
        if case let .failure(reason) = OpenCLRuntime.devices { printError("OpenCL backend skipped: \(reason)") }
        printError("attnbench check: \(cases.count) problems x \(backends.count) backends, CPU: "
            + "\(CPUInfo.modelName ?? "unknown") (\(CPUInfo.logicalCores) cores, \(CPUInfo.simdExtensions.joined(separator: "/"))), "
            + "OpenBLAS core \(CPUInfo.openBLASCore)")
        var rows: [Row] = []
        var failures = 0
        for (index, c) in cases.enumerated() {
            let problem = try AttentionProblem(query: c.q, key: c.k, value: c.v, options: c.options)
            let q = try Tensor.random(shape: c.q, seed: seed &+ UInt64(3 * index))
            let k = try Tensor.random(shape: c.k, seed: seed &+ UInt64(3 * index + 1))
            let v = try Tensor.random(shape: c.v, seed: seed &+ UInt64(3 * index + 2))
            let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
            for backend in backends {
                let result = try backend.attention(problem, query: q, key: k, value: v)
                let seconds = try measure(repetitions: 3, warmUp: 0.05) {
                    _ = try backend.attention(problem, query: q, key: k, value: v)
                }[1]
                let report = AccuracyReport(result: result, reference: reference, valueDim: problem.valueDim)
                if !report.passed { failures += 1 }
                rows.append(Row(
                    shape: c.name, backend: backend.name, milliseconds: format(seconds * 1e3),
                    gflops: format(problem.flops / seconds / 1e9), maxAbs: format(report.maxAbsError),
                    nmse: format(report.nmse), verdict: report.passed ? "ok" : "FAIL: \(report)"))
            }
        }
        let table = TextTable<Row> {
            [Column(title: "problem", value: $0.shape), Column(title: "backend", value: $0.backend),
             Column(title: "ms", value: $0.milliseconds, align: .right),
             Column(title: "GFLOP/s", value: $0.gflops, align: .right),
             Column(title: "max abs err", value: $0.maxAbs, align: .right),
             Column(title: "NMSE", value: $0.nmse, align: .right), Column(title: "check", value: $0.verdict)]
        }
        print(table.string(for: rows) ?? "")
        if failures > 0 { throw CLIError("\(failures) backend/problem pairs exceed the tolerance") }
    }

    private func makeCases() throws -> [Case] {
        let mask = try AttentionMask(
            shape: [1, 1, 100, 300],
            allowed: (0..<30_000).map { ($0 * 7919) % 5 != 0 })
        return [
            Case(name: "small-128 B4 H8 N128 D64", q: [4, 8, 128, 64], k: [4, 8, 128, 64], v: [4, 8, 128, 64], options: .init()),
            Case(name: "prefill-512 B1 H8 N512 D64", q: [1, 8, 512, 64], k: [1, 8, 512, 64], v: [1, 8, 512, 64], options: .init()),
            Case(name: "gqa-causal Hq8/Hkv2 N333 D80", q: [1, 8, 333, 80], k: [1, 2, 333, 80], v: [1, 2, 333, 80],
                 options: .init(causal: true)),
            Case(name: "decode-4k Hq32/Hkv8 Nq1 D128", q: [1, 32, 1, 128], k: [1, 8, 4096, 128], v: [1, 8, 4096, 128],
                 options: .init()),
            Case(name: "window+mask+softcap Dv32", q: [2, 4, 100, 64], k: [2, 4, 300, 64], v: [2, 4, 300, 32],
                 options: .init(softcap: 30, causal: true, window: .init(left: 64, right: 0), mask: mask)),
        ]
    }
}
