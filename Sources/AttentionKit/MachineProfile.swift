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
    /// built-in defaults. A missing file means defaults; an unreadable, truncated, foreign or
    /// outdated one means defaults whose `source` says which file was ignored and why. Never throws.
    public static func load(configuration: AttentionConfiguration) -> MachineProfile {
        let identity = identity(configuration: configuration)
        var isFolder: ObjCBool = false
        guard let url = fileURL(configuration: configuration),
            FileManager.default.fileExists(atPath: url.path, isDirectory: &isFolder)
        else { return defaults(configuration: configuration) }
        // Folders and empty files are told apart before reading: Foundation's Data(contentsOf:) leaks a
        // buffer on both (seen under LeakSanitizer).
        let size = (try? FileManager.default.attributesOfItem(atPath: url.path)[.size] as? Int) ?? nil
        let reason: String
        if isFolder.boolValue {
            reason = "unreadable: a folder, not a file"
        } else if size == 0 {
            reason = "not a profile: invalid JSON (empty file)"
        } else {
            do {
                let stored = try JSONDecoder().decode(MachineProfile.self, from: Data(contentsOf: url))
                if stored.identity != identity {
                    reason = "measured on another machine or configuration (\(stored.identity))"
                } else if let problem = stored.problem {
                    reason = "invalid value: \(problem)"
                } else {
                    return stored
                }
            } catch let error as DecodingError {
                reason = "not a profile: \(describe(error))"
            } catch {
                reason = "unreadable: \(error.localizedDescription)"
            }
        }
        var profile = defaults(configuration: configuration)
        profile.source += " (\(url.path) ignored: \(reason))"
        return profile
    }

    /// The first value a stored profile must not hold (decoding checks types, not ranges): curve
    /// points at key lengths below 1 or with negative or non-finite throughput, negative overheads,
    /// tilings and kernel configurations the backends cannot run.
    var problem: String? {
        func curve(_ c: ThroughputCurve, _ name: String) -> String? {
            for point in c.points where point.keyLength < 1 || !point.value.isFinite || point.value < 0 {
                return "\(name) point (Nk \(point.keyLength), \(point.value))"
            }
            return nil
        }
        for entry in backends {
            let name = entry.backend.description
            for head in entry.gflops {
                if head.headDim < 1 { return "\(name) GFLOP/s curve for head dim \(head.headDim)" }
                if let bad = curve(head.curve, "\(name) GFLOP/s") { return bad }
            }
            if let bad = curve(entry.decodeGBps, "\(name) decode GB/s") { return bad }
            if !entry.overheadSeconds.isFinite || entry.overheadSeconds < 0 {
                return "\(name) overhead \(entry.overheadSeconds) s"
            }
            if let rate = entry.transferGBps, !rate.isFinite || rate <= 0 { return "\(name) transfer \(rate) GB/s" }
            for tuned in entry.blasTilings ?? [] {
                let t = tuned.value
                guard (1...4096).contains(t.queryRows), (16...65536).contains(t.keyBlock), t.keyBlock % 16 == 0 else {
                    return "\(name) tiling \(t) for head dim \(tuned.headDim)"
                }
            }
            for tuned in entry.openclConfigs ?? [] {
                let c = tuned.value
                guard OpenCLKernelConfig.vectorWidths.contains(c.vectorWidth), (1...64).contains(c.rows),
                    (1...4096).contains(c.workGroup),
                    (1...4096).contains(c.decodeRows), (1...(1 << 24)).contains(c.minKeysPerSplit)
                else { return "\(name) kernel configuration \(c) for head dim \(tuned.headDim)" }
            }
        }
        return nil
    }

    private static func describe(_ error: DecodingError) -> String {
        func path(_ context: DecodingError.Context) -> String {
            let keys = context.codingPath.map { $0.intValue.map(String.init) ?? $0.stringValue }
            return keys.isEmpty ? "" : " at \(keys.joined(separator: "."))"
        }
        switch error {
        case .dataCorrupted(let context): return "invalid JSON\(path(context)) (\(context.debugDescription))"
        case .keyNotFound(let key, let context): return "missing \"\(key.stringValue)\"\(path(context))"
        case .typeMismatch(_, let context): return "wrong type\(path(context)) (\(context.debugDescription))"
        case .valueNotFound(_, let context): return "missing value\(path(context))"
        @unknown default: return "\(error)"
        }
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
