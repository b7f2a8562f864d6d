import AttentionBLAS
import AttentionCore
import Foundation
import Testing

/// The BLAS backend against the float64 reference.
@Suite struct BLASParity {
    let blas = BLASBackend()

    @Test(arguments: Sweep.cases())
    func sweep(_ c: ParityCase) throws {
        try expectParity(blas, c)
    }

    static let featureCases: [ParityCase] = [
        ParityCase(batch: 2, heads: (8, 2), nq: 130, nk: 130, d: 64, dv: 64, amplitude: 20, label: "large logits"),
        ParityCase(batch: 1, heads: (4, 4), nq: 65, nk: 777, d: 128, dv: 128, options: .init(causal: true), amplitude: 20, label: "large logits causal"),
        ParityCase(batch: 1, heads: (8, 1), nq: 1, nk: 777, d: 256, dv: 64, label: "MQA decode"),
        ParityCase(batch: 2, heads: (8, 2), nq: 2, nk: 1030, d: 128, dv: 128, options: .init(causal: true), label: "GQA decode two tokens"),
        ParityCase(batch: 1, heads: (4, 4), nq: 130, nk: 7, d: 32, dv: 32, options: .init(causal: true), label: "Nq > Nk causal: early rows see nothing"),
        ParityCase(batch: 1, heads: (1, 1), nq: 64, nk: 64, d: 32, dv: 32, options: .init(window: .init(left: 0, right: 0)), label: "diagonal only"),
        ParityCase(batch: 1, heads: (2, 2), nq: 64, nk: 200, d: 16, dv: 16, options: .init(window: .init(left: 500, right: -1)), label: "window wider than keys"),
        ParityCase(batch: 1, heads: (1, 1), nq: 600, nk: 600, d: 3, dv: 200, options: .init(causal: true), label: "many key blocks, odd dims"),
        ParityCase(batch: 1, heads: (1, 1), nq: 33, nk: 1500, d: 512, dv: 512, options: .init(softcap: 30, causal: true, window: .init(left: 700, right: 0)), label: "D 512 sliding window"),
    ]

    @Test(arguments: featureCases)
    func features(_ c: ParityCase) throws {
        try expectParity(blas, c)
    }

    @Test func fullyMaskedRowsAreExactlyZero() throws {
        // Rows 0..<3 see nothing through the mask; row 3 sees everything.
        let nq = 4, nk = 50
        let allowed = (0..<(nq * nk)).map { $0 / nk == 3 }
        let c = ParityCase(batch: 1, heads: (2, 1), nq: nq, nk: nk, d: 8, dv: 8,
                           options: .init(mask: try AttentionMask(shape: [nq, nk], allowed: allowed)))
        let r = try expectParity(blas, c)
        for h in 0..<2 {
            for i in 0..<3 {
                #expect(r.logSumExp[0, h, i] == -.infinity)
                for c in 0..<8 { #expect(r.output[0, h, i, c].bitPattern == 0) }
            }
        }
        // An empty window on every row: all zero, no NaN.
        let none = ParityCase(batch: 1, heads: (1, 1), nq: 5, nk: 5, d: 4, dv: 4,
                              options: .init(causal: true, window: .init(left: -1, right: 0), mask: try AttentionMask(shape: [5, 5], additive: Array(repeating: -.infinity, count: 25))))
        let z = try expectParity(blas, none)
        #expect(z.output.storage.allSatisfy { $0 == 0 })
    }

    @Test(arguments: [BLASTiling(queryRows: 1, keyBlock: 16), BLASTiling(queryRows: 7, keyBlock: 48),
                      BLASTiling(queryRows: 300, keyBlock: 2048), BLASTiling(queryRows: 64, keyBlock: 33)])
    func anyTilingGivesTheSameContract(_ tiling: BLASTiling) throws {
        let backend = BLASBackend(tiling: tiling)
        for c in [ParityCase(batch: 2, heads: (8, 2), nq: 130, nk: 777, d: 80, dv: 64, options: .init(causal: true, window: .init(left: 100, right: 2))),
                  ParityCase(batch: 1, heads: (4, 1), nq: 3, nk: 300, d: 64, dv: 64, options: .init(softcap: 10)),
                  ParityCase(batch: 1, heads: (2, 2), nq: 65, nk: 65, d: 32, dv: 32,
                             options: .init(mask: try AttentionMask(shape: [65, 65], allowed: (0..<4225).map { $0 % 3 != 0 })))] {
            try expectParity(backend, c)
        }
    }
}

/// Robustness: poisoned rows stay contained, results are reproducible, buffers are not over-read.
@Suite struct BLASRobustness {
    let c = ParityCase(batch: 2, heads: (8, 2), nq: 77, nk: 300, d: 64, dv: 48, options: .init(causal: true, window: .init(left: 90, right: 4)))

