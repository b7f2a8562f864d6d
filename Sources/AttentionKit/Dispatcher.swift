import AttentionBLAS
import AttentionCore
import AttentionOpenCL
import Foundation

/// One backend the dispatcher may choose, built once, and its profile.
public struct DispatchCandidate: Sendable {
    public let backend: any AttentionBackend
    public let profile: BackendProfile

    public init(backend: any AttentionBackend, profile: BackendProfile) {
        self.backend = backend
        self.profile = profile
    }
}

/// Chooses the fastest backend that can run a problem, from a cost model over measured (or
/// default) per-device profiles, and says why.
///
/// Cost model: visible query-key pairs (exact for causal and window rules; mask density is not
/// modelled) give the FLOPs; time = overhead + FLOPs / GFLOP/s(head dim, Nk), or for decode-like
/// problems (`AttentionProblem.Regime`) the larger of that and K/V bytes / GB/s(Nk); plus host-device copies where the
/// device does not work on host memory. A backend whose workspace exceeds its device's memory (or,
/// on the host, half of RAM) is excluded: no quadratic-memory path is ever picked for a huge problem.
public struct Dispatcher: Sendable {
    /// The settings this dispatcher honours (the `ATTENTIONKIT_BACKEND` override among them).
    public let configuration: AttentionConfiguration
    public let profile: MachineProfile
    /// Every backend it may choose, each built once.
    public let candidates: [DispatchCandidate]

    public init(
        profile: MachineProfile, candidates: [DispatchCandidate], configuration: AttentionConfiguration = .init()
    ) {
        self.profile = profile
        self.candidates = candidates
        self.configuration = configuration
    }

    /// This machine's backends (naive, BLAS, every OpenCL device, or an OpenCL entry that says why
    /// there is none), built once with the profile's tuned block sizes.
    public init(
        configuration: AttentionConfiguration = .process, profile: MachineProfile = .process, threads: Int? = nil
    ) {
        var candidates: [DispatchCandidate] = []
        for entry in profile.backends {
            let backend: any AttentionBackend
            switch entry.backend {
            case .naive:
                backend = NaiveBackend()
            case .blas:
                backend = BLASBackend(
                    threads: threads, tunedTilings: entry.blasTilings ?? [], products: entry.blasProducts ?? .automatic,
                    configuration: configuration)
            case .opencl(let device):
                backend = OpenCLBackend(device: device, tunedConfigs: entry.openclConfigs ?? [])
            case .multi:
                continue  // built below from the members' candidates
            }
            candidates.append(DispatchCandidate(backend: backend, profile: entry))
        }
        if let multi = Self.multiDevice(from: candidates) { candidates.append(multi) }
        if OpenCLRuntime.availableDevices.isEmpty {
            // No OpenCL: listed so that decisions say why.
            let none = BackendProfile(
                backend: .opencl(device: 0), device: "none", gflops: [], decodeGBps: ThroughputCurve([]),
                overheadSeconds: 0, memoryBytes: 0)
            candidates.append(DispatchCandidate(backend: OpenCLBackend(device: 0), profile: none))
        }
        self.init(profile: profile, candidates: candidates, configuration: configuration)
    }

    /// This process's dispatcher: `AttentionConfiguration.process` and `MachineProfile.process`,
    /// candidates built once.
    public static let process = Dispatcher()

    /// Every device that can compute (BLAS and each OpenCL device; not the reference) as one
    /// `MultiDeviceBackend`, weighted by the members' prefill rates (D 128, 4096 keys): nil with fewer
    /// than two such devices.
    static func multiDevice(from candidates: [DispatchCandidate]) -> DispatchCandidate? {
        let devices = OpenCLRuntime.availableDevices.count
        let usable = candidates.filter { candidate in
            switch candidate.backend.id {
            case .blas: return true
            case .opencl(let device): return device < devices
            case .naive, .multi: return false
            }
        }
        guard usable.count >= 2 else { return nil }
        let weights = usable.map { max($0.profile.gflops(headDim: 128, keyLength: 4096), 1e-3) }
        guard let backend = try? MultiDeviceBackend(members: usable.map(\.backend), weights: weights) else {
            return nil
        }
        let profile = BackendProfile(
            backend: backend.id, device: usable.map(\.profile.device).joined(separator: " + "),
            gflops: usable.max {
                $0.profile.gflops(headDim: 128, keyLength: 4096) < $1.profile.gflops(headDim: 128, keyLength: 4096)
            }!.profile.gflops,
            decodeGBps: usable.max { $0.profile.decodeGBps.value(at: 4096) < $1.profile.decodeGBps.value(at: 4096) }!
                .profile.decodeGBps,
            overheadSeconds: usable.map(\.profile.overheadSeconds).max()! + multiDeviceOverheadSeconds,
            memoryBytes: usable.map(\.profile.memoryBytes).min()!)
        return DispatchCandidate(backend: backend, profile: profile)
    }

    /// Starting and joining the members' threads of a multi-device call.
    static let multiDeviceOverheadSeconds = 50e-6

