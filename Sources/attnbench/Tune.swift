import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TextTable

/// Measures this machine and stores the dispatcher's profile.
struct Tune: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure every backend on this machine and store the dispatcher's profile.",
        discussion: """
            Per backend and device: the best block sizes for head dimensions 64 and 128, GFLOP/s against sequence \
            length, decode K/V bandwidth, and per-call overhead. The profile is written to the cache folder \
            (~/.cache/attentionkit/profile.json) and used automatically by every later process on this machine.
            """
    )

    @Flag(help: "Fewer measurement points (about half the time).") var quick = false
    @Flag(help: "Measure and print, but do not store the profile.") var dryRun = false

    func run() throws {
        let defaults = MachineProfile.defaults()
        var measured: [BackendProfile] = []
        let candidates = defaults.backends.filter { $0.backend != .naive }
        let progress = Progress(total: candidates.count * (quick ? 6 : 9) + 1)
        for base in candidates {
            measured.append(try tuneBackend(base, progress: progress))
        }
        // The naive reference: one point is enough (it is flat and never a contender).
        guard var naive = defaults.profile(for: .naive) else {
            throw CLIError("the built-in profile lacks the naive backend")
        }
        let gflops = try measureGFLOPS(NaiveBackend(), shape: .make("t", hq: 2, nq: 256, d: 64), repetitions: 2)
        naive.gflops = [.init(headDim: 64, curve: ThroughputCurve([(1, gflops)]))]
        naive.decodeGBps = ThroughputCurve([(1, gflops / 2)])
        progress.step("naive")
        progress.finish()
        measured.insert(naive, at: 0)

        let formatter = ISO8601DateFormatter()
        let profile = MachineProfile(
            identity: MachineProfile.identity(),
            source: "measured by attnbench tune on \(formatter.string(from: Date()))", backends: measured)
        print(describe(profile))
        if !dryRun {
            try profile.save()
            print(
                "\nprofile written to \(MachineProfile.fileURL()?.path ?? "?"); used by every later attnbench "
                    + "and AttentionKit process on this machine"
            )
        }
    }

    private func tuneBackend(_ base: BackendProfile, progress: Progress) throws -> BackendProfile {
        var tuner = BackendTuner(id: base.backend, quick: quick)
        var profile = base
        var curves: [BackendProfile.HeadDimCurve] = []
        var tilings: [Tuned<BLASTiling>] = []
        var configs: [Tuned<OpenCLKernelConfig>] = []
        // 0. BLAS: SGEMM against the CPU variant's tiled products, where the variant has them.
        if base.backend == .blas {
            tuner.products = try tuner.bestProducts()
            profile.blasProducts = tuner.products
            progress.step("blas products: \(tuner.products)")
        }
        for d in [64, 128] {
            // 1. Block sizes, then 2. throughput against sequence length with them.
            let best = try tuner.bestBlockSizes(headDim: d)
            if let tiling = best.tiling { tilings.append(.init(headDim: d, value: tiling)) }
            if let config = best.config { configs.append(.init(headDim: d, value: config)) }
            progress.step("\(base.backend) D\(d) block sizes")
            let tuned = tuner.backend(tiling: best.tiling, config: best.config)
            curves.append(.init(headDim: d, curve: try tuner.throughput(tuned, headDim: d, progress: progress)))
        }
        profile.gflops = curves
        profile.blasTilings = tilings.isEmpty ? nil : tilings
        profile.openclConfigs = configs.isEmpty ? nil : configs
        // 3. Decode bandwidth and per-call overhead.
        profile.decodeGBps = try tuner.decodeBandwidth()
        progress.step("\(base.backend) decode")
        profile.overheadSeconds = try measureSeconds(
            tuner.backend(), shape: .make("tiny", hq: 1, nq: 1, d: 64), repetitions: 20)
        progress.step("\(base.backend) overhead")
        return profile
    }

    private func describe(_ profile: MachineProfile) -> String {
        struct Line { var backend, blocks, d64, d128, decode, overhead: String }
        let lines = profile.backends.map { b -> Line in
            func curve(_ d: Int) -> String {
                guard let c = b.gflops.first(where: { $0.headDim == d })?.curve else { return "-" }
                return c.points.map {
                    "\($0.keyLength >= 1024 ? "\($0.keyLength / 1024)k" : "\($0.keyLength)"):\(format($0.value))"
                }.joined(separator: " ")
            }
            let blocks =
                (b.blasProducts.map { ["\($0) products"] } ?? [])
                + (b.blasTilings?.map { "D\($0.headDim) \($0.value)" } ?? [])
                + (b.openclConfigs?.map {
                    "D\($0.headDim) vec\($0.value.vectorWidth) rows\($0.value.rows) "
                        + "wg\($0.value.workGroup)\($0.value.useLocalMemory ? " local" : "")"
                } ?? [])
            return Line(
                backend: b.backend.description, blocks: blocks.joined(separator: ", "), d64: curve(64),
                d128: curve(128),
                decode: b.decodeGBps.points.map {
                    "\($0.keyLength >= 1024 ? "\($0.keyLength / 1024)k" : "\($0.keyLength)"):\(format($0.value))"
                }.joined(separator: " "),
                overhead: format(b.overheadSeconds * 1e6))
        }
        let table = TextTable<Line> {
            [
                Column(title: "backend", value: $0.backend), Column(title: "block sizes", value: $0.blocks),
                Column(title: "GFLOP/s by N, D64", value: $0.d64), Column(title: "GFLOP/s by N, D128", value: $0.d128),
                Column(title: "decode GB/s by Nk", value: $0.decode),
                Column(title: "overhead us", value: $0.overhead, align: .right),
            ]
        }
        var text = "Profile (\(profile.source)):\n" + (table.string(for: lines) ?? "")
        // Crossovers the profile implies on the standard shapes.
        let dispatcher = Dispatcher(profile: profile)
        var picks: [String] = []
        for shape in ShapeSpec.standard {
            if let problem = try? shape.problem() {
                picks.append("\(shape.name) -> \(dispatcher.decide(problem).winner.backend)")
            }
        }
        text += "\n\ndispatcher picks: " + picks.joined(separator: ", ")
        // Crossovers: where the estimated winner changes as the sequence grows.
        func crossovers(_ label: String, _ make: (Int) -> ShapeSpec) -> String {
            var segments: [String] = []
            var current: (winner: BackendID, from: Int)?
            for exponent in 4...17 {
                let n = 1 << exponent
                guard let problem = try? make(n).problem() else { continue }
                let winner = dispatcher.decide(problem).winner.backend
                if winner != current?.winner {
                    if let current { segments.append("\(current.winner) for N < \(n)") }
                    current = (winner, n)
                }
            }
            if let current { segments.append("\(current.winner) from N = \(current.from)") }
            return "\(label): " + segments.joined(separator: ", ")
        }
        text +=
            "\ncrossovers (" + "estimated):\n  "
            + crossovers("prefill B1 H8 D64", { .make("p", hq: 8, nq: $0, d: 64) }) + "\n  "
            + crossovers("causal B1 H8 D64", { .make("c", hq: 8, nq: $0, d: 64, causal: true) }) + "\n  "
            + crossovers("decode B1 Hq32 Hkv8 Nq1 D128, by Nk", { .make("d", hq: 32, hkv: 8, nq: 1, nk: $0, d: 128) })
        return text
    }
}

