import AttentionKit
import Foundation
import Testing

/// A backend that only reports support and workspace: the dispatcher never runs it in these tests.
struct FakeBackend: AttentionBackend {
    let name: String
    var refusal: String?
    /// Bytes of workspace as a function of the problem (e.g. a materialised Nq x Nk matrix).
    var workspace: @Sendable (AttentionProblem) -> Int = { _ in 0 }

    func support(for problem: AttentionProblem) -> BackendSupport { refusal.map { .unsupported(reason: $0) } ?? .supported }
    func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        throw .backendFailure(backend: name, message: "fake backends do not run")
    }
    func workspaceBytes(for problem: AttentionProblem) -> Int { workspace(problem) }
}

func profile(_ name: String, gflops: Double, decodeGBps: Double = 10, overhead: Double = 0, transfer: Double? = nil,
             memory: UInt64 = 1 << 40) -> BackendProfile {
    BackendProfile(backend: name, device: "synthetic", gflops: [.init(headDim: 64, curve: ThroughputCurve([(1, gflops)]))],
                   decodeGBps: ThroughputCurve([(1, decodeGBps)]), overheadSeconds: overhead, transferGBps: transfer, memoryBytes: memory)
}

func candidate(_ p: BackendProfile, refusal: String? = nil, workspace: @escaping @Sendable (AttentionProblem) -> Int = { _ in 0 }) -> DispatchCandidate {
    DispatchCandidate(profile: p) { _ in FakeBackend(name: p.backend, refusal: refusal, workspace: workspace) }
}

func dispatcher(_ candidates: [DispatchCandidate]) -> Dispatcher {
    Dispatcher(profile: MachineProfile(identity: "test", source: "synthetic", backends: candidates.map(\.profile)), candidates: candidates)
}

func problem(b: Int = 1, hq: Int = 8, hkv: Int? = nil, nq: Int, nk: Int? = nil, d: Int = 64, _ options: AttentionOptions = .init()) throws -> AttentionProblem {
    try AttentionProblem(query: [b, hq, nq, d], key: [b, hkv ?? hq, nk ?? nq, d], value: [b, hkv ?? hq, nk ?? nq, d], options: options)
}

@Suite struct DispatcherChoice {
    // A CPU with no launch cost against a GPU 20x faster with 2 ms of overhead and PCIe copies.
    let cpu = profile("cpu", gflops: 100)
    let gpu = profile("gpu", gflops: 2000, decodeGBps: 500, overhead: 2e-3, transfer: 12)

    @Test func smallProblemsAvoidLaunchOverhead() throws {
        let d = dispatcher([candidate(cpu), candidate(gpu)])
        let small = try problem(nq: 128)
        #expect(d.decide(small).winner.backend == "cpu")
        let large = try problem(nq: 8192)
        #expect(d.decide(large).winner.backend == "gpu")
        // The crossover lies between, where the estimates agree to within the overhead.
        let estimates = d.decide(try problem(nq: 1024)).options.compactMap(\.estimatedSeconds)
        #expect(estimates.count == 2)
    }

    @Test func hugeProblemsAvoidQuadraticMemory() throws {
        // "dense" materialises Nq x Nk scores and is fastest, but only 1 GiB is available to it.
        let dense = profile("dense", gflops: 1000, memory: 1 << 30)
        let d = dispatcher([candidate(cpu), candidate(dense) { p in 4 * p.batch * p.queryHeads * p.queryLength * p.keyLength }])
        #expect(d.decide(try problem(nq: 2048)).winner.backend == "dense")  // 128 MiB: fits
        let huge = try problem(hq: 1, nq: 65536, .init(causal: true))       // 16 GiB: does not
        let decision = d.decide(huge)
        #expect(decision.winner.backend == "cpu")
        let refused = try #require(decision.options.first { $0.backend == "dense" })
        guard case let .unsupported(reason) = refused.support else {
            Issue.record("dense should be refused")
            return
        }
        #expect(reason.contains("working memory"))
        #expect(decision.reason.contains("not possible: dense"))
    }

    @Test func unsupportedBackendsAreNeverChosen() throws {
        let d = dispatcher([candidate(cpu), candidate(gpu, refusal: "no OpenCL platform")])
        let decision = d.decide(try problem(nq: 8192))
        #expect(decision.winner.backend == "cpu")
        #expect(decision.options[1].estimatedSeconds == nil)
        #expect(decision.reason.contains("gpu (no OpenCL platform)"))
    }

    @Test func missingOpenCLFallsBackToTheCPU() throws {
        // The real candidate list of a machine without OpenCL says why and picks BLAS.
        let p = try problem(nq: 512)
        let missing = DispatchCandidate(profile: profile("opencl:0", gflops: 5000)) { _ in OpenCLBackend(device: 99) }
        let d = dispatcher([candidate(profile("naive", gflops: 2)), DispatchCandidate(profile: profile("blas", gflops: 100)) { _ in BLASBackend() }, missing])
        let decision = d.decide(p)
        #expect(decision.winner.backend == "blas")
        #expect(decision.reason.contains("not possible: opencl:99"))
    }

