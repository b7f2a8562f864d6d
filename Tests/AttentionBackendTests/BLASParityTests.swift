import AttentionBLAS
import AttentionCore
import AttentionMachine
import AttentionVerification
import Foundation
import Testing

/// The BLAS backend against the float64 reference, with every CPU kernel variant this machine runs.
@Suite struct BLASParity {
    let blas = BLASBackend()

    @Test(arguments: CPUISA.supported, Sweep.cases())
    func sweep(_ isa: CPUISA, _ c: ParityCase) throws {
        let backend = BLASBackend(isa: isa)
        #expect(backend.isa == isa)
        try expectParity(backend, c)
    }

    @Test(arguments: CPUISA.supported, Sweep.featureCases)
    func features(_ isa: CPUISA, _ c: ParityCase) throws {
        try expectParity(BLASBackend(isa: isa), c)
    }

    /// The sweeps above take the default products (the register-tiled ones on AVX2/AVX-512/NEON,
    /// SGEMM on the baseline variant): here the other choice of each, on every case.
    @Test(arguments: [(CPUISA.best, BLASProducts.sgemm), (CPUISA.baseline, BLASProducts.tiled)])
    func otherProducts(_ isa: CPUISA, _ products: BLASProducts) throws {
        let backend = BLASBackend(isa: isa, products: products)
        for c in Sweep.cases() + Sweep.featureCases { try expectParity(backend, c) }
    }

    /// Register-tile edges: row counts around the micro-tile heights, key blocks not a multiple of
    /// 16 or 32, value widths of 1-8 vectors, head dims past the packing's 256-float chunk. (fp16/bf16
    /// K/V through the tiled products: LayoutTests, whose shapes have Dv a multiple of 16.)
    @Test(arguments: CPUISA.supported)
    func tiledProductEdges(_ isa: CPUISA) throws {
        let backend = BLASBackend(isa: isa, products: .tiled)
        for (nq, nk, d, dv) in [
            (1, 17, 3, 16), (5, 33, 16, 32), (7, 47, 24, 48), (9, 64, 64, 64), (13, 95, 40, 80), (25, 130, 64, 96),
            (49, 300, 128, 112), (130, 517, 80, 128), (33, 33, 300, 16),
        ] {
            let c = ParityCase(
                batch: 1, heads: (4, 2), nq: nq, nk: nk, d: d, dv: dv, options: .init(causal: nq % 2 == 1))
            #expect(backend.usesTiledProducts(try c.problem()))
            try expectParity(backend, c)
        }
    }

    /// Prefill whose keys are packed once per call and shared by every item (`SharedKeys`): odd
    /// key counts (the packed rows' zero padding), items starting at keys that are not a multiple
    /// of 16 (windows), head dims past the last whole vector, GQA, masks and softcap. (Layouts and
    /// fp16/bf16 K through the shared packing: the layout sweep's "causal blocks" case.)
    @Test(arguments: CPUISA.supported.filter { $0 != .baseline })
    func keysPackedOncePerCall(_ isa: CPUISA) throws {
        let backend = BLASBackend(isa: isa)
        let additive = (0..<(100 * 50)).map { Float(($0 * 7) % 5) - 2 }
        for c in [
            ParityCase(
                batch: 2, heads: (8, 2), nq: 200, nk: 777, d: 64, dv: 64,
                options: .init(causal: true, window: .init(left: 300, right: 0))),
            ParityCase(batch: 1, heads: (4, 4), nq: 130, nk: 1000, d: 80, dv: 48, amplitude: 4),
            ParityCase(
                batch: 1, heads: (6, 3), nq: 100, nk: 50, d: 32, dv: 32,
                options: .init(softcap: 20, mask: try AttentionMask(shape: [100, 50], additive: additive))),
        ] {
            let problem = try c.problem()
            let shared = try #require(backend.sharedKeyBytes(problem), "\(c) packs its keys per item")
            #expect(backend.workspaceBytes(for: problem) >= shared)
            try expectParity(backend, c)
        }
        // Decode and single-item problems pack per block.
        #expect(backend.sharedKeyBytes(try ParityCase(heads: (8, 2), nq: 1, nk: 4096, d: 64, dv: 64).problem()) == nil)
    }

