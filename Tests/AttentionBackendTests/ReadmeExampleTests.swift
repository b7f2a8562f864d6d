import AttentionKit
import AttentionVerification
import Foundation
import Testing

/// The README's cache example, verbatim apart from filling the cache: decode on a preallocated fp16
/// [B, N, H, D] cache through a strided view, checked against the reference of the same values.
@Suite struct ReadmeExamples {
    @Test func decodeOnAPreallocatedFP16Cache() throws {
        // README "Layouts and storage types" — begin
        let (batch, kvHeads, queryHeads, headDim, capacity, length) = (1, 8, 32, 128, 4096, 1000)
        // The engine's cache: [B, capacity, Hkv, D], fp16 bits; the first `length` positions are filled.
        var keyCache = [UInt16](repeating: 0, count: batch * capacity * kvHeads * headDim)
        var valueCache = keyCache
        // README — fill
        var rng = SplitMix64(seed: 3)
        for i in 0..<(batch * length * kvHeads * headDim) {
            keyCache[i] = StorageType.encodeHalf(Float.random(in: -1...1, using: &rng))
            valueCache[i] = StorageType.encodeHalf(Float.random(in: -1...1, using: &rng))
        }
        let query = (0..<(batch * queryHeads * headDim)).map { _ in Float.random(in: -1...1, using: &rng) }
        // README — continue
        var output = [Float](repeating: 0, count: batch * queryHeads * headDim)  // [B, Hq, 1, D]

        let problem = try AttentionProblem(
            query: [batch, queryHeads, 1, headDim], key: [batch, kvHeads, length, headDim],
            value: [batch, kvHeads, length, headDim], options: AttentionOptions(causal: true),
            storage: StorageTypes(query: .f32, keyValue: .f16, output: .f32))
        // Strides of the whole cache: the views cover its first `length` positions, read in place.
        let cache = Strides(batch: capacity * kvHeads * headDim, head: headDim, sequence: kvHeads * headDim)
        let backend = try BackendSelection.select(.auto, for: problem).backend
        try keyCache.withUnsafeBufferPointer { k in
            try valueCache.withUnsafeBufferPointer { v in
                try query.withUnsafeBufferPointer { q in
                    try output.withUnsafeMutableBufferPointer { o in
                        try backend.forward(
                            problem,
                            AttentionBuffers(
                                query: TensorView(q, strides: nil), key: TensorView(k, storage: .f16, strides: cache),
                                value: TensorView(v, storage: .f16, strides: cache), output: TensorView(o),
                                logSumExp: nil))
                    }
                }
            }
        }
        // README "Layouts and storage types" — end

        // The same values as dense fp32 tensors, through the reference.
        func dense(_ cache: [UInt16]) throws -> Tensor {
            var values = [Float](repeating: 0, count: batch * kvHeads * length * headDim)
            for h in 0..<kvHeads {
                for t in 0..<length {
                    for c in 0..<headDim {
                        values[(h * length + t) * headDim + c] = StorageType.decodeHalf(
                            cache[(t * kvHeads + h) * headDim + c])
                    }
                }
            }
            return try Tensor(shape: [batch, kvHeads, length, headDim], storage: values)
        }
        let reference = NaiveBackend.reference(
            try AttentionProblem(
                query: problem.queryShape, key: problem.keyShape, value: problem.valueShape, options: problem.options),
            query: try Tensor(shape: problem.queryShape, storage: query), key: try dense(keyCache),
            value: try dense(valueCache))
        for (got, want) in zip(output, reference.output) {
            #expect(AccuracyReport.withinTolerance(Double(got), of: want), "\(got) vs \(want)")
        }
    }
}

