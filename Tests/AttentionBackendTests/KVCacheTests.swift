import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionOpenCL
import AttentionVerification
import Foundation
import Testing

/// The paged K/V cache: appends across pages, copy-on-write forks, a full pool, and attention
/// through it equal to the float64 reference of each sequence's tokens.
@Suite struct KVCacheTests {
    let hkv = 2
    let hq = 4
    let d = 16

    /// Tokens as a test keeps them: fp32 rows rounded to the cache's storage, [n, Hkv, D].
    struct Tokens {
        var keys: [Float] = []
        var values: [Float] = []
        var count = 0
    }

    func chunk(_ n: Int, seed: UInt64) throws -> (Tensor, Tensor) {
        (
            try Tensor.random(shape: [n, hkv, d], seed: seed, in: -2...2),
            try Tensor.random(shape: [n, hkv, d], seed: seed &+ 1, in: -1...1)
        )
    }

    func append(_ cache: KVCache, _ id: Int, _ tokens: inout Tokens, _ n: Int, seed: UInt64) throws {
        let (k, v) = try chunk(n, seed: seed)
        try cache.append(sequence: id, keys: k, values: v)
        tokens.keys += k.storage.map(cache.storage.rounded)
        tokens.values += v.storage.map(cache.storage.rounded)
        tokens.count += n
    }

    /// Checks one attention step over `ids` against the reference of each sequence's tokens.
    func check(_ cache: KVCache, _ ids: [Int], _ tokens: [Tokens], causal: Bool = false, seed: UInt64) throws {
        let nq = 1
        let query = try Tensor.random(shape: [ids.count, hq, nq, d], seed: seed, in: -2...2)
        var backends: [any AttentionBackend] = [NaiveBackend(), BLASBackend()]
        backends += OpenCLRuntime.availableDevices.indices.map { OpenCLBackend(device: $0) }
        for backend in backends {
            let result = try cache.attention(
                query: query, sequences: ids, options: .init(causal: causal), backend: backend)
            for (s, t) in tokens.enumerated() {
                let q = try Tensor(
                    shape: [1, hq, nq, d], storage: Array(query.storage[s * hq * nq * d..<(s + 1) * hq * nq * d]))
                var row = [Float](repeating: 0, count: hq * nq * d)
                for i in 0..<row.count { row[i] = result.output.storage[s * hq * nq * d + i] }
                if t.count == 0 {
                    #expect(row.allSatisfy { $0 == 0 }, "\(backend.name): empty sequence \(s) not zero")
                    continue
                }
                // [n, Hkv, D] tokens as [1, Hkv, n, D].
                var k = [Float](repeating: 0, count: t.keys.count)
                var v = [Float](repeating: 0, count: t.values.count)
                for j in 0..<t.count {
                    for h in 0..<hkv {
                        for e in 0..<d {
                            k[(h * t.count + j) * d + e] = t.keys[(j * hkv + h) * d + e]
                            v[(h * t.count + j) * d + e] = t.values[(j * hkv + h) * d + e]
                        }
                    }
                }
                let key = try Tensor(shape: [1, hkv, t.count, d], storage: k)
                let value = try Tensor(shape: [1, hkv, t.count, d], storage: v)
                let problem = try AttentionProblem(
                    query: q.shape, key: key.shape, value: value.shape, options: .init(causal: causal))
                let reference = NaiveBackend.reference(problem, query: q, key: key, value: value)
                let report = row.withUnsafeBufferPointer { out in
                    AccuracyReport(
                        output: out, logSumExp: nil, reference: reference.output,
                        referenceLSE: reference.logSumExp, valueDim: d)
                }
                #expect(report.passed, "\(backend.name) sequence \(s) (\(t.count) tokens): \(report)")
            }
        }
    }

