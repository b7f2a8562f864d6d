import AttentionBLAS
import AttentionCore
import AttentionOpenCL
import Foundation

/// One backend the dispatcher may choose: how to build it for a problem, and its profile.
public struct DispatchCandidate: Sendable {
    /// Builds the backend for a problem (tuned block sizes depend on the head dimension).
    public let make: @Sendable (AttentionProblem) -> any AttentionBackend
    public let profile: BackendProfile

    public init(profile: BackendProfile, make: @escaping @Sendable (AttentionProblem) -> any AttentionBackend) {
        self.profile = profile
        self.make = make
    }
}

/// The dispatcher's decision for one problem, as data: every candidate, whether it can run the
/// problem and why not, its estimated time, and the winner.
public struct DispatchDecision: Sendable, CustomStringConvertible {
    public struct Option: Sendable {
        public let backend: String
        public let device: String
        /// Supported, or why not (including the memory guard).
        public let support: BackendSupport
        /// Estimated seconds from the profile (nil when unsupported).
        public let estimatedSeconds: Double?
        /// Kernel or regime notes ("split-KV decode", "memory-bound decode", workspace size).
        public let detail: String
    }

    public let options: [Option]
    /// Index into `options` of the winner.
    public let chosenIndex: Int
    public let chosen: any AttentionBackend
    /// Where the profile came from ("built-in defaults", "measured by attnbench tune on ...").
    public let profileSource: String

    public var winner: Option { options[chosenIndex] }

    public var reason: String {
        let runnersUp = options.enumerated().filter { $0.offset != chosenIndex && $0.element.estimatedSeconds != nil }
            .sorted { $0.element.estimatedSeconds! < $1.element.estimatedSeconds! }
        var text = "\(winner.backend) estimated fastest (\(Self.ms(winner.estimatedSeconds)))"
        if let next = runnersUp.first { text += ", next \(next.element.backend) (\(Self.ms(next.element.estimatedSeconds)))" }
        let refused = options.filter { !$0.support.isSupported }
        if !refused.isEmpty {
            text += "; not possible: " + refused.map { option -> String in
                if case let .unsupported(why) = option.support { return "\(option.backend) (\(why))" }
                return option.backend
            }.joined(separator: ", ")
        }
        return text + "; profile: \(profileSource)"
    }

    public var description: String { reason }

    static func ms(_ seconds: Double?) -> String {
        guard let seconds else { return "-" }
        let value = seconds * 1e3
        return value >= 100 ? "\(Int(value.rounded())) ms" : String(format: "%.3g ms", value)
    }
}

/// Chooses the fastest backend that can run a problem, from a cost model over measured (or
/// default) per-device profiles, and says why.
///
/// Cost model: visible query-key pairs (exact for causal and window rules; mask density is not
/// modelled) give the FLOPs; time = overhead + FLOPs / GFLOP/s(head dim, Nk), or for decode-like
/// problems (Nq <= 16) the larger of that and K/V bytes / GB/s(Nk); plus host-device copies where the
/// device does not work on host memory. A backend whose workspace exceeds its device's memory (or,
/// on the host, half of RAM) is excluded: no quadratic-memory path is ever picked for a huge problem.
public struct Dispatcher: Sendable {
    public let profile: MachineProfile
    public let candidates: [DispatchCandidate]

    public init(profile: MachineProfile, candidates: [DispatchCandidate]) {
        self.profile = profile
        self.candidates = candidates
    }

    /// The profile of this process: the stored `attnbench tune` result when it belongs to this
    /// machine, else built-in defaults. Read once.
    public static let machineProfile = MachineProfile.load()

    /// This machine's backends (naive, BLAS, every OpenCL device, or an OpenCL entry that says why
    /// there is none), with the process's profile and any tuned block sizes applied.
    public static func current(threads: Int? = nil, profile: MachineProfile = machineProfile) -> Dispatcher {
        var candidates: [DispatchCandidate] = []
        for entry in profile.backends {
            switch entry.backend {
            case "naive":
                candidates.append(DispatchCandidate(profile: entry) { _ in NaiveBackend() })
            case "blas":
                // Tuned tilings come from prefill probes; decode-like problems keep the table's long key blocks.
                candidates.append(DispatchCandidate(profile: entry) { p in
                    BLASBackend(threads: threads, tiling: p.queryLength <= 16 ? nil : entry.tiling(headDim: max(p.headDim, p.valueDim)))
                })
            case let name where name.hasPrefix("opencl:"):
                let index = Int(name.dropFirst("opencl:".count)) ?? 0
                candidates.append(DispatchCandidate(profile: entry) { p in
                    OpenCLBackend(device: index, config: entry.config(headDim: max(p.headDim, p.valueDim)))
                })
            default:
                continue
            }
        }
        if OpenCLRuntime.availableDevices.isEmpty {
            // No OpenCL: listed so that the decision says why.
            let none = BackendProfile(backend: "opencl:0", device: "none", gflops: [], decodeGBps: ThroughputCurve([]), overheadSeconds: 0, memoryBytes: 0)
            candidates.append(DispatchCandidate(profile: none) { _ in OpenCLBackend(device: 0) })
        }
        return Dispatcher(profile: profile, candidates: candidates)
    }