/// The README's serving example: a decode loop over sequences of different lengths through the
/// paged cache, one token per step, checked against the reference of each sequence's tokens.
@Suite struct ReadmeServingExample {
    @Test func decodeLoopThroughTheCache() throws {
        var rng = SplitMix64(seed: 11)
        func random(_ shape: [Int]) throws -> Tensor {
            try Tensor(
                shape: shape, storage: (0..<shape.reduce(1, *)).map { _ in Float.random(in: -1...1, using: &rng) })
        }
        var history: [[(key: Tensor, value: Tensor)]] = [[], [], []]
        var last: AttentionResult?
        var lastQuery: Tensor?
        // README "Serving" — begin
        let (kvHeads, queryHeads, headDim) = (2, 8, 64)
        let cache = try KVCache(
            keyValueHeads: kvHeads, headDim: headDim, pageSize: 16, pageCapacity: 256, storage: .f16)
        // Three sequences with prompts of different lengths.
        let sequences = [37, 5, 120].map { _ in cache.addSequence() }
        for (id, promptLength) in zip(sequences, [37, 5, 120]) {
            let keys = try random([promptLength, kvHeads, headDim])  // [n, Hkv, D] from the model
            let values = try random([promptLength, kvHeads, headDim])
            try cache.append(sequence: id, keys: keys, values: values)
            history[id].append((keys, values))  // README — skip
        }
        for _ in 0..<4 {  // decode steps
            for id in sequences {
                let key = try random([1, kvHeads, headDim])  // this step's K/V of each sequence
                let value = try random([1, kvHeads, headDim])
                try cache.append(sequence: id, keys: key, values: value)
                history[id].append((key, value))  // README — skip
            }
            let query = try random([sequences.count, queryHeads, 1, headDim])  // [S, Hq, 1, D]
            let step = try cache.attention(query: query, sequences: sequences, options: .init(causal: true))
            // step.output: [S, Hq, 1, D], one row per sequence and head
            (last, lastQuery) = (step, query)  // README — skip
        }
        // README "Serving" — end

        let result = try #require(last)
        let query = try #require(lastQuery)
        for id in sequences {
            let rows = history[id]
            let n = rows.reduce(0) { $0 + $1.key.shape[0] }
            var k = [Float](repeating: 0, count: kvHeads * n * headDim)
            var v = k
            var j = 0
            for chunk in rows {
                for t in 0..<chunk.key.shape[0] {
                    for h in 0..<kvHeads {
                        for e in 0..<headDim {
                            k[(h * n + j) * headDim + e] = StorageType.f16.rounded(chunk.key[t, h, e])
                            v[(h * n + j) * headDim + e] = StorageType.f16.rounded(chunk.value[t, h, e])
                        }
                    }
                    j += 1
                }
            }
            let size = queryHeads * headDim
            let q = try Tensor(
                shape: [1, queryHeads, 1, headDim], storage: Array(query.storage[id * size..<(id + 1) * size]))
            let key = try Tensor(shape: [1, kvHeads, n, headDim], storage: k)
            let value = try Tensor(shape: [1, kvHeads, n, headDim], storage: v)
            let problem = try AttentionProblem(
                query: q.shape, key: key.shape, value: value.shape, options: .init(causal: true))
            let reference = NaiveBackend.reference(problem, query: q, key: key, value: value)
            let got = Array(result.output.storage[id * size..<(id + 1) * size])
            let report = got.withUnsafeBufferPointer { out in
                AccuracyReport(
                    output: out, logSumExp: nil, reference: reference.output, referenceLSE: reference.logSumExp,
                    valueDim: headDim)
            }
            #expect(report.passed, "sequence \(id): \(report)")
        }
    }
}

extension ReadmeServingExample {
    /// The README's code block is the test's code between its markers, minus the `skip` lines.
    @Test func readmeShowsThisCode() throws {
        let here = URL(fileURLWithPath: #filePath)
        let root = here.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let readme = try String(contentsOf: root.appendingPathComponent("README.md"), encoding: .utf8)
        let source = try String(contentsOf: here, encoding: .utf8)
        func trimmed(_ lines: some Sequence<Substring>) -> [String] {
            lines.map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        }
        let testLines = source.components(separatedBy: "// README \"Serving\" — begin")[1]
            .components(separatedBy: "// README \"Serving\" — end")[0]
            .split(separator: "\n").filter { !$0.contains("README — skip") }
        let section = try #require(readme.components(separatedBy: "(checked verbatim by `ReadmeServingExample`)").last)
        let block = section.components(separatedBy: "```swift\n")[1].components(separatedBy: "```")[0]
        #expect(trimmed(block.split(separator: "\n")) == trimmed(testLines))
    }
}
