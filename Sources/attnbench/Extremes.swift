import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TextTable

/// The largest problems the contract promises to handle, checked: correct on sampled rows, and the
/// memory a call adds stays within a stated bound (no Nq x Nk buffer, no copy of the K/V cache).
struct Extremes: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the extreme problems (1M-key fp16 decode, 64k causal prefill) and check them.",
        discussion:
            "Each problem runs once on BLAS and on every OpenCL device: the float64 reference checks sampled "
            + "rows (fp16 K/V: the reference of the rounded values), and the peak resident memory a call "
            + "adds (free heap trimmed, VmHWM reset, VmHWM after minus VmRSS before) must not exceed the bound: "
            + "the backend's own workspaceBytes(for:) plus \(Self.allowanceMiB) MiB (worker thread stacks, "
            + "OpenBLAS and driver state, page rounding). The bound is checked on the second call; the first "
            + "is reported too, and includes one-time costs (an OpenCL program build: up to ~200 MiB when "
            + "PoCL compiles from scratch). Exits non-zero when a check fails or a backend cannot run a problem.")

    /// Slack over `workspaceBytes(for:)` for what a call touches that is not the backend's own
    /// buffers: worker thread stacks, OpenBLAS and PoCL state, page rounding.
    static let allowanceMiB = 16

    static let problems: [(spec: String, storage: StorageTypes)] = [
        ("decode-1m:b=1,hq=8,hkv=2,nq=1,nk=1048576,d=128", StorageTypes(query: .f32, keyValue: .f16, output: .f32)),
        ("causal-64k:b=1,hq=1,nq=65536,d=64,causal", .f32),
    ]

    @Option(
        parsing: .upToNextOption,
        help: ArgumentHelp("Backends, as separate words: blas, opencl, opencl:N.", valueName: "backend"))
    var backend: [String] = ["blas", "opencl"]

    func run() throws {
        printError("measuring the roofline (SGEMM, memory bandwidth)...")
        let roofline = Roofline.measure()
        let backends = try BenchBackend.all(names: listValues(backend), devices: nil, roofline: roofline)
        var options = try BenchOptions.parse(["--repeat", "1", "--max-run-seconds", "900", "--cell-budget", "1"])
        options.repetitions = 1
        var lines: [[String]] = []
        var failures: [String] = []
        for (spec, storage) in Self.problems {
            let shape = try ShapeSpec.parse(spec)
            let problem = try shape.problem(storage: storage)
            for row in runBench(
                shapes: [shape], backends: backends, options: options, roofline: roofline, storage: storage,
                measureMemoryWhenWarm: true)
            {
                let entry = backends.first { $0.label == row.backendName }
                var workspace = 0
                if case .backend(let b)? = entry?.kind { workspace = b.workspaceBytes(for: problem) }
                let bound = workspace + Self.allowanceMiB << 20
                var verdict = "ok"
                if let skipped = row.skipped {
                    verdict = "FAIL: \(skipped)"
                } else if row.withinTolerance != true {
                    verdict = "FAIL: error beyond tolerance"
                } else if (row.warmPeakExtraBytes ?? 0) > bound {
                    verdict = "FAIL: extra memory over the bound"
                } else if row.warmPeakExtraBytes == nil {
                    verdict = "ok (peak memory not measurable here)"
                }
                if verdict.hasPrefix("FAIL") { failures.append("\(row.label) on \(row.backendName): \(verdict)") }
                func mib(_ bytes: Int?) -> String { bytes.map { format(Double($0) / Double(1 << 20)) } ?? "-" }
                lines.append([
                    row.label, row.backendName, row.kernel ?? "", row.medianSeconds.map { format($0 * 1e3) } ?? "-",
                    row.errorRowsChecked.map(String.init) ?? "-",
                    row.maxAbsError.map { String(format: "%.2e", $0) } ?? "-",
                    mib(row.peakExtraBytes), mib(row.warmPeakExtraBytes), mib(workspace), mib(bound), verdict,
                ])
            }
        }
        let header = [
            "problem", "backend", "path", "ms", "rows checked", "max abs err", "extra MiB 1st", "extra MiB 2nd",
            "workspace MiB", "bound MiB", "check",
        ]
        let table = TextTable<[String]> { line in
            header.indices.map {
                Column(title: header[$0], value: line[$0], align: (3...9).contains($0) ? .right : .left)
            }
        }
        print(
            "Roofline: OpenBLAS SGEMM \(format(roofline.sgemmGFLOPS)) GFLOP/s (core \(roofline.openBLASCore)), "
                + "memory read \(format(roofline.memoryReadGBps)) GB/s. Bound = workspaceBytes(for:) + "
                + "\(Self.allowanceMiB) MiB.")
        print(table.string(for: lines) ?? "")
        if !failures.isEmpty { throw CLIError("extremes: \(failures.joined(separator: "; "))") }
    }
}
