import AttentionBLAS
import AttentionCore
import AttentionOpenCL
import Foundation

/// Throughput against key length: measured or default points, interpolated log-linearly in Nk
/// and held constant beyond the ends.
public struct ThroughputCurve: Codable, Sendable, Equatable {
    public struct Point: Codable, Sendable, Equatable {
        public var keyLength: Int
        public var value: Double
        public init(keyLength: Int, value: Double) {
            self.keyLength = keyLength
            self.value = value
        }
    }

    public var points: [Point]

    public init(_ points: [(Int, Double)]) {
        self.points = points.map { Point(keyLength: $0.0, value: $0.1) }.sorted { $0.keyLength < $1.keyLength }
    }

    public func value(at keyLength: Int) -> Double {
        guard let first = points.first, let last = points.last else { return 0 }
        if keyLength <= first.keyLength { return first.value }
        if keyLength >= last.keyLength { return last.value }
        let x = log2(Double(keyLength))
        for (a, b) in zip(points, points.dropFirst()) where keyLength <= b.keyLength {
            let (xa, xb) = (log2(Double(a.keyLength)), log2(Double(b.keyLength)))
            let t = xb > xa ? (x - xa) / (xb - xa) : 0
            return a.value + (b.value - a.value) * t
        }
        return last.value
    }
}

/// What the dispatcher knows about one backend on one device.
public struct BackendProfile: Codable, Sendable, Equatable {
    /// The backend's name: "naive", "blas", "opencl:0"...
    public var backend: String
    public var device: String
    /// GFLOP/s on prefill-like problems, by head dimension (nearest is used).
    public var gflops: [HeadDimCurve]
    /// K/V bytes read per second (GB/s) on decode-like problems (Nq <= 16), by key length.
    public var decodeGBps: ThroughputCurve
    /// Fixed cost of a call: launches, buffer set-up, thread wake-up.
    public var overheadSeconds: Double
    /// Host-device copy rate for devices that do not work on host memory in place (nil: in place).
    public var transferGBps: Double?
    /// Memory the backend's workspace must fit in.
    public var memoryBytes: UInt64
    /// Tuned BLAS tilings by head dimension (BLAS only).
    public var blasTilings: [Tuned<BLASTiling>]?
    /// Tuned OpenCL kernel configurations by head dimension (OpenCL only).
    public var openclConfigs: [Tuned<OpenCLKernelConfig>]?

    public struct HeadDimCurve: Codable, Sendable, Equatable {
        public var headDim: Int
        public var curve: ThroughputCurve
        public init(headDim: Int, curve: ThroughputCurve) {
            self.headDim = headDim
            self.curve = curve
        }
    }

    /// A tuned value (block sizes) for one head dimension; the nearest head dimension is used.
    public struct Tuned<Value: Codable & Sendable & Equatable>: Codable, Sendable, Equatable {
        public var headDim: Int
        public var value: Value
        public init(headDim: Int, value: Value) {
            self.headDim = headDim
            self.value = value
        }
    }

    public init(backend: String, device: String, gflops: [HeadDimCurve], decodeGBps: ThroughputCurve,
                overheadSeconds: Double, transferGBps: Double? = nil, memoryBytes: UInt64) {
        self.backend = backend
        self.device = device
        self.gflops = gflops
        self.decodeGBps = decodeGBps
        self.overheadSeconds = overheadSeconds
        self.transferGBps = transferGBps
        self.memoryBytes = memoryBytes
    }

    /// GFLOP/s expected for head dimension `d` (the nearest measured one) at key length `nk`.
    public func gflops(headDim d: Int, keyLength nk: Int) -> Double {
        guard let nearest = gflops.min(by: { abs($0.headDim - d) < abs($1.headDim - d) }) else { return 1 }
        return nearest.curve.value(at: nk)
    }

    func tiling(headDim d: Int) -> BLASTiling? { Self.nearest(blasTilings, to: d) }

    func config(headDim d: Int) -> OpenCLKernelConfig? { Self.nearest(openclConfigs, to: d) }