    /// Whether a member computes on the host's own cores (BLAS, the reference, an OpenCL CPU device):
    /// such members share them, so splitting a call between two of them gains nothing.
    static func computesOnHost(_ id: BackendID) -> Bool {
        switch id {
        case .naive, .blas: return true
        case .opencl(let device):
            let devices = OpenCLRuntime.availableDevices
            return device < devices.count && devices[device].info.isCPU
        case .multi: return false
        }
    }

    /// The multi-device estimate: each part on its member's profile; members that share the host's
    /// cores add up, the rest overlap (the slowest counts); key splits add the merge (read the
    /// partials, write the output, ~5 GB/s on one core).
    func estimate(_ problem: AttentionProblem, multi: MultiDeviceBackend, profile: BackendProfile) -> Double? {
        guard let partition = try? multi.partition(problem) else { return nil }
        var host = 0.0
        var slowest = 0.0
        for part in partition.parts {
            let id = multi.members[part.member].id
            guard let member = candidates.first(where: { $0.backend.id == id }) else { return nil }
            let seconds = Self.estimate(part.problem, profile: member.profile)
            if Self.computesOnHost(id) { host += seconds } else { slowest = max(slowest, seconds) }
        }
        var seconds = max(host, slowest) + Self.multiDeviceOverheadSeconds
        if partition.split == .keys {
            let rows = Double(problem.batch * problem.queryHeads * problem.queryLength)
            seconds += rows * Double(problem.valueDim + 1) * 4 * Double(partition.parts.count + 1) / 5e9
        }
        return seconds
    }

    /// The candidate backend `id`; an OpenCL device this machine lacks gives a backend that says
    /// why it cannot run anything; `multi:A+B` splits across those candidates (equal weights unless it
    /// is the dispatcher's own); any other unknown backend is an error.
    public func backend(_ id: BackendID) throws(AttentionError) -> any AttentionBackend {
        if let candidate = candidates.first(where: { $0.backend.id == id }) { return candidate.backend }
        if case .opencl(let device) = id { return OpenCLBackend(device: device) }
        if case .multi(let members) = id {
            var backends: [any AttentionBackend] = []
            for member in members { backends.append(try backend(member)) }
            let weights = members.map { member in
                max(
                    candidates.first { $0.backend.id == member }?.profile.gflops(headDim: 128, keyLength: 4096) ?? 1,
                    1e-3)
            }
            return try MultiDeviceBackend(members: backends, weights: weights)
        }
        let known = candidates.map(\.backend.name).joined(separator: ", ")
        throw .unsupported(backend: id.description, reason: "no such backend on this machine (have: \(known))")
    }

    /// Evaluates every candidate on `problem` (one `plan(for:)` each) and picks the fastest
    /// supported one.
    public func decide(_ problem: AttentionProblem) -> DispatchDecision {
        let options = candidates.map { option(for: $0, problem) }
        return choose(options)
    }

    /// Evaluates every candidate on a batch of sequences: support of the batch, and work summed
    /// over the sequences (never the padded product), with one call's overhead.
    public func decide(_ batch: SequenceBatch) -> DispatchDecision {
        // Per sequence: visible pairs and K/V bytes, computed once for every candidate.
        let kvBytesPerKey = Double(
            batch.storage.keyValue.byteSize * batch.keyValueHeads * (batch.headDim + batch.valueDim))
        let sequences = (0..<batch.count).compactMap { s -> (pairs: Double, keys: Int, kvBytes: Double)? in
            let (nq, nk) = (batch.queryLengths[s], batch.keyLengths[s])
            guard nq > 0, nk > 0 else { return nil }
            let pairs = Self.visiblePairs(
                queryLength: nq, keyLength: nk, causal: batch.options.causal, window: batch.options.window)
            return (pairs, nk, Double(nk) * kvBytesPerKey)
        }
        let elements = [batch.queryShape, batch.keyShape, batch.valueShape, batch.outputShape]
            .map { Double($0.reduce(1, *)) }.reduce(0, +)
        let width = max(batch.headDim, batch.valueDim)
        let flopsPerPair = 2 * Double(batch.queryHeads) * Double(batch.headDim + batch.valueDim)
        let decodeLike = batch.regime == .decodeLike
        let options = candidates.map { candidate -> DispatchDecision.Option in
            let support = candidate.backend.support(for: batch)
            let profile = candidate.profile
            var seconds = profile.overheadSeconds
            if support.isSupported {
                for sequence in sequences {
                    seconds += Self.workSeconds(
                        flops: flopsPerPair * sequence.pairs, keyValueBytes: sequence.kvBytes,
                        keyLength: sequence.keys, width: width, decodeLike: decodeLike, profile: profile)
                }
                if let transfer = profile.transferGBps { seconds += 4 * elements / (transfer * 1e9) }
            }
            return DispatchDecision.Option(
                backend: candidate.backend.id, device: profile.device, support: support,
                estimatedSeconds: support.isSupported ? seconds : nil,
                detail: "\(batch.layout.name) batch of \(batch.count), \(batch.regime.rawValue)")
        }
        return choose(options)
    }

