import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TextTable

/// Options shared by `bench` and the default report.
struct BenchOptions: ParsableArguments {
    @Option(
        parsing: .upToNextOption,
        help: ArgumentHelp(
            "Shapes, as separate words: standard names (serve-decode and serve-prefill: batches of sequences, "
                + "each with its padded equivalent) or NAME:b=1,hq=8,nq=1000,d=64[,hkv=..,nk=..,dv=..,causal].",
            valueName: "shape"))
    var shapes: [String] = ShapeSpec.standard.map(\.name) + ServingShape.allCases.map(\.rawValue)
    @Option(
        parsing: .upToNextOption,
        help: ArgumentHelp(
            "Backends, as separate words: all (naive, blas, every OpenCL device, and an auto row per shape) or "
                + "some of naive, blas, opencl, opencl:N, auto. Default: all for bench, naive blas opencl for "
                + "the report.",
            valueName: "backend"))
    var backend: [String] = []
    @Option(
        parsing: .upToNextOption, help: ArgumentHelp("OpenCL device indices (default: every device).", valueName: "N"))
    var device: [String] = []
    @Option(help: "Storage of Q, K, V and O for every shape: f32, f16 or bf16.") var dtype: StorageType?
    @Option(help: "Storage of K and V for every shape (overrides --dtype for them).") var kvDtype: StorageType?
    @Option(
        help: ArgumentHelp(
            "Operand layout for every shape: bhsd, bshd, cacheView (K/V as the first Nk rows of a larger cache), "
                + "packedQKV (Q, K, V as views of one fused buffer; Nq = Nk shapes)."))
    var layout: OperandLayout = .bhsd
    @Option(
        name: .customLong("repeat"),
        help: "Timed repetitions per cell (fewer when a cell would exceed its time budget).")
    var repetitions: Int = 5
    @Option(help: "BLAS prefill products: automatic, sgemm (OpenBLAS) or tiled (the CPU kernels' own).")
    var products: BLASProducts = .automatic
    @Option(help: "Seconds of timed runs per cell at most (at least one run is made).") var cellBudget: Double = 2
    @Option(help: "Skip a cell whose single run is estimated to exceed this many seconds.") var maxRunSeconds: Double =
        20

    func validate() throws {
        if repetitions < 1 { throw ValidationError("--repeat must be >= 1") }
        if cellBudget <= 0 || maxRunSeconds <= 0 { throw ValidationError("budgets must be > 0") }
    }

    /// The storage types every cell uses.
    var storage: StorageTypes {
        StorageTypes(query: dtype ?? .f32, keyValue: kvDtype ?? dtype ?? .f32, output: dtype ?? .f32)
    }

    func shapeSpecs() throws -> [ShapeSpec] {
        try listValues(shapes).filter { ServingShape(rawValue: $0) == nil }.map(ShapeSpec.parse)
    }

    /// The serving shapes asked for.
    func servingShapes() -> [ServingShape] { listValues(shapes).compactMap(ServingShape.init(rawValue:)) }

    /// The backends asked for, or `fallback` when none were.
    func backendNames(default fallback: [String]) -> [String] {
        let names = listValues(backend)
        return names.isEmpty ? fallback : names
    }

    /// The OpenCL device indices asked for, or nil for every device.
    func deviceIndices() throws -> [Int]? {
        let words = listValues(device)
        guard !words.isEmpty else { return nil }
        return try words.map { word in
            guard let index = Int(word), index >= 0 else { throw CLIError("--device: '\(word)' is not a device index") }
            return index
        }
    }
}

/// Times backends on shapes and writes the results.
struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmark backends on the standard (or given) shapes.",
        discussion:
            "Every cell: warm-up, timed repetitions, median and spread, GFLOP/s against the SGEMM roofline "
            + "measured in the same run, K/V GB/s against memory bandwidth for decode shapes, peak extra "
            + "memory, max error against the float64 reference of sampled rows."
    )

    @OptionGroup var options: BenchOptions
    @Option(help: "Write the rows as JSON to this file.") var json: String?
    @Option(help: "Write the rows as CSV to this file.") var csv: String?
    @Option(help: "Write a GFLOP/s vs sequence length plot (SVG) to this file.") var plot: String?

    func run() throws {
        let shapes = try options.shapeSpecs()
        printError("measuring the roofline (SGEMM, memory bandwidth)...")
        let roofline = Roofline.measure()
        let backends = try BenchBackend.all(
            names: options.backendNames(default: ["all"]), devices: try options.deviceIndices(), roofline: roofline,
            products: options.products)
        var rows = runBench(shapes: shapes, backends: backends, options: options, roofline: roofline)
        rows += runServingBench(options.servingShapes(), backends: backends, options: options, roofline: roofline)
        print(renderTable(rows, roofline: roofline))
        if let json {
            try writeJSON(BenchReport(machine: .current(roofline), results: rows, verification: nil), to: json)
        }
        if let csv { try writeCSV(rows, to: csv) }
        if let plot { try writeText(svgPlot(rows, roofline: roofline), to: plot) }
    }
}

