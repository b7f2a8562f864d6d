import AttentionBLAS
import AttentionCore
import AttentionMachine
import AttentionOpenCL
import Foundation

/// The profiles of every backend of this machine, and where they came from.
public struct MachineProfile: Codable, Sendable, Equatable {
    /// What the profile was measured on; a profile for another machine is ignored.
    public var identity: String
    /// "built-in defaults" or "measured by attnbench tune on <date>".
    public var source: String
    public var backends: [BackendProfile]

    public init(identity: String, source: String, backends: [BackendProfile]) {
        self.identity = identity
        self.source = source
        self.backends = backends
    }

    public func profile(for backend: BackendID) -> BackendProfile? { backends.first { $0.backend == backend } }

    /// The machine: CPU model and cores, OpenBLAS core, CPU kernel variant, every OpenCL device and driver.
    public static func identity(configuration: AttentionConfiguration = .process) -> String {
        let kernels: String
        switch CPUISA.resolve(configuration) {
        case .success(let isa): kernels = isa.rawValue
        case .failure: kernels = "none"
        }
        var parts = [
            "cpu=\(CPUInfo.modelName ?? "unknown")", "cores=\(CPUInfo.logicalCores)",
            "openblas=\(CPUInfo.openBLASCore)",
            "kernels=\(kernels)",
        ]
        parts += OpenCLRuntime.availableDevices.map { "opencl=\($0.info.name)|\($0.info.driverVersion)" }
        return parts.joined(separator: ";")
    }

    /// Where `attnbench tune` stores the profile for `configuration` (nil: no cache folder).
    public static func fileURL(configuration: AttentionConfiguration = .process) -> URL? {
        configuration.cacheDirectory?.appendingPathComponent("profile.json")
    }

    /// This process's profile: the stored one when it belongs to this machine, else the built-in
    /// defaults. Read once, from `AttentionConfiguration.process`'s cache folder.
    public static let process = load(configuration: .process)

    /// The profile stored for `configuration` when it was measured on this machine, else the
    /// built-in defaults. A missing, unreadable, foreign or outdated file means defaults.
    public static func load(configuration: AttentionConfiguration) -> MachineProfile {
        let identity = identity(configuration: configuration)
        if let url = fileURL(configuration: configuration), let data = try? Data(contentsOf: url),
            let stored = try? JSONDecoder().decode(MachineProfile.self, from: data), stored.identity == identity
        {
            return stored
        }
        return defaults(configuration: configuration)
    }

    /// Writes the profile where `load(configuration:)` finds it.
    public func save(configuration: AttentionConfiguration = .process) throws(AttentionError) {
        guard let url = Self.fileURL(configuration: configuration) else {
            throw .fileError(
                path: "profile.json",
                reason: "no cache folder (set HOME or \(AttentionConfiguration.cacheDirectoryVariable))")
        }
        do {
            try FileManager.default.createDirectory(
                at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            try encoder.encode(self).write(to: url, options: .atomic)
        } catch {
            throw .fileError(path: url.path, reason: "cannot write the profile: \(error.localizedDescription)")
        }
    }

    // MARK: Built-in defaults

    /// Estimates from device properties alone: CPU peak = cores x clock x FLOPs per cycle of the
    /// CPU kernel variant in use (8 baseline, 32 AVX2+FMA, 64 AVX-512, 16 NEON); GPU peak =
    /// compute units x clock x 128.
    public static func defaults(configuration: AttentionConfiguration = .process) -> MachineProfile {
        let cores = Double(CPUInfo.logicalCores)
        let isa = (try? CPUISA.resolve(configuration).get()) ?? .baseline
        let flopsPerCycle = isa.peakFlopsPerCycle
        let peak = cores * (CPUInfo.clockMHz ?? 2500) / 1000 * flopsPerCycle
        // PoCL compiles its kernels for the host CPU whatever variant AttentionKit's own kernels use.
        let hostPeak = cores * (CPUInfo.clockMHz ?? 2500) / 1000 * CPUISA.best.peakFlopsPerCycle
        let ram = UInt64(ProcessInfo.processInfo.physicalMemory)
        func curve(_ fractions: [(Int, Double)], of top: Double) -> ThroughputCurve {
            ThroughputCurve(fractions.map { ($0.0, $0.1 * top) })
        }
        var list = [
            BackendProfile(
                backend: .naive, device: "CPU", gflops: [.init(headDim: 64, curve: ThroughputCurve([(1, 2.2)]))],
                decodeGBps: ThroughputCurve([(1, 1.1)]), overheadSeconds: 0, memoryBytes: ram),
            BackendProfile(
                backend: .blas, device: "CPU",
                gflops: [
                    .init(headDim: 64, curve: curve([(128, 0.55), (512, 0.65), (4096, 0.62)], of: peak)),
                    .init(headDim: 128, curve: curve([(128, 0.5), (512, 0.62), (4096, 0.62)], of: peak)),
                ],
                decodeGBps: ThroughputCurve([(1, 10 * cores)]), overheadSeconds: 20e-6, memoryBytes: ram),
        ]
        for device in OpenCLRuntime.availableDevices {
            let info = device.info
            if info.isGPU {
                let gpuPeak = Double(info.computeUnits) * Double(info.clockMHz) / 1000 * 128
                list.append(
                    BackendProfile(
                        backend: .opencl(device: info.index), device: info.name,
                        gflops: [
                            .init(headDim: 64, curve: curve([(128, 0.05), (1024, 0.2), (8192, 0.3)], of: gpuPeak))
                        ],
                        decodeGBps: ThroughputCurve([(1024, 50), (32768, 200)]), overheadSeconds: 50e-6,
                        transferGBps: info.hostUnifiedMemory ? nil : 12, memoryBytes: info.globalMemoryBytes))
            } else {
                list.append(
                    BackendProfile(
                        backend: .opencl(device: info.index), device: info.name,
                        gflops: [
                            .init(headDim: 64, curve: curve([(128, 0.35), (512, 0.45), (4096, 0.42)], of: hostPeak))
                        ],
                        decodeGBps: ThroughputCurve([(1, 9 * cores)]), overheadSeconds: 250e-6,
                        transferGBps: info.hostUnifiedMemory ? nil : 20, memoryBytes: info.globalMemoryBytes))
            }
        }
        return MachineProfile(
            identity: identity(configuration: configuration), source: "built-in defaults", backends: list)
    }
}