    /// The fastest supported option (the reference when none is).
    private func choose(_ options: [DispatchDecision.Option]) -> DispatchDecision {
        let best = options.indices.filter { options[$0].estimatedSeconds != nil }
            .min { options[$0].estimatedSeconds! < options[$1].estimatedSeconds! }
        let index = best ?? options.indices.first { options[$0].backend == .naive } ?? 0
        let chosen: any AttentionBackend = candidates.isEmpty ? NaiveBackend() : candidates[index].backend
        return DispatchDecision(options: options, chosenIndex: index, chosen: chosen, profileSource: profile.source)
    }

    /// One candidate's line of a decision: its plan, the memory guard, the estimate.
    private func option(for candidate: DispatchCandidate, _ problem: AttentionProblem) -> DispatchDecision.Option {
        let plan = candidate.backend.plan(for: problem)
        var support = plan.support
        if support.isSupported {
            let limit = plan.deviceMemoryBytes ?? candidate.profile.memoryBytes / 2
            if UInt64(plan.workspaceBytes) > limit {
                support = .unsupported(
                    reason: "needs \(Self.bytes(plan.workspaceBytes)) of working memory, "
                        + "more than \(Self.bytes(Int(clamping: limit)))")
            }
        }
        var notes = [problem.regime.rawValue]
        if support.isSupported && !plan.path.isEmpty { notes.append(plan.path) }
        if plan.workspaceBytes > 0 { notes.append("workspace \(Self.bytes(plan.workspaceBytes))") }
        var estimate: Double? = nil
        if support.isSupported {
            if let multi = candidate.backend as? MultiDeviceBackend {
                estimate = self.estimate(problem, multi: multi, profile: candidate.profile)
                if multi.members.filter({ Self.computesOnHost($0.id) }).count >= 2 {
                    notes.append("members share the host's cores")
                }
            } else {
                estimate = Self.estimate(problem, profile: candidate.profile)
            }
        }
        return DispatchDecision.Option(
            backend: candidate.backend.id, device: candidate.profile.device, support: support,
            estimatedSeconds: estimate, detail: notes.joined(separator: ", "))
    }

    /// Query-key pairs that causal and window rules leave visible (masks not counted).
    public static func visiblePairs(_ p: AttentionProblem) -> Double {
        visiblePairs(
            queryLength: p.queryLength, keyLength: p.keyLength, causal: p.options.causal, window: p.options.window)
    }

    /// Visible pairs of one problem's (or one sequence's) sizes and rules.
    static func visiblePairs(queryLength nq: Int, keyLength nk: Int, causal: Bool, window: AttentionWindow?) -> Double {
        if !causal && window == nil { return Double(nq) * Double(nk) }
        var total = 0.0
        for i in 0..<nq {
            let (lo, hi) = AttentionProblem.visibleKeys(
                query: i, queryLength: nq, keyLength: nk, causal: causal, window: window)
            if hi >= lo { total += Double(hi - lo + 1) }
        }
        return total
    }

    /// Estimated seconds of `problem` on a backend with `profile`.
    public static func estimate(_ p: AttentionProblem, profile: BackendProfile) -> Double {
        let flops = 2 * Double(p.batch * p.queryHeads) * visiblePairs(p) * Double(p.headDim + p.valueDim)
        var seconds = workSeconds(
            flops: flops, keyValueBytes: p.keyValueBytes, keyLength: p.keyLength, width: max(p.headDim, p.valueDim),
            decodeLike: p.regime == .decodeLike, profile: profile)
        if let transfer = profile.transferGBps {
            let elements = [p.queryShape, p.keyShape, p.valueShape, p.outputShape].map { Double($0.reduce(1, *)) }
                .reduce(0, +)
            seconds += 4 * elements / (transfer * 1e9)
        }
        return profile.overheadSeconds + seconds
    }

    /// The cost model's compute time: FLOPs over the profile's rate at this head width and key
    /// length, or for decode-like work the larger of that and K/V bytes over its bandwidth.
    static func workSeconds(
        flops: Double, keyValueBytes: Double, keyLength: Int, width: Int, decodeLike: Bool, profile: BackendProfile
    ) -> Double {
        let rate = max(profile.gflops(headDim: width, keyLength: keyLength), 1e-3) * 1e9
        guard decodeLike else { return flops / rate }
        let bandwidth = max(profile.decodeGBps.value(at: keyLength), 1e-3) * 1e9
        return max(flops / rate, keyValueBytes / bandwidth)
    }

    /// "1.5 GiB", "256.1 MiB", "12 KiB" (no Foundation formatting: this runs on every decision).
    static func bytes(_ n: Int) -> String {
        func tenths(_ unit: Int) -> String { "\(n / unit).\((n % unit) * 10 / unit)" }
        return n >= 1 << 30 ? tenths(1 << 30) + " GiB" : n >= 1 << 20 ? tenths(1 << 20) + " MiB" : "\(n >> 10) KiB"
    }
}