    @Test func naNInOneQueryRowLeavesOtherRowsBitwiseUnchanged() throws {
        var (q, k, v) = try c.inputs()
        let blas = BLASBackend()
        let clean = try blas.attention(query: q, key: k, value: v, options: c.options)
        q[1, 3, 40, 5] = .nan
        let dirty = try blas.attention(query: q, key: k, value: v, options: c.options)
        let poisonedRow = (1 * 8 + 3) * 77 + 40
        for row in 0..<clean.logSumExp.count {
            let a = clean.output.storage[row * 48 ..< (row + 1) * 48].map(\.bitPattern)
            let b = dirty.output.storage[row * 48 ..< (row + 1) * 48].map(\.bitPattern)
            if row == poisonedRow {
                #expect(dirty.output.storage[row * 48 ..< (row + 1) * 48].allSatisfy { $0.isNaN })
            } else {
                #expect(a == b, "row \(row) changed")
                #expect(clean.logSumExp.storage[row].bitPattern == dirty.logSumExp.storage[row].bitPattern)
            }
        }
    }

    @Test func repeatedRunsAndThreadCountsAreBitwiseEqual() throws {
        let (q, k, v) = try c.inputs()
        let runs = try [BLASBackend(threads: 2), BLASBackend(threads: 2), BLASBackend(threads: 1), BLASBackend(threads: 3)].map {
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
                #expect(item.headCount >= 1 && item.head / p.groupSize == (item.head + item.headCount - 1) / p.groupSize)
                #expect(item.rows <= tiling.queryRows)
                for h in item.head ..< item.head + item.headCount {
                    for i in item.queryStart ..< item.queryEnd { seen[(item.batch * q + h) * nq + i] += 1 }
                }
            }
            #expect(seen.allSatisfy { $0 == 1 })
        }
    }
}

/// The vectorised exp and tanh used by the softmax.
@Suite struct FastMathAccuracy {
    @Test func expMatchesLibmAcrossTheRange() {
        var x: Float = -87
        while x < 88 {
            let lanes = SIMD16<Float>((0..<16).map { x + Float($0) * 0.0137 })
            let e = fastExp(lanes)
            for l in 0..<16 {
                let ref = exp(Double(lanes[l]))
                #expect(abs(Double(e[l]) - ref) <= 3e-7 * ref, "exp(\(lanes[l]))")
            }
            x += 0.731
        }
    }

    @Test func expEdgeCases() {
        let e = fastExp(SIMD16<Float>(-.infinity, -1000, -87.4, .nan, 0, 89, .infinity, -0.0, 1, 2, 3, 4, 5, 6, 7, 8))
        #expect(e[0] == 0 && e[1] == 0 && e[2] == 0)
        #expect(e[3].isNaN)
        #expect(e[4] == 1 && e[7] == 1)
        #expect(e[5].isFinite && e[5] > 1e38)
        #expect(e[6] > 1e38)
    }

    @Test func tanhMatchesLibm() {
        var x: Float = -12
        while x < 12 {
            let lanes = SIMD16<Float>((0..<16).map { x + Float($0) * 0.011 })
            let t = fastTanh(lanes)
            for l in 0..<16 { #expect(abs(Double(t[l]) - tanh(Double(lanes[l]))) <= 1e-6) }
            x += 0.37
        }
        #expect(fastTanh(SIMD16(repeating: .nan))[0].isNaN)
        #expect(fastTanh(SIMD16(repeating: .infinity))[0] == 1)
        #expect(fastTanh(SIMD16(repeating: -.infinity))[0] == -1)
    }

    @Test func reductions() {
        let v = SIMD16<Float>((0..<16).map { Float(($0 * 7) % 16) - 3 })
        #expect(horizontalMax(v) == 12)
        #expect(horizontalSum(v) == (0..<16).map { Float($0) - 3 }.reduce(0, +))
        #expect(laneMax(v, SIMD16(repeating: 0)) == SIMD16((0..<16).map { max(Float(($0 * 7) % 16) - 3, 0) }))
    }
}
