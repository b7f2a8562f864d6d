import ArgumentParser
import AttentionKit
import Dispatch
import Foundation

/// The main job: devices, roofline, a quick verification, the standard benchmark, one table,
/// and a JSON report, a CSV and an SVG plot in a results folder.
struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "Check and time every backend on every device (the default command).",
        discussion:
            "Writes report.json, results.csv and throughput.svg to the results folder it names (default: "
            + "results/<date-time>)."
    )

    @OptionGroup var options: BenchOptions
    @Option(help: "Results folder (created).") var out: String?
    @Flag(help: "Skip the quick verification.") var noVerify = false

    func run() throws {
        let started = DispatchTime.now().uptimeNanoseconds
        let folder = out ?? "results/" + Self.timestamp()
        do {
            try FileManager.default.createDirectory(atPath: folder, withIntermediateDirectories: true)
        } catch {
            throw CLIError("\(folder): cannot create the results folder: \((error as NSError).localizedDescription)")
        }
        let devices = OpenCLRuntime.availableDevices.map {
            "\(BackendID.opencl(device: $0.info.index)) \($0.info.name) [\($0.info.type)]"
        }
        printError(
            "attnbench: CPU \(CPUInfo.modelName ?? "unknown") (\(CPUInfo.logicalCores) cores, "
                + "\(CPUInfo.simdExtensions.joined(separator: "/")), kernels \(CPUInfo.kernelDescription), "
                + "OpenBLAS core \(CPUInfo.openBLASCore))"
        )
        if case .failure(let reason) = OpenCLRuntime.devices {
            printError("attnbench: OpenCL unavailable: \(reason)")
        } else {
            printError("attnbench: OpenCL devices: \(devices.joined(separator: "; "))")
        }
        printError("attnbench: measuring the roofline (SGEMM, memory bandwidth)...")
        let roofline = Roofline.measure()

        var verification: VerifyReport?
        if !noVerify {
            printError("attnbench: quick verification against the float64 reference...")
            verification = try runVerification(quick: true, seed: 7)
        }
        printError("attnbench: benchmarking...")
        let shapes = try options.shapeSpecs()
        let backends = try BenchBackend.all(
            names: options.backendNames(default: ["naive", "blas", "opencl"]), devices: try options.deviceIndices(),
            roofline: roofline)
        var rows = runBench(shapes: shapes, backends: backends, options: options, roofline: roofline)
        // Inference keeps K/V caches in fp16: the decode shapes again with fp16 K/V.
        let decodeShapes = shapes.filter { $0.regime == .decodeLike }
        if options.storage.keyValue == .f32, !decodeShapes.isEmpty {
            var fp16 = options.storage
            fp16.keyValue = .f16
            rows += runBench(
                shapes: decodeShapes, backends: backends, options: options, roofline: roofline, storage: fp16)
        }

        rows += runServingBench(options.servingShapes(), backends: backends, options: options, roofline: roofline)

        if let verification { print(renderVerification(verification) + "\n") }
        print(renderTable(rows, roofline: roofline))
        let report = BenchReport(machine: .current(roofline), results: rows, verification: verification)
        try writeJSON(report, to: folder + "/report.json")
        try writeCSV(rows, to: folder + "/results.csv")
        try writeText(svgPlot(rows, roofline: roofline), to: folder + "/throughput.svg")
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        print("\nResults written to \(folder)/ (report.json, results.csv, throughput.svg) in \(format(seconds)) s.")
        if let verification, !verification.passed {
            throw CLIError(
                "verification failed: \(verification.failures) of \(verification.cells.count) cells (see "
                    + "\(folder)/report.json)"
            )
        }
    }

    static func timestamp() -> String {
        let formatter = DateFormatter()
        formatter.dateFormat = "yyyyMMdd-HHmmss"
        formatter.locale = Locale(identifier: "en_US_POSIX")
        return formatter.string(from: Date())
    }
}
