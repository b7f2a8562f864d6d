import AttentionCore
import Foundation
import Testing

/// Runs the naive backend on small literal inputs.
func naive(
    q: [Float], qShape: [Int], k: [Float], kShape: [Int], v: [Float], vShape: [Int],
    options: AttentionOptions = .init()
) throws -> AttentionResult {
    try NaiveBackend().attention(
        query: Tensor(shape: qShape, storage: q), key: Tensor(shape: kShape, storage: k),
        value: Tensor(shape: vShape, storage: v), options: options)
}

func close(_ a: Float, _ b: Double, _ tol: Double = 1e-6) -> Bool { abs(Double(a) - b) <= tol * max(1, abs(b)) }

/// The reference checked against values worked out by hand.
@Suite struct NaiveReferenceHandComputed {
    @Test func singleKeyReturnsItsValue() throws {
        let r = try naive(
            q: [1, 2], qShape: [1, 1, 1, 2], k: [3, 4], kShape: [1, 1, 1, 2],
            v: [5, -6, 7], vShape: [1, 1, 1, 3])
        #expect(r.output.storage == [5, -6, 7])
        // lse = s = (1*3 + 2*4) / sqrt(2)
        #expect(close(r.logSumExp.storage[0], 11 / 2.0.squareRoot()))
    }

    @Test func twoKeysWeightsOneToThree() throws {
        // D = 1, scale 1: scores 0 and log 3 -> p = 1/4, 3/4; lse = log 4.
        let r = try naive(
            q: [1], qShape: [1, 1, 1, 1], k: [0, Float(log(3.0))], kShape: [1, 1, 2, 1],
            v: [4, 8], vShape: [1, 1, 2, 1], options: .init(scale: 1))
        #expect(close(r.output.storage[0], 0.25 * 4 + 0.75 * 8))
        #expect(close(r.logSumExp.storage[0], log(4.0)))
    }

    @Test func causalIsBottomRightAligned() throws {
        // Nq = 2, Nk = 3, zero queries: uniform weights over visible keys.
        // Query 0 sits at key position 1: sees keys 0, 1. Query 1 sees 0, 1, 2.
        let r = try naive(
            q: [0, 0], qShape: [1, 1, 2, 1], k: [1, 2, 3], kShape: [1, 1, 3, 1],
            v: [3, 6, 12], vShape: [1, 1, 3, 1], options: .init(causal: true))
        #expect(close(r.output.storage[0], 4.5))
        #expect(close(r.output.storage[1], 7))
        #expect(close(r.logSumExp.storage[0], log(2.0)))
        #expect(close(r.logSumExp.storage[1], log(3.0)))
    }

    @Test func causalWithMoreQueriesThanKeysMasksEarlyRows() throws {
        // Nq = 3, Nk = 1: query i sits at key position i - 2; only the last query sees key 0.
        let r = try naive(
            q: [0, 0, 0], qShape: [1, 1, 3, 1], k: [1], kShape: [1, 1, 1, 1],
            v: [9], vShape: [1, 1, 1, 1], options: .init(causal: true))
        #expect(r.output.storage == [0, 0, 9])
        #expect(r.logSumExp.storage[0] == -.infinity && r.logSumExp.storage[1] == -.infinity)
        #expect(r.logSumExp.storage[2] == 0)
    }

    @Test func windowLimitsBothSides() throws {
        // Nq = Nk = 4, window (1, 1): query 2 sees keys 1, 2, 3; query 0 sees 0, 1.
        let r = try naive(
            q: [0, 0, 0, 0], qShape: [1, 1, 4, 1], k: [0, 0, 0, 0], kShape: [1, 1, 4, 1],
            v: [1, 2, 4, 8], vShape: [1, 1, 4, 1], options: .init(window: .init(left: 1, right: 1)))
        #expect(close(r.output.storage[0], 1.5))
        #expect(close(r.output.storage[2], 14 / 3.0))
        #expect(close(r.output.storage[3], 6))
    }

    @Test func slidingWindowCausal() throws {
        // causal + window (1, 0): query i sees keys i-1 and i.
        let r = try naive(
            q: [0, 0, 0], qShape: [1, 1, 3, 1], k: [0, 0, 0], kShape: [1, 1, 3, 1],
            v: [2, 4, 8], vShape: [1, 1, 3, 1], options: .init(causal: true, window: .init(left: 1, right: 0)))
        #expect(r.output.storage.map(Double.init) == [2, 3, 6])
    }