    /// Evaluates every candidate on `problem` and picks the fastest supported one.
    public func decide(_ problem: AttentionProblem) -> DispatchDecision {
        var options: [DispatchDecision.Option] = []
        var backends: [any AttentionBackend] = []
        for candidate in candidates {
            let backend = candidate.make(problem)
            backends.append(backend)
            var support = backend.support(for: problem)
            let workspace = backend.workspaceBytes(for: problem)
            var detail = workspace > 0 ? "workspace \(Self.bytes(workspace))" : ""
            if support.isSupported {
                let hostBackend = candidate.profile.transferGBps == nil && !backend.name.hasPrefix("opencl")
                let limit = hostBackend ? candidate.profile.memoryBytes / 2 : candidate.profile.memoryBytes
                if UInt64(workspace) > limit {
                    support = .unsupported(reason: "needs \(Self.bytes(workspace)) of working memory, more than \(Self.bytes(Int(clamping: limit)))")
                }
            }
            if let opencl = backend as? OpenCLBackend, support.isSupported {
                detail = "\(opencl.kernelChoice(for: problem).choice)" + (detail.isEmpty ? "" : ", " + detail)
            }
            if problem.queryLength <= 16 { detail = "decode-like" + (detail.isEmpty ? "" : ", " + detail) }
            options.append(.init(backend: backend.name, device: candidate.profile.device, support: support,
                                 estimatedSeconds: support.isSupported ? Self.estimate(problem, profile: candidate.profile) : nil,
                                 detail: detail))
        }
        let best = options.indices.filter { options[$0].estimatedSeconds != nil }
            .min { options[$0].estimatedSeconds! < options[$1].estimatedSeconds! }
        let index = best ?? options.indices.first { options[$0].backend == "naive" } ?? 0
        let chosen: any AttentionBackend = backends.isEmpty ? NaiveBackend() : backends[index]
        return DispatchDecision(options: options, chosenIndex: index, chosen: chosen, profileSource: profile.source)
    }

    /// Query-key pairs that causal and window rules leave visible (masks not counted).
    public static func visiblePairs(_ p: AttentionProblem) -> Double {
        if !p.options.causal && p.options.window == nil { return Double(p.queryLength) * Double(p.keyLength) }
        var total = 0.0
        for i in 0..<p.queryLength {
            let (lo, hi) = p.visibleKeys(forQuery: i)
            if hi >= lo { total += Double(hi - lo + 1) }
        }
        return total
    }

    /// Estimated seconds of `problem` on a backend with `profile`.
    public static func estimate(_ p: AttentionProblem, profile: BackendProfile) -> Double {
        let flops = 2 * Double(p.batch * p.queryHeads) * visiblePairs(p) * Double(p.headDim + p.valueDim)
        let rate = max(profile.gflops(headDim: max(p.headDim, p.valueDim), keyLength: p.keyLength), 1e-3) * 1e9
        var seconds = flops / rate
        if p.queryLength <= 16 {
            let bandwidth = max(profile.decodeGBps.value(at: p.keyLength), 1e-3) * 1e9
            seconds = max(seconds, p.keyValueBytes / bandwidth)
        }
        if let transfer = profile.transferGBps {
            let elements = [p.queryShape, p.keyShape, p.valueShape, p.outputShape].map { Double($0.reduce(1, *)) }.reduce(0, +)
            seconds += 4 * elements / (transfer * 1e9)
        }
        return profile.overheadSeconds + seconds
    }

    /// "1.5 GiB", "256.1 MiB", "12 KiB" (no Foundation formatting: this runs on every decision).
    static func bytes(_ n: Int) -> String {
        func tenths(_ unit: Int) -> String { "\(n / unit).\((n % unit) * 10 / unit)" }
        return n >= 1 << 30 ? tenths(1 << 30) + " GiB" : n >= 1 << 20 ? tenths(1 << 20) + " MiB" : "\(n >> 10) KiB"
    }
}
