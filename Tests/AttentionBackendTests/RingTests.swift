import AttentionBLAS
import AttentionCore
import AttentionDistributed
import AttentionKit
import AttentionVerification
import Testing

/// Ring attention and sharded-K/V decode with ranks as threads (`LocalRing`), against the float64
/// reference of the whole problem (the MPI runs in scripts/test check the same through `attnbench ring`).
@Suite struct RingAttentionTests {
    struct Case: CustomStringConvertible, Sendable {
        var heads: (q: Int, kv: Int) = (4, 2)
        var n = 37
        var d = 16
        var dv = 24
        var options = AttentionOptions()
        var kv: StorageType = .f32
        var label: String
        var description: String { "\(label) (N \(n), heads \(heads.q)/\(heads.kv), K/V \(kv))" }
    }

    static let cases: [Case] = [
        Case(label: "full"),
        Case(options: .init(causal: true), label: "causal"),
        Case(heads: (6, 1), n: 50, options: .init(causal: true), label: "MQA causal"),
        Case(n: 41, options: .init(causal: true, window: .init(left: 6, right: 0)), label: "sliding window"),
        Case(n: 29, options: .init(window: .init(left: 3, right: 4)), label: "two-sided window"),
        Case(options: .init(softcap: 5, causal: true), kv: .f16, label: "softcap fp16 K/V"),
        Case(n: 64, options: .init(causal: true), kv: .bf16, label: "bf16 K/V"),
        Case(n: 2, options: .init(causal: true), label: "fewer rows than ranks"),
    ]

    static func inputs(_ c: Case, nq: Int? = nil) throws -> (AttentionProblem, Tensor, Tensor, Tensor) {
        let problem = try AttentionProblem(
            query: [2, c.heads.q, nq ?? c.n, c.d], key: [2, c.heads.kv, c.n, c.d], value: [2, c.heads.kv, c.n, c.dv],
            options: c.options, storage: StorageTypes(keyValue: c.kv))
        let q = try Tensor.random(shape: problem.queryShape, seed: 1, in: -2...2)
        let k = try Tensor.random(shape: problem.keyShape, seed: 2, in: -2...2).rounded(to: c.kv)
        let v = try Tensor.random(shape: problem.valueShape, seed: 3).rounded(to: c.kv)
        return (problem, q, k, v)
    }

    @Test(arguments: cases)
    func ringEqualsOneCall(_ c: Case) throws {
        let (problem, q, k, v) = try Self.inputs(c)
        let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
        for ranks in [1, 2, 3, 4] {
            for sharding in RingPlan.Sharding.allCases {
                for backend in [nil, BLASBackend() as (any AttentionBackend)?] {
                    let ring = try RingAttention(problem: problem, ranks: ranks, sharding: sharding, backend: backend)
                    let (result, timings) = try ring.runLocally(query: q, key: k, value: v)
                    let report = AccuracyReport(result: result, reference: reference, valueDim: problem.valueDim)
                    #expect(report.passed, "\(c), \(ranks) ranks, \(sharding): \(report)")
                    #expect(timings.count == ranks && timings.allSatisfy { $0.steps == ranks })
                }
            }
        }
    }