/// Median seconds of `repetitions` runs of `shape` on `backend` (after a warm-up).
func measureSeconds(_ backend: any AttentionBackend, shape: ShapeSpec, repetitions: Int) throws -> Double {
    let problem = try shape.problem()
    let q = try Tensor.random(shape: problem.queryShape, seed: 1)
    let k = try Tensor.random(shape: problem.keyShape, seed: 2)
    let v = try Tensor.random(shape: problem.valueShape, seed: 3)
    let times = try timeCalls(repetitions: repetitions, budget: 1.5) {
        _ = try backend.attention(problem, query: q, key: k, value: v)
    }
    return times[times.count / 2]
}

func measureGFLOPS(_ backend: any AttentionBackend, shape: ShapeSpec, repetitions: Int) throws -> Double {
    try shape.problem().flops / measureSeconds(backend, shape: shape, repetitions: repetitions) / 1e9
}

/// Measures one backend (BLAS or an OpenCL device) for `attnbench tune`.
private struct BackendTuner {
    let id: BackendID
    let quick: Bool
    /// The BLAS products every measurement uses.
    var products = BLASProducts.automatic

    var device: Int? {
        if case .opencl(let device) = id { return device }
        return nil
    }

    /// The backend with given block sizes (nil: its own choice).
    func backend(tiling: BLASTiling? = nil, config: OpenCLKernelConfig? = nil) -> any AttentionBackend {
        guard let device else { return BLASBackend(tiling: tiling, products: products) }
        return OpenCLBackend(device: device, config: config)
    }