    @Test func fullyMaskedRowsAreExactlyZero() throws {
        // Rows 0..<3 see nothing through the mask; row 3 sees everything.
        let nq = 4
        let nk = 50
        let allowed = (0..<(nq * nk)).map { $0 / nk == 3 }
        let c = ParityCase(
            batch: 1, heads: (2, 1), nq: nq, nk: nk, d: 8, dv: 8,
            options: .init(mask: try AttentionMask(shape: [nq, nk], allowed: allowed)))
        let r = try expectParity(blas, c)
        for h in 0..<2 {
            for i in 0..<3 {
                #expect(r.logSumExp[0, h, i] == -.infinity)
                for c in 0..<8 { #expect(r.output[0, h, i, c].bitPattern == 0) }
            }
        }
        // An empty window on every row: all zero, no NaN.
        let none = ParityCase(
            batch: 1, heads: (1, 1), nq: 5, nk: 5, d: 4, dv: 4,
            options: .init(
                causal: true, window: .init(left: -1, right: 0),
                mask: try AttentionMask(shape: [5, 5], additive: Array(repeating: -.infinity, count: 25))))
        let z = try expectParity(blas, none)
        #expect(z.output.storage.allSatisfy { $0 == 0 })
    }

    @Test(arguments: [
        BLASTiling(queryRows: 1, keyBlock: 16), BLASTiling(queryRows: 7, keyBlock: 48),
        BLASTiling(queryRows: 300, keyBlock: 2048), BLASTiling(queryRows: 64, keyBlock: 33),
    ])
    func anyTilingGivesTheSameContract(_ tiling: BLASTiling) throws {
        let backend = BLASBackend(tiling: tiling)
        for c in [
            ParityCase(
                batch: 2, heads: (8, 2), nq: 130, nk: 777, d: 80, dv: 64,
                options: .init(causal: true, window: .init(left: 100, right: 2))),
            ParityCase(batch: 1, heads: (4, 1), nq: 3, nk: 300, d: 64, dv: 64, options: .init(softcap: 10)),
            ParityCase(
                batch: 1, heads: (2, 2), nq: 65, nk: 65, d: 32, dv: 32,
                options: .init(mask: try AttentionMask(shape: [65, 65], allowed: (0..<4225).map { $0 % 3 != 0 }))),
        ] {
            try expectParity(backend, c)
        }
    }
}

/// Robustness: poisoned rows stay contained, results are reproducible, buffers are not over-read.
@Suite struct BLASRobustness {
    let c = ParityCase(
        batch: 2, heads: (8, 2), nq: 77, nk: 300, d: 64, dv: 48,
        options: .init(causal: true, window: .init(left: 90, right: 4)))

    @Test func naNInOneQueryRowLeavesOtherRowsBitwiseUnchanged() throws {
        var (q, k, v) = try c.inputs()
        let blas = BLASBackend()
        let clean = try blas.attention(query: q, key: k, value: v, options: c.options)
        q[1, 3, 40, 5] = .nan
        let dirty = try blas.attention(query: q, key: k, value: v, options: c.options)
        let poisonedRow = (1 * 8 + 3) * 77 + 40
        for row in 0..<clean.logSumExp.count {
            let a = clean.output.storage[row * 48..<(row + 1) * 48].map(\.bitPattern)
            let b = dirty.output.storage[row * 48..<(row + 1) * 48].map(\.bitPattern)
            if row == poisonedRow {
                #expect(dirty.output.storage[row * 48..<(row + 1) * 48].allSatisfy { $0.isNaN })
            } else {
                #expect(a == b, "row \(row) changed")
                #expect(clean.logSumExp.storage[row].bitPattern == dirty.logSumExp.storage[row].bitPattern)
            }
        }
    }

    @Test func repeatedRunsAndThreadCountsAreBitwiseEqual() throws {
        let (q, k, v) = try c.inputs()
        let runs = try [
            BLASBackend(threads: 2), BLASBackend(threads: 2), BLASBackend(threads: 1), BLASBackend(threads: 3),
        ].map {
            try $0.attention(query: q, key: k, value: v, options: c.options)
        }
        for r in runs.dropFirst() {
            #expect(r.output.storage.map(\.bitPattern) == runs[0].output.storage.map(\.bitPattern))
            #expect(r.logSumExp.storage.map(\.bitPattern) == runs[0].logSumExp.storage.map(\.bitPattern))
        }
    }