    /// Packed sequences (varlen), each its own problem and sharded on its own, against the reference
    /// of each sequence alone; empty and one-token sequences included.
    @Test(arguments: [AttentionOptions(causal: true), .init(), .init(causal: true, window: .init(left: 4, right: 0))])
    func packedSequences(_ options: AttentionOptions) throws {
        let lengths = [5, 0, 37, 1, 20, 3]
        let total = lengths.reduce(0, +)
        let problem = try AttentionProblem(
            query: [1, 4, total, 16], key: [1, 2, total, 16], value: [1, 2, total, 8], options: options,
            storage: StorageTypes(keyValue: .f16))
        let q = try Tensor.random(shape: problem.queryShape, seed: 4, in: -2...2)
        let k = try Tensor.random(shape: problem.keyShape, seed: 5, in: -2...2).rounded(to: .f16)
        let v = try Tensor.random(shape: problem.valueShape, seed: 6).rounded(to: .f16)
        // The reference: each sequence alone, placed at its packed rows.
        var output = [Double](repeating: 0, count: problem.outputShape.reduce(1, *))
        var lse = [Double](repeating: -.infinity, count: problem.lseShape.reduce(1, *))
        var start = 0
        for n in lengths {
            defer { start += n }
            guard n > 0 else { continue }
            let range = start..<start + n
            let sequence = try AttentionProblem(
                query: [1, 4, n, 16], key: [1, 2, n, 16], value: [1, 2, n, 8], options: options)
            let r = NaiveBackend.reference(
                sequence, query: try ShardedKVAttention.slice(q, keys: range),
                key: try ShardedKVAttention.slice(k, keys: range), value: try ShardedKVAttention.slice(v, keys: range))
            for h in 0..<4 {
                for i in 0..<n {
                    lse[h * total + start + i] = r.logSumExp[h * n + i]
                    for c in 0..<8 { output[(h * total + start + i) * 8 + c] = r.output[(h * n + i) * 8 + c] }
                }
            }
        }
        for ranks in [1, 2, 3, 4] {
            for sharding in RingPlan.Sharding.allCases {
                let ring = try RingAttention(
                    problem: problem, sequenceLengths: lengths, ranks: ranks, sharding: sharding)
                let (result, _) = try ring.runLocally(query: q, key: k, value: v)
                let report = AccuracyReport(result: result, reference: (output, lse), valueDim: 8)
                #expect(report.passed, "packed, \(ranks) ranks, \(sharding): \(report)")
            }
        }
        #expect(throws: AttentionError.self) {
            try RingAttention(problem: problem, sequenceLengths: [5, 60], ranks: 2)
        }
        #expect(throws: AttentionError.self) {
            try RingAttention(problem: problem, sequenceLengths: [67, -1], ranks: 2)
        }
    }

    /// Zig-zag sharding gives every rank the same causal work; contiguous does not.
    @Test func zigzagBalancesCausalWork() throws {
        let problem = try AttentionProblem(
            query: [1, 1, 64, 8], key: [1, 1, 64, 8], value: [1, 1, 64, 8], options: .init(causal: true))
        func pairs(_ sharding: RingPlan.Sharding) -> [Double] {
            let plan = RingPlan(length: 64, ranks: 4, sharding: sharding)
            return (0..<4).map { rank in
                plan.chunks(of: rank).reduce(0.0) { total, chunk in
                    total + chunk.reduce(0.0) { $0 + Double(problem.visibleKeys(forQuery: $1).hi + 1) }
                }
            }
        }
        let zigzag = pairs(.zigzag)
        let contiguous = pairs(.contiguous)
        #expect(zigzag.max()! - zigzag.min()! <= 16)
        #expect(contiguous.max()! > 3 * contiguous.min()!)
        #expect(RingPlan(length: 10, ranks: 3, sharding: .zigzag).chunks(of: 1) == [1..<3, 6..<8])
        #expect((0..<3).map { RingPlan(length: 2, ranks: 3, sharding: .contiguous).rows(of: $0) } == [0, 1, 1])
    }

    @Test(arguments: cases)
    func shardedDecodeEqualsOneCall(_ c: Case) throws {
        for nq in [1, 3] {
            let (problem, q, k, v) = try Self.inputs(c, nq: nq)
            let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
            for ranks in [1, 2, 3] {
                let sharded = try ShardedKVAttention(problem: problem, ranks: ranks)
                let (result, _) = try sharded.runLocally(query: q, key: k, value: v)
                let report = AccuracyReport(result: result, reference: reference, valueDim: problem.valueDim)
                #expect(report.passed, "\(c), Nq \(nq), \(ranks) ranks: \(report)")
            }
        }
    }

    @Test func refusesWhatItCannotShard() throws {
        let masked = try AttentionProblem(
            query: [1, 1, 4, 8], key: [1, 1, 4, 8], value: [1, 1, 4, 8],
            options: .init(mask: try AttentionMask(shape: [4, 4], allowed: Array(repeating: true, count: 16))))
        #expect(throws: AttentionError.self) { try RingAttention(problem: masked, ranks: 2) }
        #expect(throws: AttentionError.self) { try ShardedKVAttention(problem: masked, ranks: 2) }
        let decode = try AttentionProblem(query: [1, 1, 1, 8], key: [1, 1, 9, 8], value: [1, 1, 9, 8])
        #expect(throws: AttentionError.self) { try RingAttention(problem: decode, ranks: 2) }
    }

    /// A rank that fails stops the others (they throw instead of waiting), and its error is the one reported.
    @Test func aFailingRankStopsTheRing() throws {
        let ring = LocalRing(size: 3)
        do {
            try ring.run { (communicator) throws(AttentionError) in
                if communicator.rank == 1 { throw .shapeMismatch("rank 1's input is bad") }
                var buffer = [UInt8](repeating: 0, count: 8)
                let send = [UInt8](repeating: 1, count: 8)
                try send.withUnsafeBufferPointer { (s) throws(AttentionError) in
                    try buffer.withUnsafeMutableBufferPointer { (r) throws(AttentionError) in
                        try communicator.sendReceive(
                            UnsafeRawBufferPointer(s), to: (communicator.rank + 1) % 3,
                            UnsafeMutableRawBufferPointer(r),
                            from: (communicator.rank + 2) % 3)
                    }
                }
            }
            Issue.record("the ring must fail")
        } catch {
            #expect("\(error)".contains("rank 1's input is bad"))
        }
    }
}