    @Test func decodeIsMemoryBound() throws {
        // Equal GFLOP/s; one reads K/V twice as fast: it must win decode and tie on prefill.
        let a = profile("a", gflops: 100, decodeGBps: 10), b = profile("b", gflops: 100, decodeGBps: 20)
        let d = dispatcher([candidate(a), candidate(b)])
        let decode = try problem(hq: 32, hkv: 8, nq: 1, nk: 32768, d: 64)
        #expect(d.decide(decode).winner.backend == "b")
        let estimate = Dispatcher.estimate(decode, profile: b)
        #expect(abs(estimate - decode.keyValueBytes / 20e9) < 1e-9)
    }

    @Test func causalAndWindowDensityScaleTheEstimate() throws {
        let full = try problem(nq: 4096)
        let causal = try problem(nq: 4096, .init(causal: true))
        let window = try problem(nq: 4096, .init(causal: true, window: .init(left: 255, right: 0)))
        #expect(Dispatcher.visiblePairs(full) == 4096 * 4096)
        #expect(Dispatcher.visiblePairs(causal) == 4096 * 4097 / 2)
        #expect(Dispatcher.visiblePairs(window) == Double(256 * 4096 - 255 * 256 / 2))
        let (tf, tc, tw) = (Dispatcher.estimate(full, profile: cpu), Dispatcher.estimate(causal, profile: cpu), Dispatcher.estimate(window, profile: cpu))
        #expect(abs(tc / tf - 0.5) < 0.01)
        #expect(tw < tc / 7)
    }

    @Test func curvesInterpolateInLogLength() {
        let c = ThroughputCurve([(128, 10), (2048, 50)])
        #expect(c.value(at: 64) == 10 && c.value(at: 4096) == 50)
        #expect(abs(c.value(at: 512) - 30) < 1e-9)  // halfway in log2
    }
}

@Suite struct DispatcherOverrides {
    let d = dispatcher([candidate(profile("naive", gflops: 2)), candidate(profile("blas", gflops: 100)),
                        candidate(profile("opencl:0", gflops: 50), refusal: "needs 3 GiB; device has 2 GiB")])

    @Test func apiChoiceForcesABackendEvenWhenSlower() throws {
        let selection = try BackendSelection.select(.naive, for: try problem(nq: 64), dispatcher: d, environment: [:])
        #expect(selection.backend.name == "naive" && selection.reason == "requested")
    }

    @Test func forcingAnUnsupportedBackendIsAnErrorWithTheReason() throws {
        #expect(throws: AttentionError.unsupported(backend: "opencl:0", reason: "needs 3 GiB; device has 2 GiB")) {
            try BackendSelection.select(.opencl, for: try problem(nq: 64), dispatcher: d, environment: [:])
        }
        #expect(throws: AttentionError.unsupported(backend: "opencl:0", reason: "needs 3 GiB; device has 2 GiB")) {
            try BackendSelection.select(.auto, for: try problem(nq: 64), dispatcher: d, environment: ["ATTENTIONKIT_BACKEND": "opencl"])
        }
        #expect(throws: AttentionError.self) {
            try BackendSelection.select(.auto, for: try problem(nq: 64), dispatcher: d, environment: ["ATTENTIONKIT_BACKEND": "tpu"])
        }
    }

    @Test func environmentVariableOverridesAuto() throws {
        let forced = try BackendSelection.select(.auto, for: try problem(nq: 64), dispatcher: d, environment: ["ATTENTIONKIT_BACKEND": "naive"])
        #expect(forced.backend.name == "naive" && forced.reason.contains("ATTENTIONKIT_BACKEND"))
        let auto = try BackendSelection.select(.auto, for: try problem(nq: 64), dispatcher: d, environment: ["ATTENTIONKIT_BACKEND": "auto"])
        #expect(auto.backend.name == "blas" && auto.decision != nil)
    }
}

@Suite struct MachineProfiles {
    @Test func defaultsCoverEveryBackendOfThisMachine() {
        let defaults = MachineProfile.defaults()
        #expect(defaults.profile(for: "naive") != nil && defaults.profile(for: "blas") != nil)
        #expect(defaults.backends.filter { $0.backend.hasPrefix("opencl:") }.count == OpenCLRuntime.availableDevices.count)
        #expect(defaults.source == "built-in defaults")
    }

    @Test func profilesRoundTripThroughJSON() throws {
        var p = MachineProfile.defaults()
        p.backends[0].blasTilings = [.init(headDim: 64, value: BLASTiling(queryRows: 96, keyBlock: 384))]
        let data = try JSONEncoder().encode(p)
        #expect(try JSONDecoder().decode(MachineProfile.self, from: data) == p)
    }

    @Test func tunedBlockSizesAreApplied() throws {
        var blas = profile("blas", gflops: 100)
        blas.blasTilings = [.init(headDim: 64, value: BLASTiling(queryRows: 96, keyBlock: 384)), .init(headDim: 128, value: BLASTiling(queryRows: 48, keyBlock: 256))]
        let machine = MachineProfile(identity: MachineProfile.currentIdentity, source: "test", backends: [blas])
        let d = Dispatcher.current(profile: machine)
        let backend = try #require(d.decide(try problem(nq: 512, d: 128)).chosen as? BLASBackend)
        #expect(backend.tiling == BLASTiling(queryRows: 48, keyBlock: 256))
    }
}
