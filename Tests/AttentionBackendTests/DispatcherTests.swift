import AttentionBLAS
import AttentionKit
import Foundation
import Testing

/// A backend that only reports support and workspace: the dispatcher never runs it in these tests.
struct FakeBackend: AttentionBackend {
    let id: BackendID
    var refusal: String?
    /// Bytes of workspace as a function of the problem (e.g. a materialised Nq x Nk matrix).
    var workspace: @Sendable (AttentionProblem) -> Int = { _ in 0 }

    func support(for problem: AttentionProblem) -> BackendSupport {
        refusal.map { .unsupported(reason: $0) } ?? .supported
    }
    func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        throw .backendFailure(backend: id.description, message: "fake backends do not run")
    }
    func workspaceBytes(for problem: AttentionProblem) -> Int { workspace(problem) }
}

func profile(
    _ id: BackendID, gflops: Double, decodeGBps: Double = 10, overhead: Double = 0, transfer: Double? = nil,
    memory: UInt64 = 1 << 40
) -> BackendProfile {
    BackendProfile(
        backend: id, device: "synthetic", gflops: [.init(headDim: 64, curve: ThroughputCurve([(1, gflops)]))],
        decodeGBps: ThroughputCurve([(1, decodeGBps)]), overheadSeconds: overhead, transferGBps: transfer,
        memoryBytes: memory)
}

func candidate(
    _ p: BackendProfile, refusal: String? = nil, workspace: @escaping @Sendable (AttentionProblem) -> Int = { _ in 0 }
) -> DispatchCandidate {
    DispatchCandidate(backend: FakeBackend(id: p.backend, refusal: refusal, workspace: workspace), profile: p)
}

func dispatcher(_ candidates: [DispatchCandidate], environment: [String: String] = [:]) -> Dispatcher {
    Dispatcher(
        profile: MachineProfile(identity: "test", source: "synthetic", backends: candidates.map(\.profile)),
        candidates: candidates, configuration: AttentionConfiguration(environment: environment))
}

// Synthetic backends take real identities: a fast CPU path, a GPU behind PCIe, a second device.
let cpuID = BackendID.blas
let gpuID = BackendID.opencl(device: 0)
let otherID = BackendID.opencl(device: 1)

func problem(
    b: Int = 1, hq: Int = 8, hkv: Int? = nil, nq: Int, nk: Int? = nil, d: Int = 64,
    _ options: AttentionOptions = .init()
) throws -> AttentionProblem {
    try AttentionProblem(
        query: [b, hq, nq, d], key: [b, hkv ?? hq, nk ?? nq, d], value: [b, hkv ?? hq, nk ?? nq, d], options: options)
}

@Suite struct DispatcherChoice {
    // A CPU with no launch cost against a GPU 20x faster with 2 ms of overhead and PCIe copies.
    let cpu = profile(cpuID, gflops: 100)
    let gpu = profile(gpuID, gflops: 2000, decodeGBps: 500, overhead: 2e-3, transfer: 12)

    @Test func smallProblemsAvoidLaunchOverhead() throws {
        let d = dispatcher([candidate(cpu), candidate(gpu)])
        let small = try problem(nq: 128)
        #expect(d.decide(small).winner.backend == cpuID)
        let large = try problem(nq: 8192)
        #expect(d.decide(large).winner.backend == gpuID)
        // The crossover lies between, where the estimates agree to within the overhead.
        let estimates = d.decide(try problem(nq: 1024)).options.compactMap(\.estimatedSeconds)
        #expect(estimates.count == 2)
    }

