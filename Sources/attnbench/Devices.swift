import ArgumentParser
import AttentionKit
import Foundation

/// Lists the CPU and every OpenCL device with their properties.
struct Devices: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the CPU and every OpenCL device.",
        discussion: "With --measure, also measures the CPU roofline: OpenBLAS SGEMM GFLOP/s and memory read GB/s."
    )

    @Flag(help: "Print JSON instead of text.") var json = false
    @Flag(help: "Measure SGEMM GFLOP/s and memory read bandwidth (a few seconds).") var measure = false

    struct CPUReport: Codable {
        var model: String
        var logicalCores: Int
        var simd: [String]
        /// The CPU kernel variant in use ("avx512", "avx2+fma", "baseline", "neon"), if usable.
        var kernels: String?
        /// Every variant this machine can run.
        var kernelsSupported: [String]
        /// Why the requested variant cannot be used (ATTENTIONKIT_CPU_ISA naming one this CPU lacks).
        var kernelsError: String?
        var l2CacheBytes: Int
        var openBLASCore: String
        var openBLASThreads: Int
        var openBLASCoreTypeOverride: String?
        var sgemmGFLOPS: Double?
        var memoryReadGBps: Double?
    }

    struct Report: Codable {
        var cpu: CPUReport
        var opencl: [OpenCLDeviceInfo]
        var openclUnavailable: String?
        var dispatcherProfile: MachineProfile
    }

    func run() throws {
        let kernels = CPUISA.resolve(.process)
        var kernelsError: String?
        if case .failure(let error) = kernels { kernelsError = error.description }
        var cpu = CPUReport(
            model: CPUInfo.modelName ?? "unknown", logicalCores: CPUInfo.logicalCores, simd: CPUInfo.simdExtensions,
            kernels: try? kernels.get().description, kernelsSupported: CPUISA.supported.map(\.description),
            kernelsError: kernelsError,
            l2CacheBytes: CPUInfo.l2CacheBytes, openBLASCore: CPUInfo.openBLASCore,
            openBLASThreads: CPUInfo.openBLASThreads,
            openBLASCoreTypeOverride: ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"])
        if measure {
            cpu.sgemmGFLOPS = MachineProbes.measureSGEMM()
            cpu.memoryReadGBps = MachineProbes.measureReadBandwidth()
        }
        var report = Report(cpu: cpu, opencl: [], openclUnavailable: nil, dispatcherProfile: MachineProfile.process)
        switch OpenCLRuntime.devices {
        case .success(let devices): report.opencl = devices.map(\.info)
        case .failure(let reason): report.openclUnavailable = reason.reason
        }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
            return
        }
        print(describe(cpu))
        if let reason = report.openclUnavailable {
            print("OpenCL: unavailable: \(reason)")
        }
        for info in report.opencl { print(describe(info)) }
        let profile = report.dispatcherProfile
        print(
            "Dispatcher profile: \(profile.source)"
                + (profile.source.hasPrefix("measured")
                    ? " (\(MachineProfile.fileURL()?.path ?? ""))" : "; run `attnbench tune` to measure this machine"))
        for b in profile.backends {
            let g64 = b.gflops(headDim: 64, keyLength: 2048)
            let g128 = b.gflops(headDim: 128, keyLength: 2048)
            var line =
                "  \(b.backend): \(format(g64)) GFLOP/s at N=2k D64, \(format(g128)) at D128; decode "
                + "\(format(b.decodeGBps.value(at: 32768))) GB/s; overhead \(format(b.overheadSeconds * 1e6)) us"
            if let products = b.blasProducts { line += "; \(products) products" }
            if let t = b.blasTilings {
                line += "; tilings " + t.map { "D\($0.headDim) \($0.value)" }.joined(separator: ", ")
            }
            if let c = b.openclConfigs {
                line +=
                    "; kernels "
                    + c.map { "D\($0.headDim) vec\($0.value.vectorWidth) rows\($0.value.rows) wg\($0.value.workGroup)" }
                    .joined(separator: ", ")
            }
            print(line)
        }
    }

    private func describe(_ cpu: CPUReport) -> String {
        var lines = [
            "CPU: \(cpu.model)",
            "  cores \(cpu.logicalCores), SIMD \(cpu.simd.joined(separator: " ")), L2 "
                + "\(cpu.l2CacheBytes >> 10) KiB per core",
            "  CPU kernels: " + (cpu.kernels ?? "none (\(cpu.kernelsError ?? "unknown"))")
                + " (this machine runs: \(cpu.kernelsSupported.joined(separator: ", ")); "
                + "\(AttentionConfiguration.cpuISAVariable) forces a narrower one)",
            "  OpenBLAS core \(cpu.openBLASCore)"
                + (cpu.openBLASCoreTypeOverride.map { " (forced by OPENBLAS_CORETYPE=\($0))" } ?? "")
                + ", \(cpu.openBLASThreads) threads",
        ]
        if let sgemm = cpu.sgemmGFLOPS, let bandwidth = cpu.memoryReadGBps {
            lines.append("  roofline: SGEMM \(format(sgemm)) GFLOP/s, memory read \(format(bandwidth)) GB/s")
        }
        return lines.joined(separator: "\n")
    }

    private func describe(_ d: OpenCLDeviceInfo) -> String {
        let gib = { (bytes: UInt64) in format(Double(bytes) / Double(1 << 30)) + " GiB" }
        return """
            OpenCL device \(d.index): \(d.name) [\(d.type)]
              platform \(d.platformName) (\(d.platformVersion)), vendor \(d.vendor)
              driver \(d.driverVersion), \(d.deviceVersion), \(d.openCLCVersion)
              \(d.computeUnits) compute units @ \(d.clockMHz) MHz, global memory \(gib(d.globalMemoryBytes)) (max \
              buffer \(gib(d.maxAllocationBytes))), local memory \(d.localMemoryBytes >> 10) KiB
              max work-group \(d.maxWorkGroupSize), float vector width preferred \(d.preferredFloatVectorWidth) / \
              native \(d.nativeFloatVectorWidth), cl_khr_fp16 \(d.supportsFP16 ? "yes" : "no"), subgroups \
              \(d.supportsSubgroups ? "yes" : "no"), host-unified memory \(d.hostUnifiedMemory ? "yes" : "no")
              kernels (table, D 128): \(OpenCLKernelConfig.default(for: d, headDim: 128, valueDim: 128))
            """
    }
}