    @Test func softcapBoundsScores() throws {
        // s = 100 with cap 2: 2 * tanh(50) ≈ 2; the other key scores 0. p = e^2 / (e^2 + 1).
        let r = try naive(
            q: [1], qShape: [1, 1, 1, 1], k: [100, 0], kShape: [1, 1, 2, 1],
            v: [1, 0], vShape: [1, 1, 2, 1], options: .init(scale: 1, softcap: 2))
        let e2 = exp(2.0 * tanh(50.0))
        #expect(close(r.output.storage[0], e2 / (e2 + 1)))
        #expect(close(r.logSumExp.storage[0], log(e2 + 1)))
    }

    @Test func booleanAndAdditiveMasks() throws {
        let qkv: ([Float], [Float], [Float]) = ([0, 0], [0, 0, 0], [1, 10, 100])
        let boolMask = try AttentionMask(shape: [2, 3], allowed: [true, false, true, false, false, false])
        let r = try naive(
            q: qkv.0, qShape: [1, 1, 2, 1], k: qkv.1, kShape: [1, 1, 3, 1], v: qkv.2, vShape: [1, 1, 3, 1],
            options: .init(mask: boolMask))
        #expect(close(r.output.storage[0], 50.5))
        #expect(r.output.storage[1] == 0 && r.logSumExp.storage[1] == -.infinity)

        let add = try AttentionMask(
            shape: [1, 1, 2, 3], additive: [0, Float(log(2.0)), -.infinity, -.infinity, -.infinity, -.infinity])
        let a = try naive(
            q: qkv.0, qShape: [1, 1, 2, 1], k: qkv.1, kShape: [1, 1, 3, 1], v: qkv.2, vShape: [1, 1, 3, 1],
            options: .init(mask: add))
        #expect(close(a.output.storage[0], (1 + 2 * 10) / 3.0))
        #expect(close(a.logSumExp.storage[0], log(3.0)))
        #expect(a.output.storage[1] == 0 && a.logSumExp.storage[1] == -.infinity)
    }

    @Test func groupedQueryHeadsReadTheirGroupsKeyValueHead() throws {
        // Hq = 4, Hkv = 2, one key each: head h outputs v of kv head h / 2.
        let r = try naive(
            q: [1, 1, 1, 1], qShape: [1, 4, 1, 1], k: [1, 1], kShape: [1, 2, 1, 1],
            v: [7, 70, 8, 80], vShape: [1, 2, 1, 2])
        #expect(r.output.shape == [1, 4, 1, 2])
        #expect(r.output.storage == [7, 70, 7, 70, 8, 80, 8, 80])
    }

    @Test func defaultScaleIsInverseSquareRootOfD() throws {
        let p = try AttentionProblem(query: [1, 1, 1, 16], key: [1, 1, 1, 16], value: [1, 1, 1, 1])
        #expect(p.scale == 0.25)
        let custom = try AttentionProblem(
            query: [1, 1, 1, 16], key: [1, 1, 1, 16], value: [1, 1, 1, 1], options: .init(scale: 0.5))
        #expect(custom.scale == 0.5)
    }

    @Test func flopsFollowFlashAttentionConvention() throws {
        let full = try AttentionProblem(query: [1, 8, 2048, 64], key: [1, 8, 2048, 64], value: [1, 8, 2048, 64])
        #expect(full.flops == 4 * 8 * 2048 * 2048 * 64)
        let causal = try AttentionProblem(
            query: [1, 8, 2048, 64], key: [1, 8, 2048, 64], value: [1, 8, 2048, 64],
            options: .init(causal: true))
        #expect(causal.flops == full.flops / 2)
        let decode = try AttentionProblem(
            query: [1, 32, 1, 128], key: [1, 8, 4096, 128], value: [1, 8, 4096, 128],
            options: .init(causal: true))
        #expect(decode.flops == 2 * 32 * 4096 * 256)
        #expect(decode.keyValueBytes == 4 * 8 * 4096 * 256)
    }
}

/// Properties the reference must have whatever the inputs.
@Suite struct NaiveReferenceProperties {
    let shape = (q: [2, 2, 5, 6], k: [2, 2, 9, 6], v: [2, 2, 9, 4])

    func inputs(seed: UInt64) throws -> (Tensor, Tensor, Tensor) {
        (
            try .random(shape: shape.q, seed: seed), try .random(shape: shape.k, seed: seed + 1),
            try .random(shape: shape.v, seed: seed + 2)
        )
    }