    @Test func hugeProblemsAvoidQuadraticMemory() throws {
        // "dense" materialises Nq x Nk scores and is fastest, but only 1 GiB is available to it.
        let dense = profile(otherID, gflops: 1000, memory: 1 << 30)
        let d = dispatcher([
            candidate(cpu), candidate(dense) { p in 4 * p.batch * p.queryHeads * p.queryLength * p.keyLength },
        ])
        #expect(d.decide(try problem(nq: 2048)).winner.backend == otherID)  // 128 MiB: fits
        let huge = try problem(hq: 1, nq: 65536, .init(causal: true))  // 16 GiB: does not
        let decision = d.decide(huge)
        #expect(decision.winner.backend == cpuID)
        let refused = try #require(decision.options.first { $0.backend == otherID })
        guard case .unsupported(let reason) = refused.support else {
            Issue.record("dense should be refused")
            return
        }
        #expect(reason.contains("working memory"))
        #expect(decision.reason.contains("not possible: \(otherID)"))
    }

    @Test func unsupportedBackendsAreNeverChosen() throws {
        let d = dispatcher([candidate(cpu), candidate(gpu, refusal: "no OpenCL platform")])
        let decision = d.decide(try problem(nq: 8192))
        #expect(decision.winner.backend == cpuID)
        #expect(decision.options[1].estimatedSeconds == nil)
        #expect(decision.reason.contains("\(gpuID) (no OpenCL platform)"))
    }

    @Test func missingOpenCLFallsBackToTheCPU() throws {
        // The real candidate list of a machine without OpenCL says why and picks BLAS.
        let p = try problem(nq: 512)
        let missing = DispatchCandidate(
            backend: OpenCLBackend(device: 99), profile: profile(.opencl(device: 99), gflops: 5000))
        let blas = DispatchCandidate(backend: BLASBackend(), profile: profile(.blas, gflops: 100))
        let d = dispatcher([candidate(profile(.naive, gflops: 2)), blas, missing])
        let decision = d.decide(p)
        #expect(decision.winner.backend == .blas)
        #expect(decision.reason.contains("not possible: \(BackendID.opencl(device: 99))"))
    }

    @Test func decodeIsMemoryBound() throws {
        // Equal GFLOP/s; one reads K/V twice as fast: it must win decode and tie on prefill.
        let a = profile(gpuID, gflops: 100, decodeGBps: 10)
        let b = profile(otherID, gflops: 100, decodeGBps: 20)
        let d = dispatcher([candidate(a), candidate(b)])
        let decode = try problem(hq: 32, hkv: 8, nq: 1, nk: 32768, d: 64)
        #expect(d.decide(decode).winner.backend == otherID)
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
        let (tf, tc, tw) = (
            Dispatcher.estimate(full, profile: cpu), Dispatcher.estimate(causal, profile: cpu),
            Dispatcher.estimate(window, profile: cpu)
        )
        #expect(abs(tc / tf - 0.5) < 0.01)
        #expect(tw < tc / 7)
    }

    /// `attnbench tune` stores which BLAS products were faster; the dispatcher builds BLAS with them.
    @Test(arguments: [BLASProducts.sgemm, .tiled, nil])
    func tunedBLASProductsAreUsed(_ products: BLASProducts?) throws {
        let configuration = AttentionConfiguration()
        var profile = MachineProfile.defaults(configuration: configuration)
        for index in profile.backends.indices where profile.backends[index].backend == .blas {
            profile.backends[index].blasProducts = products
        }
        let dispatcher = Dispatcher(configuration: configuration, profile: profile)
        let blas = try #require(try dispatcher.backend(.blas) as? BLASBackend)
        #expect(blas.products == products ?? .automatic)
        // And a stored profile says it in JSON, read back unchanged.
        let decoded = try JSONDecoder().decode(MachineProfile.self, from: JSONEncoder().encode(profile))
        #expect(decoded == profile)
    }

    @Test func curvesInterpolateInLogLength() {
        let c = ThroughputCurve([(128, 10), (2048, 50)])
        #expect(c.value(at: 64) == 10 && c.value(at: 4096) == 50)
        #expect(abs(c.value(at: 512) - 30) < 1e-9)  // halfway in log2
    }
}