    @Test func inputsPaddedWithNaNGiveBitwiseTheSameOutput() throws {
        try expectPaddedRunMatches(BLASBackend(), c)
    }

    @Test func workPlanCoversEveryRowExactlyOnce() throws {
        for (q, kv, nq) in [(8, 2, 1), (8, 2, 77), (32, 8, 1), (1, 1, 1000), (8, 1, 3)] {
            let p = try AttentionProblem(query: [2, q, nq, 64], key: [2, kv, 50, 64], value: [2, kv, 50, 64])
            let tiling = BLASTiling.default(headDim: 64, valueDim: 64, queryLength: nq)
            var seen = [Int](repeating: 0, count: 2 * q * nq)
            for item in WorkItem.plan(p, tiling: tiling, threads: 2) {
                #expect(
                    item.headCount >= 1 && item.head / p.groupSize == (item.head + item.headCount - 1) / p.groupSize)
                #expect(item.rows <= tiling.queryRows)
                for h in item.head..<item.head + item.headCount {
                    for i in item.queryStart..<item.queryEnd { seen[(item.batch * q + h) * nq + i] += 1 }
                }
            }
            #expect(seen.allSatisfy { $0 == 1 })
        }
    }
}

/// The vectorised exp and tanh of every CPU kernel variant this machine runs.
@Suite struct FastMathAccuracy {
    @Test(arguments: CPUISA.supported)
    func expMatchesLibmAcrossTheRange(_ isa: CPUISA) throws {
        let kernels = try CPUKernels(isa: isa)
        let x = stride(from: Float(-87), to: 88, by: 0.0137).map { $0 }
        for (xi, e) in zip(x, kernels.exp(x)) {
            let ref = exp(Double(xi))
            #expect(abs(Double(e) - ref) <= 3e-7 * ref, "\(isa) exp(\(xi)) = \(e)")
        }
    }

    @Test(arguments: CPUISA.supported)
    func expEdgeCases(_ isa: CPUISA) throws {
        // 16 lanes plus a 3-element tail, which goes through the padded path.
        let e = try CPUKernels(isa: isa).exp([
            -.infinity, -1000, -87.4, .nan, 0, 89, .infinity, -0.0, 1, 2, 3, 4, 5, 6, 7, 8, .nan, 0, -.infinity,
        ])
        #expect(e[0] == 0 && e[1] == 0 && e[2] == 0)
        #expect(e[3].isNaN && e[16].isNaN)
        #expect(e[4] == 1 && e[7] == 1 && e[17] == 1 && e[18] == 0)
        #expect(e[5].isFinite && e[5] > 1e38)
        #expect(e[6] > 1e38)
    }

    /// The softmax step's weights e^(s - max) (its own exp on AVX-512) against libm, over the
    /// range of weights that matter and with -inf (masked) and NaN (poisoned) scores.
    @Test(arguments: CPUISA.supported)
    func softmaxWeightsMatchLibm(_ isa: CPUISA) throws {
        let kernels = try CPUKernels(isa: isa)
        var random = SplitMix64(seed: 7)
        for width in [1, 15, 16, 33, 517] {
            let scores = (0..<width).map { _ in Float.random(in: -100...20, using: &random) }
            let (weights, sum, max) = kernels.softmaxStep(scores)
            let top = Double(scores.max()!)
            #expect(max == Float(top))
            var expected = 0.0
            for (s, w) in zip(scores, weights) {
                // Against e^d of the fp32 difference d = s - max the kernels compute.
                let ref = exp(Double(s - Float(top)))
                expected += ref
                // Weights below 2^-125 of the largest may be flushed to zero.
                #expect(abs(Double(w) - ref) <= 4e-7 * ref + 3e-38, "\(isa) e^(\(s) - \(top)) = \(w)")
            }
            #expect(abs(Double(sum) - expected) <= 1e-6 * expected)
        }
        let masked = kernels.softmaxStep([-.infinity, 0, -.infinity, -3] + Array(repeating: -.infinity, count: 14))
        #expect(masked.weights[0] == 0 && masked.weights[2] == 0 && masked.weights[1] == 1)
        #expect(masked.weights.dropFirst(4).allSatisfy { $0 == 0 })
        #expect(kernels.softmaxStep([1, .nan, 2]).sum.isNaN)
    }