    /// The fastest block sizes on full and causal probes together (larger query blocks skip fewer
    /// causal blocks): the total time of both probes, as GFLOP/s.
    func bestBlockSizes(headDim d: Int) throws -> (tiling: BLASTiling?, config: OpenCLKernelConfig?) {
        let probe = ShapeSpec.make("probe", hq: 8, nq: 1024, d: d)
        let causalProbe = ShapeSpec.make("probe-causal", hq: 8, nq: 1024, d: d, causal: true)
        let flops = try probe.problem().flops + causalProbe.problem().flops
        func score(_ backend: any AttentionBackend) throws -> Double {
            let seconds =
                try measureSeconds(backend, shape: probe, repetitions: 3)
                + measureSeconds(backend, shape: causalProbe, repetitions: 3)
            return flops / seconds / 1e9
        }
        guard let device else {
            let candidates = [(128, 512), (256, 256), (128, 256), (64, 256), (256, 512)].map {
                BLASTiling(queryRows: $0.0, keyBlock: $0.1)
            }
            let scored = try candidates.map { ($0, try score(BLASBackend(tiling: $0, products: products))) }
            return (scored.max { $0.1 < $1.1 }?.0, nil)
        }
        guard let table = OpenCLBackend(device: device).kernelConfig(for: try probe.problem()) else {
            return (nil, nil)
        }
        if let tiles = table.tiles {
            // The GPU kernel: the table's tiles and neighbours that fit this device.
            let shapes = [
                (64, 32, 16, 128), (32, 32, 16, 128), (64, 64, 16, 256), (128, 32, 16, 256), (32, 16, 8, 64),
                (16, 32, 16, 64), (64, 32, 32, 256),
            ]
            let problems = [try probe.problem(), try causalProbe.problem()]
            let variants =
                ([tiles] + shapes.map { GPUTiles(rows: $0.0, keys: $0.1, rowThreads: $0.2, workGroup: $0.3) })
                .map { candidate in
                    var c = table
                    c.tiles = candidate
                    return c
                }
                .filter { c in
                    problems.allSatisfy { OpenCLBackend(device: device, config: c).support(for: $0).isSupported }
                }
            let scored = try variants.map { ($0, try score(OpenCLBackend(device: device, config: $0))) }
            return (nil, scored.max { $0.1 < $1.1 }?.0)
        }
        let gpu = OpenCLRuntime.availableDevices[device].info.isGPU
        let shapes =
            gpu
            ? [(4, 2, 64, true), (4, 4, 64, true), (8, 2, 64, true), (4, 2, 128, true), (4, 2, 64, false)]
            : [(16, 4, 4, false), (16, 6, 4, false), (16, 8, 4, false), (16, 4, 1, false), (8, 8, 4, false)]
        let variants = shapes.map { vec, rows, group, local in
            var c = table
            c.vectorWidth = vec
            c.rows = rows
            c.workGroup = group
            c.useLocalMemory = local
            return c
        }
        let scored = try variants.map { ($0, try score(OpenCLBackend(device: device, config: $0))) }
        return (nil, scored.max { $0.1 < $1.1 }?.0)
    }

    /// `.sgemm` or `.tiled`, whichever ran the D64 and D128 prefill probes (full and causal) faster;
    /// `.automatic` where the CPU variant has no tiled products worth trying (baseline).
    func bestProducts() throws -> BLASProducts {
        guard let isa = BLASBackend().isa, isa != .baseline else { return .automatic }
        var seconds: [BLASProducts: Double] = [:]
        for products in [BLASProducts.sgemm, .tiled] {
            let backend = BLASBackend(products: products)
            for d in [64, 128] {
                for causal in [false, true] {
                    let shape = ShapeSpec.make("probe", hq: 8, nq: 1024, d: d, causal: causal)
                    seconds[products, default: 0] += try measureSeconds(backend, shape: shape, repetitions: 3)
                }
            }
        }
        return (seconds[.sgemm] ?? 0) < (seconds[.tiled] ?? 0) ? .sgemm : .tiled
    }

    /// GFLOP/s against sequence length.
    func throughput(_ backend: any AttentionBackend, headDim d: Int, progress: Progress) throws -> ThroughputCurve {
        var points: [(Int, Double)] = []
        for n in quick ? [128, 1024, 4096] : [128, 512, 1024, 4096] {
            let heads = n >= 4096 ? 4 : (n <= 128 ? 32 : 8)
            points.append(
                (n, try measureGFLOPS(backend, shape: .make("n\(n)", hq: heads, nq: n, d: d), repetitions: 3)))
            if !quick || n == 4096 { progress.step("\(id) D\(d) N\(n)") }
        }
        return ThroughputCurve(points)
    }

    /// K/V GB/s of decode (Hq 32, Hkv 8, D 128) against key length.
    func decodeBandwidth() throws -> ThroughputCurve {
        var decode: [(Int, Double)] = []
        for nk in quick ? [32768] : [4096, 32768] {
            let shape = ShapeSpec.make("decode", hq: 32, hkv: 8, nq: 1, nk: nk, d: 128)
            let seconds = try measureSeconds(backend(), shape: shape, repetitions: 5)
            decode.append((nk, try shape.problem().keyValueBytes / seconds / 1e9))
        }
        return ThroughputCurve(decode)
    }
}
