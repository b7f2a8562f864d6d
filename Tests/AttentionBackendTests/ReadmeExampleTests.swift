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