    @Test(arguments: [1, 16, 256], [StorageType.f32, .f16])
    func appendAcrossPagesThenAttend(_ pageSize: Int, _ storage: StorageType) throws {
        let cache = try KVCache(
            keyValueHeads: hkv, headDim: d, pageSize: pageSize, pageCapacity: 1200 / pageSize + 8, storage: storage)
        let ids = (0..<3).map { _ in cache.addSequence() }
        var tokens = [Tokens](repeating: Tokens(), count: 3)
        // Chunks that start and end inside pages; sequence 2 stays empty.
        for (step, n) in [5, 17, 1, 40, 300].enumerated() {
            try append(cache, ids[0], &tokens[0], n, seed: UInt64(10 + step))
        }
        try append(cache, ids[1], &tokens[1], 1, seed: 99)
        #expect(try cache.length(of: ids[0]) == 363)
        try check(cache, ids, tokens, seed: 5)
        try check(cache, ids, tokens, causal: true, seed: 6)
    }

    /// Pool memory: aligned (to the huge-page size for large pools on Linux), writable end to end.
    @Test func poolMemoryIsAlignedAndUsable() throws {
        for bytes in [1, 100, 3 << 20] {
            let memory = try #require(PoolMemory.allocate(byteCount: bytes))
            defer { PoolMemory.deallocate(memory) }
            let address = Int(bitPattern: memory)
            #expect(address % 64 == 0)
            #if os(Linux)
                if bytes >= PoolMemory.hugePageBytes { #expect(address % PoolMemory.hugePageBytes == 0) }
            #endif
            memory.initializeMemory(as: UInt8.self, repeating: 0xA5, count: bytes)
            #expect(memory.load(fromByteOffset: bytes - 1, as: UInt8.self) == 0xA5)
        }
    }

    @Test func forkThenDiverge() throws {
        let cache = try KVCache(keyValueHeads: hkv, headDim: d, pageSize: 16, pageCapacity: 16, storage: .f16)
        let a = cache.addSequence()
        var ta = Tokens()
        try append(cache, a, &ta, 20, seed: 1)  // one full page, one partly filled
        let free = cache.freePages
        let b = try cache.fork(sequence: a)
        #expect(cache.freePages == free, "a fork takes no pages")
        var tb = ta
        try append(cache, b, &tb, 3, seed: 2)  // copies the shared partial page
        #expect(cache.freePages == free - 1)
        try append(cache, a, &ta, 4, seed: 3)  // a's own page now: written in place
        #expect(cache.freePages == free - 1)
        try check(cache, [a, b], [ta, tb], seed: 4)
        // Removing a frees only its unshared page; the shared full page stays with b.
        let freed = try cache.remove(sequence: a)
        #expect(freed.count == 1)
        try check(cache, [b], [tb], seed: 5)
        #expect(throws: AttentionError.unknownSequence(a)) { try cache.remove(sequence: a) }
    }

    @Test func fullPoolChangesNothing() throws {
        let cache = try KVCache(keyValueHeads: hkv, headDim: d, pageSize: 4, pageCapacity: 3, storage: .bf16)
        let a = cache.addSequence()
        var ta = Tokens()
        try append(cache, a, &ta, 10, seed: 1)
        let (k, v) = try chunk(3, seed: 7)
        #expect(throws: AttentionError.cacheFull(neededPages: 1, freePages: 0)) {
            try cache.append(sequence: a, keys: k, values: v)
        }
        #expect(try cache.length(of: a) == 10)
        try check(cache, [a], [ta], seed: 2)
        try append(cache, a, &ta, 2, seed: 3)  // still fits in the last page
        try check(cache, [a], [ta], seed: 4)
    }

    @Test func badInput() throws {
        #expect(throws: AttentionError.self) {
            _ = try KVCache(keyValueHeads: 1, headDim: 8, pageSize: 3, pageCapacity: 4)
        }
        let cache = try KVCache(keyValueHeads: hkv, headDim: d, pageCapacity: 4)
        let a = cache.addSequence()
        let wrong = try Tensor(shape: [2, hkv, d + 1])
        #expect(throws: AttentionError.self) { try cache.append(sequence: a, keys: wrong, values: wrong) }
        let query = try Tensor(shape: [1, hq, 1, d])
        #expect(throws: AttentionError.unknownSequence(42)) { _ = try cache.attention(query: query, sequences: [42]) }
    }
}