    @Test(arguments: [1, 2, 3] as [UInt64])
    func permutingKeysAndValuesTogetherChangesNothing(seed: UInt64) throws {
        let (q, k, v) = try inputs(seed: seed)
        let base = try NaiveBackend().attention(query: q, key: k, value: v)
        let perm = Array((0..<9).reversed())
        func permute(_ t: Tensor) throws -> Tensor {
            let (b, h, n, d) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
            var out = t
            for bi in 0..<b {
                for hi in 0..<h {
                    for j in 0..<n {
                        for c in 0..<d {
                            out[bi, hi, j, c] = t[bi, hi, perm[j], c]
                        }
                    }
                }
            }
            _ = n
            return out
        }
        let r = try NaiveBackend().attention(query: q, key: permute(k), value: permute(v))
        for (a, b) in zip(base.output.storage, r.output.storage) { #expect(abs(a - b) <= 1e-6) }
        for (a, b) in zip(base.logSumExp.storage, r.logSumExp.storage) { #expect(abs(a - b) <= 1e-5) }
    }

    @Test func constantAdditiveMaskShiftsOnlyTheLogSumExp() throws {
        let (q, k, v) = try inputs(seed: 7)
        let base = try NaiveBackend().attention(query: q, key: k, value: v)
        let mask = try AttentionMask(shape: [5, 9], additive: [Float](repeating: 3.5, count: 45))
        let shifted = try NaiveBackend().attention(query: q, key: k, value: v, options: .init(mask: mask))
        for (a, b) in zip(base.output.storage, shifted.output.storage) { #expect(abs(a - b) <= 1e-6) }
        for (a, b) in zip(base.logSumExp.storage, shifted.logSumExp.storage) { #expect(abs(a + 3.5 - b) <= 1e-5) }
    }

    @Test func logSumExpMergesDisjointKeyRangesExactly() throws {
        // Attention over keys [0, 4) and [4, 9) separately, merged by their LSEs, equals attention over all.
        let (q, k, v) = try inputs(seed: 11)
        let full = try NaiveBackend().attention(query: q, key: k, value: v)
        func mask(_ keys: Range<Int>) throws -> AttentionMask {
            try AttentionMask(shape: [5, 9], allowed: (0..<45).map { keys.contains($0 % 9) })
        }
        let a = try NaiveBackend().attention(query: q, key: k, value: v, options: .init(mask: mask(0..<4)))
        let b = try NaiveBackend().attention(query: q, key: k, value: v, options: .init(mask: mask(4..<9)))
        for row in 0..<full.logSumExp.count {
            let (la, lb) = (Double(a.logSumExp.storage[row]), Double(b.logSumExp.storage[row]))
            let m = max(la, lb)
            let lse = m + log(exp(la - m) + exp(lb - m))
            #expect(abs(lse - Double(full.logSumExp.storage[row])) <= 1e-5)
            for c in 0..<4 {
                let merged =
                    exp(la - lse) * Double(a.output.storage[row * 4 + c]) + exp(lb - lse)
                    * Double(b.output.storage[row * 4 + c])
                #expect(abs(merged - Double(full.output.storage[row * 4 + c])) <= 1e-6)
            }
        }
    }

    @Test func batchesAndHeadsAreIndependent() throws {
        // Computing batch 1 alone gives the same rows as computing it inside the batch.
        let (q, k, v) = try inputs(seed: 5)
        let both = try NaiveBackend().attention(query: q, key: k, value: v)
        func slice(_ t: Tensor, batch: Int) throws -> Tensor {
            let per = t.count / t.shape[0]
            return try Tensor(
                shape: [1] + t.shape.dropFirst(), storage: Array(t.storage[batch * per..<(batch + 1) * per]))
        }
        let one = try NaiveBackend().attention(
            query: slice(q, batch: 1), key: slice(k, batch: 1), value: slice(v, batch: 1))
        #expect(Array(both.output.storage[(both.output.count / 2)...]) == one.output.storage)
    }

    @Test func naNInOneQueryPoisonsOnlyThatRow() throws {
        var (q, k, v) = try inputs(seed: 3)
        let clean = try NaiveBackend().attention(query: q, key: k, value: v)
        q[0, 1, 2, 3] = .nan
        let dirty = try NaiveBackend().attention(query: q, key: k, value: v)
        let poisoned = (0 * 2 + 1) * 5 + 2
        for row in 0..<clean.logSumExp.count {
            let a = clean.output.storage[row * 4..<row * 4 + 4]
            let b = dirty.output.storage[row * 4..<row * 4 + 4]
            if row == poisoned { #expect(b.allSatisfy { $0.isNaN }) } else { #expect(Array(a) == Array(b)) }
        }
    }
}
