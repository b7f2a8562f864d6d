import AttentionBLAS
import AttentionCore
import AttentionOpenCL
import Testing

/// `AttentionResult.merging` and `OpenCLBackend.merge`: partial results over disjoint key ranges merge
/// into the single call's result, with the contract's conventions for rows no part saw.
@Suite struct PartialMerge {
    /// Keys [lo, hi) of a [B, H, N, D] tensor.
    static func keys(_ t: Tensor, _ lo: Int, _ hi: Int) throws -> Tensor {
        let (b, h, n, d) = (t.shape[0], t.shape[1], t.shape[2], t.shape[3])
        var values: [Float] = []
        values.reserveCapacity(b * h * (hi - lo) * d)
        for bh in 0..<(b * h) {
            let start = (bh * n + lo) * d
            values += t.storage[start..<start + (hi - lo) * d]
        }
        return try Tensor(shape: [b, h, hi - lo, d], storage: values)
    }

    /// A random problem with a boolean mask [Nq, Nk] that hides some keys everywhere and whole rows
    /// (rows 2 and 5 see nothing), the whole result, and the results over `cuts` key ranges (one of
    /// them, when `withEmpty`, an explicit empty part: O 0, LSE -inf).
    static func split(
        _ backend: some AttentionBackend, cuts: [Int], nk: Int = 97, withEmpty: Bool = true
    ) throws -> (whole: AttentionResult, parts: [AttentionResult]) {
        var rng = SplitMix64(seed: 11)
        let (b, hq, hkv, nq, d, dv) = (2, 4, 2, 7, 16, 24)
        let q = try Tensor.random(shape: [b, hq, nq, d], seed: 1, in: -3...3)
        let k = try Tensor.random(shape: [b, hkv, nk, d], seed: 2)
        let v = try Tensor.random(shape: [b, hkv, nk, dv], seed: 3)
        var allowed = (0..<(nq * nk)).map { _ in rng.next() % 4 != 0 }
        for row in [2, 5] { for j in 0..<nk { allowed[row * nk + j] = false } }
        func mask(_ lo: Int, _ hi: Int) throws -> AttentionMask {
            try AttentionMask(
                shape: [nq, hi - lo], allowed: (0..<nq).flatMap { i in allowed[(i * nk + lo)..<(i * nk + hi)] })
        }
        let whole = try backend.attention(query: q, key: k, value: v, options: .init(mask: mask(0, nk)))
        let bounds = [0] + cuts + [nk]
        var parts: [AttentionResult] = []
        for (lo, hi) in zip(bounds, bounds.dropFirst()) where hi > lo {
            parts.append(
                try backend.attention(
                    query: q, key: keys(k, lo, hi), value: keys(v, lo, hi), options: .init(mask: mask(lo, hi))))
        }
        if withEmpty {
            let empty = AttentionResult(
                output: try Tensor(shape: whole.output.shape),
                logSumExp: try Tensor(shape: whole.logSumExp.shape, repeating: -.infinity))
            parts.insert(empty, at: parts.count / 2)
        }
        return (whole, parts)
    }

    static func expectClose(_ a: AttentionResult, _ b: AttentionResult, tolerance: Float = 2e-6) {
        for (x, y) in zip(a.output.storage, b.output.storage) { #expect(abs(x - y) <= tolerance) }
        for (x, y) in zip(a.logSumExp.storage, b.logSumExp.storage) {
            #expect(x == y || abs(x - y) <= tolerance, "LSE \(x) vs \(y)")
        }
    }

    @Test(arguments: [[1], [40], [10, 50, 51, 90], Array(stride(from: 7, to: 97, by: 7))])
    func mergedPartsEqualTheSingleCall(_ cuts: [Int]) throws {
        for backend in [NaiveBackend() as any AttentionBackend, BLASBackend()] {
            let (whole, parts) = try Self.split(backend, cuts: cuts)
            let merged = try AttentionResult.merging(parts)
            Self.expectClose(merged, whole)
            // Rows no key was visible to stay exactly 0 / -inf.
            for row in 0..<merged.logSumExp.count where whole.logSumExp.storage[row] == -.infinity {
                #expect(merged.logSumExp.storage[row] == -.infinity)
                #expect(merged.output.storage[(row * 24)..<((row + 1) * 24)].allSatisfy { $0 == 0 })
            }
            // The order is fixed: the same parts give the same bits.
            let again = try AttentionResult.merging(parts)
            #expect(again.output.storage.map(\.bitPattern) == merged.output.storage.map(\.bitPattern))
        }
    }

    @Test func onePartIsItselfAndNaNPoisonsOnlyItsRow() throws {
        let (whole, parts) = try Self.split(NaiveBackend(), cuts: [30], withEmpty: false)
        let single = try AttentionResult.merging([whole])
        #expect(single.output.storage.map(\.bitPattern) == whole.output.storage.map(\.bitPattern))
        #expect(single.logSumExp.storage.map(\.bitPattern) == whole.logSumExp.storage.map(\.bitPattern))
        var poisoned = parts
        var lse = poisoned[1].logSumExp.storage
        lse[3] = .nan
        poisoned[1].logSumExp = try Tensor(shape: poisoned[1].logSumExp.shape, storage: lse)
        let merged = try AttentionResult.merging(poisoned)
        #expect(merged.logSumExp.storage[3].isNaN)
        #expect(merged.output.storage[(3 * 24)..<(4 * 24)].allSatisfy { $0.isNaN })
        #expect(!merged.logSumExp.storage[4].isNaN)
    }

    @Test func mismatchedPartsAreNamed() throws {
        let (_, parts) = try Self.split(NaiveBackend(), cuts: [30], withEmpty: false)
        #expect(throws: AttentionError.shapeMismatch("merging needs at least one partial result")) {
            try AttentionResult.merging([])
        }
        var wrong = parts
        wrong[1].output = try Tensor(shape: [2, 4, 7, 23])
        #expect(
            throws: AttentionError.shapeMismatch(
                "partial result 1 has output [2, 4, 7, 23] and log-sum-exp [2, 4, 7]; partial result 0 has "
                    + "[2, 4, 7, 24] and [2, 4, 7]")
        ) { try AttentionResult.merging(wrong) }
    }

    @Test(.enabled(if: openCLAvailable, noOpenCLReason))
    func onTheDeviceAsOnTheHost() throws {
        for backend in openCLBackends() {
            let (whole, parts) = try Self.split(NaiveBackend(), cuts: [10, 50, 51, 90])
            let uploaded = try parts.map {
                (output: try backend.upload($0.output), logSumExp: try backend.upload($0.logSumExp))
            }
            let merged = try backend.merge(uploaded)
            let result = AttentionResult(
                output: try backend.download(merged.output), logSumExp: try backend.download(merged.logSumExp))
            Self.expectClose(result, whole)
            Self.expectClose(result, try AttentionResult.merging(parts))
            let twice = try backend.merge(uploaded)
            #expect(
                try backend.download(twice.output).storage.map(\.bitPattern) == result.output.storage.map(\.bitPattern))
            // One part comes back as itself, bit for bit.
            let one = try backend.merge([uploaded[0]])
            #expect(
                try backend.download(one.output).storage.map(\.bitPattern) == parts[0].output.storage.map(\.bitPattern))
            #expect(
                try backend.download(one.logSumExp).storage.map(\.bitPattern)
                    == parts[0].logSumExp.storage.map(\.bitPattern))
            #expect(throws: AttentionError.shapeMismatch("merging needs at least one partial result")) {
                try backend.merge([])
            }
        }
    }
}