@Suite struct DispatcherOverrides {
    let candidates = [
        candidate(profile(.naive, gflops: 2)), candidate(profile(.blas, gflops: 100)),
        candidate(profile(.opencl(device: 0), gflops: 50), refusal: "needs 3 GiB; device has 2 GiB"),
    ]
    var d: Dispatcher { dispatcher(candidates) }

    @Test func apiChoiceForcesABackendEvenWhenSlower() throws {
        let selection = try BackendSelection.select(.naive, for: try problem(nq: 64), dispatcher: d)
        #expect(selection.backend.id == .naive && selection.reason == "requested")
    }

    @Test func forcingAnUnsupportedBackendIsAnErrorWithTheReason() throws {
        let refusal = AttentionError.unsupported(
            backend: BackendID.opencl(device: 0).description, reason: "needs 3 GiB; device has 2 GiB")
        #expect(throws: refusal) {
            try BackendSelection.select(.opencl, for: try problem(nq: 64), dispatcher: d)
        }
        #expect(throws: refusal) {
            try BackendSelection.select(
                .auto, for: try problem(nq: 64),
                dispatcher: dispatcher(candidates, environment: ["ATTENTIONKIT_BACKEND": "opencl"]))
        }
        #expect(throws: AttentionError.self) {
            try BackendSelection.select(
                .auto, for: try problem(nq: 64),
                dispatcher: dispatcher(candidates, environment: ["ATTENTIONKIT_BACKEND": "tpu"]))
        }
    }

    @Test func environmentVariableOverridesAuto() throws {
        let forced = try BackendSelection.select(
            .auto, for: try problem(nq: 64),
            dispatcher: dispatcher(candidates, environment: ["ATTENTIONKIT_BACKEND": "naive"]))
        #expect(forced.backend.id == .naive && forced.reason.contains("ATTENTIONKIT_BACKEND"))
        let auto = try BackendSelection.select(
            .auto, for: try problem(nq: 64),
            dispatcher: dispatcher(candidates, environment: ["ATTENTIONKIT_BACKEND": "auto"]))
        #expect(auto.backend.id == .blas && auto.decision != nil)
    }
}

/// One name for a backend everywhere: parsing, printing, JSON, and the typed error for a bad name.
@Suite struct BackendIdentity {
    @Test func namesRoundTrip() throws {
        for id in [BackendID.naive, .blas, .opencl(device: 0), .opencl(device: 12)] {
            #expect(try BackendID(parsing: id.description) == id)
            #expect(BackendID(id.description) == id)
            let json = try JSONEncoder().encode([id])
            #expect(String(decoding: json, as: UTF8.self) == "[\"\(id)\"]")
            #expect(try JSONDecoder().decode([BackendID].self, from: json) == [id])
        }
        #expect(try BackendID(parsing: "opencl") == .opencl(device: 0))
        #expect(try BackendID(parsing: "BLAS") == .blas)
        #expect(try BackendChoice(parsing: "auto") == .auto)
        #expect(try BackendChoice(parsing: "opencl:2") == .opencl(device: 2))
    }