func runBench(
    shapes: [ShapeSpec], backends: [BenchBackend], options: BenchOptions, roofline: Roofline,
    storage: StorageTypes? = nil, measureMemoryWhenWarm: Bool = false
) -> [BenchRow] {
    var engine = BenchEngine(
        repetitions: options.repetitions, cellBudget: options.cellBudget,
        maxRunSeconds: options.maxRunSeconds, roofline: roofline)
    engine.storage = storage ?? options.storage
    engine.layout = options.layout
    engine.measureMemoryWhenWarm = measureMemoryWhenWarm
    let progress = Progress(total: shapes.count)
    var rows: [BenchRow] = []
    for shape in shapes {
        let shapeRows = engine.run(shape, on: backends)
        let summary = shapeRows.map { row in
            "\(row.backendName) " + (row.skipped != nil ? "skipped" : "\(format((row.medianSeconds ?? 0) * 1e3)) ms")
        }.joined(separator: ", ")
        progress.step("\(shapeRows.first?.label ?? shape.name): \(summary)")
        rows += shapeRows
    }
    progress.finish()
    return rows
}

/// The serving shapes, each form on every backend (see `ServingBench`).
func runServingBench(
    _ shapes: [ServingShape], backends: [BenchBackend], options: BenchOptions, roofline: Roofline
) -> [BenchRow] {
    let bench = ServingBench(repetitions: options.repetitions, cellBudget: options.cellBudget, roofline: roofline)
    var rows: [BenchRow] = []
    for shape in shapes {
        let shapeRows = bench.run(shape, storage: options.storage, backends: backends)
        let summary = shapeRows.map { row in
            "\(row.shape) \(row.backendName) "
                + (row.skipped != nil ? "skipped" : "\(format((row.medianSeconds ?? 0) * 1e3)) ms")
        }.joined(separator: ", ")
        printError("  \(shape.rawValue): \(summary)")
        rows += shapeRows
    }
    return rows
}

/// The machine a report was measured on.
struct MachineReport: Codable {
    var cpu: String
    var logicalCores: Int
    var simd: [String]
    /// The CPU kernel variant in use.
    var cpuKernels: String
    var roofline: Roofline
    var opencl: [OpenCLDeviceInfo]
    var openclUnavailable: String?
    var date: String

    static func current(_ roofline: Roofline) -> MachineReport {
        var unavailable: String?
        if case .failure(let reason) = OpenCLRuntime.devices { unavailable = reason.reason }
        return MachineReport(
            cpu: CPUInfo.modelName ?? "unknown", logicalCores: CPUInfo.logicalCores, simd: CPUInfo.simdExtensions,
            cpuKernels: CPUInfo.kernelDescription, roofline: roofline,
            opencl: OpenCLRuntime.availableDevices.map(\.info), openclUnavailable: unavailable,
            date: ISO8601DateFormatter().string(from: Date()))
    }
}

struct BenchReport: Codable {
    var machine: MachineReport
    var results: [BenchRow]
    var verification: VerifyReport?
}

func renderTable(_ rows: [BenchRow], roofline: Roofline) -> String {
    struct Line {
        var shape, backend, ms, gflops, roof, gbps, error, memory, pick, note: String
    }
    let lines = rows.map { r -> Line in
        let ms =
            r.medianSeconds.map {
                format($0 * 1e3)
                    + (r.repetitions > 1 ? " ±\(format(((r.maxSeconds ?? 0) - (r.minSeconds ?? 0)) * 500))" : "")
            } ?? "-"
        return Line(
            shape: r.label, backend: r.backendName, ms: ms, gflops: r.gflops.map(format) ?? "-",
            roof: r.rooflineFraction.map { format($0) } ?? "-",
            gbps: r.keyValueGBps.map { "\(format($0)) (\(format(r.bandwidthFraction ?? 0)))" } ?? "",
            error: r.maxAbsError.map { format($0) + (r.withinTolerance == false ? " FAIL" : "") } ?? "-",
            memory: r.peakExtraBytes.map { format(Double($0) / Double(1 << 20)) } ?? "-",
            pick: r.skipped == nil && r.dispatcherPick == r.backendName ? "*" : "",
            note: r.skipped.map { "skipped: " + ($0.count > 70 ? $0.prefix(67) + "..." : $0) } ?? (r.kernel ?? ""))
    }
    let table = TextTable<Line> {
        [
            Column(title: "shape", value: $0.shape), Column(title: "backend/device", value: $0.backend),
            Column(title: "median ms", value: $0.ms, align: .right),
            Column(title: "GFLOP/s", value: $0.gflops, align: .right),
            Column(title: "x SGEMM", value: $0.roof, align: .right),
            Column(title: "K/V GB/s (x bw)", value: $0.gbps, align: .right),
            Column(title: "max abs err", value: $0.error, align: .right),
            Column(title: "extra MiB", value: $0.memory, align: .right),
            Column(title: "auto", value: $0.pick),
            Column(title: "note", value: $0.note),
        ]
    }
    let header =
        "Roofline measured in this run: OpenBLAS SGEMM \(format(roofline.sgemmGFLOPS)) GFLOP/s (core "
        + "\(roofline.openBLASCore)"
        + (roofline.openBLASCoreTypeOverride.map { ", forced by OPENBLAS_CORETYPE=\($0)" } ?? "")
        + "), memory read \(format(roofline.memoryReadGBps)) GB/s. auto: * marks the dispatcher's pick; extra "
        + "MiB: peak resident memory added by a call."
    var devices: [String] = []
    for r in rows where r.backend == "opencl" && !devices.contains("\(r.backendName) = \(r.device)") {
        devices.append("\(r.backendName) = \(r.device)")
    }
    let legend = devices.isEmpty ? "" : "\n" + devices.joined(separator: "; ")
    return header + legend + "\n" + (table.string(for: lines) ?? "")
}