    @Test(arguments: CPUISA.supported)
    func tanhMatchesLibm(_ isa: CPUISA) throws {
        let kernels = try CPUKernels(isa: isa)
        let x = stride(from: Float(-12), to: 12, by: 0.011).map { $0 }
        for (xi, t) in zip(x, kernels.tanh(x)) {
            #expect(abs(Double(t) - tanh(Double(xi))) <= 1e-6, "\(isa) tanh(\(xi))")
        }
        let edges = kernels.tanh([.nan, .infinity, -.infinity, 0, -0.0])
        #expect(edges[0].isNaN && edges[1] == 1 && edges[2] == -1 && edges[3] == 0 && edges[4] == 0)
    }
}

/// Choosing the CPU kernel variant: by value, by the environment, and refusals with their reasons.
@Suite struct CPUKernelSelection {
    @Test func theBestVariantIsSupportedAndIsTheDefault() throws {
        #expect(CPUISA.best.isSupported)
        #expect(CPUISA.supported.contains(.best))
        let chosen = try CPUKernels.resolve(AttentionConfiguration(environment: [:])).get()
        #expect(chosen.isa == .best)
        #expect(BLASBackend(isa: nil).isa == (try? CPUISA.resolve(.process).get()))
        #if arch(x86_64)
            #expect(CPUISA.baseline.isSupported)
            #expect(!CPUISA.neon.isSupported)
        #elseif arch(arm64)
            #expect(CPUISA.best == .neon)
        #endif
    }

    @Test(arguments: CPUISA.supported)
    func theEnvironmentForcesAVariant(_ isa: CPUISA) throws {
        let environment = [AttentionConfiguration.cpuISAVariable: isa.rawValue]
        let chosen = try CPUKernels.resolve(AttentionConfiguration(environment: environment)).get()
        #expect(chosen.isa == isa)
    }

    @Test func unknownAndUnsupportedNamesAreErrorsWithTheReason() throws {
        let variable = AttentionConfiguration.cpuISAVariable
        let unknown = CPUKernels.resolve(AttentionConfiguration(environment: [variable: "sse9"]))
        guard case .failure(.invalidConfiguration(let setting, let value, let reason)) = unknown else {
            Issue.record("expected a configuration error, got \(unknown)")
            return
        }
        #expect(setting == variable && value == "sse9" && reason.contains("avx512"))
        for isa in CPUISA.allCases where !isa.isSupported {
            let refused = CPUKernels.resolve(AttentionConfiguration(environment: [variable: isa.rawValue]))
            guard case .failure(let error) = refused else {
                Issue.record("\(isa) is not supported here but was accepted")
                continue
            }
            #expect(error.description.contains(isa.unsupportedReason ?? "?"))
            // A backend configured for it says why and refuses to run.
            let backend = BLASBackend(configuration: AttentionConfiguration(cpuISA: isa))
            let p = try AttentionProblem(query: [1, 1, 4, 8], key: [1, 1, 4, 8], value: [1, 1, 4, 8])
            #expect(!backend.support(for: p).isSupported)
            let q = try Tensor(shape: [1, 1, 4, 8], repeating: 0.5)
            #expect(throws: AttentionError.self) { try backend.attention(query: q, key: q, value: q) }
        }
    }

    #if arch(x86_64)
        @Test func eachVariantRunsItsOwnCode() throws {
            // Fused (AVX2, AVX-512) and unfused (baseline) multiply-adds round differently somewhere in
            // a long range of exp arguments: a variant that silently ran another's code would not.
            guard CPUISA.avx2.isSupported else { return }
            let x = stride(from: Float(-80), to: 80, by: 0.0071).map { $0 }
            let baseline = try CPUKernels(isa: .baseline).exp(x).map(\.bitPattern)
            let avx2 = try CPUKernels(isa: .avx2).exp(x).map(\.bitPattern)
            #expect(baseline != avx2)
        }
    #endif
}