    @Test(arguments: ["tpu", "opencl:", "opencl:-1", "opencl:x", ""])
    func badNamesAreTypedErrors(_ text: String) {
        #expect(BackendID(text) == nil)
        #expect {
            try BackendID(parsing: text)
        } throws: { error in
            guard case .unknownBackend(let name, _) = error as? AttentionError else { return false }
            return name == text
        }
        #expect(throws: DecodingError.self) {
            try JSONDecoder().decode([BackendID].self, from: Data("[\"\(text)\"]".utf8))
        }
    }

    @Test func theRegimeIsDefinedOnce() throws {
        let limit = AttentionProblem.decodeQueryLimit
        #expect(try problem(nq: limit, nk: 4096).regime == .decodeLike)
        #expect(try problem(nq: limit + 1, nk: 4096).regime == .prefillLike)
    }

    @Test func configurationReadsTheEnvironmentItIsGiven() {
        let c = AttentionConfiguration(environment: [
            "ATTENTIONKIT_BACKEND": "opencl:1", "ATTENTIONKIT_CPU_ISA": "baseline", "ATTENTIONKIT_CACHE_DIR": "/tmp/ak",
            "ATTENTIONKIT_OPENCL_DISK_CACHE": "0", "ATTENTIONKIT_OPENCL_LIBRARY": "/x/libOpenCL.so",
        ])
        #expect((try? c.backendOverride.get()) == .opencl(device: 1))
        #expect((try? c.cpuISA.get()) == .baseline)
        #expect(c.cacheDirectory?.path == "/tmp/ak" && !c.openCLDiskCache && c.openCLLibraryPath == "/x/libOpenCL.so")
        let bad = AttentionConfiguration(environment: ["ATTENTIONKIT_BACKEND": "tpu", "HOME": "/home/u"])
        #expect((try? bad.backendOverride.get()) == nil)
        #expect(bad.cacheDirectory?.path == "/home/u/.cache/attentionkit")
        #expect(AttentionConfiguration(environment: ["XDG_CACHE_HOME": "/c"]).cacheDirectory?.path == "/c/attentionkit")
    }
}

@Suite struct MachineProfiles {
    @Test func defaultsCoverEveryBackendOfThisMachine() {
        let defaults = MachineProfile.defaults()
        #expect(defaults.profile(for: .naive) != nil && defaults.profile(for: .blas) != nil)
        let openCL = defaults.backends.filter { if case .opencl = $0.backend { return true } else { return false } }
        #expect(openCL.count == OpenCLRuntime.availableDevices.count)
        #expect(defaults.source == "built-in defaults")
    }

    @Test func profilesRoundTripThroughJSON() throws {
        var p = MachineProfile.defaults()
        p.backends[0].blasTilings = [.init(headDim: 64, value: BLASTiling(queryRows: 96, keyBlock: 384))]
        let data = try JSONEncoder().encode(p)
        #expect(try JSONDecoder().decode(MachineProfile.self, from: data) == p)
    }

    @Test func profilesAreSavedAndLoadedThroughTheConfiguration() throws {
        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("ak-profile-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: folder) }
        let configuration = AttentionConfiguration(cacheDirectory: folder)
        #expect(MachineProfile.load(configuration: configuration).source == "built-in defaults")
        var tuned = MachineProfile.defaults(configuration: configuration)
        tuned.source = "test"
        try tuned.save(configuration: configuration)
        #expect(MachineProfile.load(configuration: configuration) == tuned)
        // No cache folder: a typed error, not Foundation's.
        #expect(throws: AttentionError.self) { try tuned.save(configuration: AttentionConfiguration()) }
    }

    @Test func tunedBlockSizesAreApplied() throws {
        var blas = profile(.blas, gflops: 100)
        blas.blasTilings = [
            .init(headDim: 64, value: BLASTiling(queryRows: 96, keyBlock: 384)),
            .init(headDim: 128, value: BLASTiling(queryRows: 48, keyBlock: 256)),
        ]
        let machine = MachineProfile(identity: MachineProfile.identity(), source: "test", backends: [blas])
        let d = Dispatcher(configuration: AttentionConfiguration(), profile: machine)
        let decision = d.decide(try problem(nq: 512, d: 128))
        #expect(decision.winner.backend == .blas)
        #expect(decision.winner.detail.contains("tiles 48x256"))
        // Decode-like problems keep the table's tiling.
        let decode = d.decide(try problem(hq: 32, hkv: 8, nq: 1, nk: 4096, d: 128))
        let table = BLASTiling.default(headDim: 128, valueDim: 128, queryLength: 1)
        #expect(decode.winner.detail.contains("tiles \(table)"))
    }
}