    private static func nearest<Value>(_ tuned: [Tuned<Value>]?, to d: Int) -> Value? {
        tuned?.min { abs($0.headDim - d) < abs($1.headDim - d) }?.value
    }
}

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

    public func profile(for backend: String) -> BackendProfile? { backends.first { $0.backend == backend } }

    /// The machine: CPU model and cores, OpenBLAS core, every OpenCL device and driver.
    public static var currentIdentity: String {
        var parts = ["cpu=\(CPUInfo.modelName ?? "unknown")", "cores=\(CPUInfo.logicalCores)", "openblas=\(CPUInfo.openBLASCore)",
                     "kernels=\(CPUInfo.kernelDescription)"]
        parts += OpenCLRuntime.availableDevices.map { "opencl=\($0.info.name)|\($0.info.driverVersion)" }
        return parts.joined(separator: ";")
    }

    /// Where `attnbench tune` stores the profile.
    public static var fileURL: URL? { CacheDirectory.url?.appendingPathComponent("profile.json") }

    /// The stored profile when it was measured on this machine, else the built-in defaults.
    public static func load() -> MachineProfile {
        if let url = fileURL, let data = try? Data(contentsOf: url),
           let stored = try? JSONDecoder().decode(MachineProfile.self, from: data), stored.identity == currentIdentity {
            return stored
        }
        return defaults()
    }

    /// Writes the profile where `load()` finds it.
    public func save() throws {
        guard let url = Self.fileURL else { throw CocoaError(.fileNoSuchFile) }
        try FileManager.default.createDirectory(at: url.deletingLastPathComponent(), withIntermediateDirectories: true)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: url, options: .atomic)
    }

    // MARK: Built-in defaults

    /// Estimates from device properties alone: CPU peak = cores x clock x FLOPs per cycle of the
    /// CPU kernel variant in use (8 baseline, 32 AVX2+FMA, 64 AVX-512, 16 NEON); GPU peak =
    /// compute units x clock x 128.
    public static func defaults() -> MachineProfile {
        let cores = Double(CPUInfo.logicalCores)
        let isa = (try? CPUKernels.processDefault.get().isa) ?? .baseline
        let flopsPerCycle = isa.peakFlopsPerCycle
        let peak = cores * (CPUInfo.clockMHz ?? 2500) / 1000 * flopsPerCycle
        // PoCL compiles its kernels for the host CPU whatever variant AttentionKit's own kernels use.
        let hostPeak = cores * (CPUInfo.clockMHz ?? 2500) / 1000 * CPUISA.best.peakFlopsPerCycle
        let ram = UInt64(ProcessInfo.processInfo.physicalMemory)
        func curve(_ fractions: [(Int, Double)], of top: Double) -> ThroughputCurve { ThroughputCurve(fractions.map { ($0.0, $0.1 * top) }) }
        var list = [
            BackendProfile(backend: "naive", device: "CPU", gflops: [.init(headDim: 64, curve: ThroughputCurve([(1, 2.2)]))],
                           decodeGBps: ThroughputCurve([(1, 1.1)]), overheadSeconds: 0, memoryBytes: ram),
            BackendProfile(backend: "blas", device: "CPU",
                           gflops: [.init(headDim: 64, curve: curve([(128, 0.55), (512, 0.65), (4096, 0.62)], of: peak)),
                                    .init(headDim: 128, curve: curve([(128, 0.5), (512, 0.62), (4096, 0.62)], of: peak))],
                           decodeGBps: ThroughputCurve([(1, 10 * cores)]), overheadSeconds: 20e-6, memoryBytes: ram),
        ]
        for device in OpenCLRuntime.availableDevices {
            let info = device.info
            if info.isGPU {
                let gpuPeak = Double(info.computeUnits) * Double(info.clockMHz) / 1000 * 128
                list.append(BackendProfile(
                    backend: "opencl:\(info.index)", device: info.name,
                    gflops: [.init(headDim: 64, curve: curve([(128, 0.05), (1024, 0.2), (8192, 0.3)], of: gpuPeak))],
                    decodeGBps: ThroughputCurve([(1024, 50), (32768, 200)]), overheadSeconds: 50e-6,
                    transferGBps: info.hostUnifiedMemory ? nil : 12, memoryBytes: info.globalMemoryBytes))
            } else {
                list.append(BackendProfile(
                    backend: "opencl:\(info.index)", device: info.name,
                    gflops: [.init(headDim: 64, curve: curve([(128, 0.35), (512, 0.45), (4096, 0.42)], of: hostPeak))],
                    decodeGBps: ThroughputCurve([(1, 9 * cores)]), overheadSeconds: 250e-6,
                    transferGBps: info.hostUnifiedMemory ? nil : 20, memoryBytes: info.globalMemoryBytes))
            }
        }
        return MachineProfile(identity: currentIdentity, source: "built-in defaults", backends: list)
    }
}
