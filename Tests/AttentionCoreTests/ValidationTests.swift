import AttentionCore
import AttentionVerification
import Testing

/// Every way a problem can be wrong gives its own typed error.
@Suite struct Validation {
    let q = [2, 8, 16, 64], k = [2, 2, 32, 64], v = [2, 2, 32, 48]

    func problem(_ q: [Int], _ k: [Int], _ v: [Int], _ o: AttentionOptions = .init()) throws(AttentionError)
        -> AttentionProblem
    {
        try AttentionProblem(query: q, key: k, value: v, options: o)
    }

    @Test func validProblemDerivesShapes() throws {
        let p = try problem(q, k, v)
        #expect(p.outputShape == [2, 8, 16, 48])
        #expect(p.lseShape == [2, 8, 16])
        #expect(p.groupSize == 4)
    }

    @Test func rank() {
        #expect(throws: AttentionError.invalidRank(tensor: "query", expected: "4 ([B, H, N, D])", actual: [8, 16, 64]))
        {
            try problem([8, 16, 64], k, v)
        }
        #expect(
            throws: AttentionError.invalidRank(
                tensor: "value", expected: "4 ([B, H, N, D])", actual: [2, 2, 32, 48, 1])
        ) {
            try problem(q, k, [2, 2, 32, 48, 1])
        }
    }

    @Test func zeroAndNegativeDimensions() {
        #expect(throws: AttentionError.zeroSizedDimension(tensor: "key", shape: [2, 2, 0, 64])) {
            try problem(q, [2, 2, 0, 64], v)
        }
        #expect(throws: AttentionError.invalidShape(tensor: "query", shape: [2, -8, 16, 64])) {
            try problem([2, -8, 16, 64], k, v)
        }
        #expect(throws: AttentionError.invalidShape(tensor: "query", shape: [Int.max, 2, 2, 2])) {
            try problem([Int.max, 2, 2, 2], k, v)
        }
    }

    @Test func mismatchedDimensions() {
        #expect(throws: AttentionError.shapeMismatch("batch sizes differ: query 2, key 3, value 2")) {
            try problem(q, [3, 2, 32, 64], v)
        }
        #expect(throws: AttentionError.shapeMismatch("key has 2 heads but value has 4")) {
            try problem(q, k, [2, 4, 32, 48])
        }
        #expect(throws: AttentionError.shapeMismatch("key has 32 positions but value has 31")) {
            try problem(q, k, [2, 2, 31, 48])
        }
        #expect(throws: AttentionError.shapeMismatch("query head dimension D = 64 but key has D = 32")) {
            try problem(q, [2, 2, 32, 32], v)
        }
    }

    @Test func headsMustDivide() {
        #expect(throws: AttentionError.headsNotDivisible(queryHeads: 8, keyValueHeads: 3)) {
            try problem(q, [2, 3, 32, 64], [2, 3, 32, 48])
        }
    }

    @Test func maskBroadcasting() throws {
        for shape in [[16, 32], [1, 16, 32], [8, 16, 32], [2, 1, 16, 32], [1, 8, 16, 32], [2, 8, 16, 32]] {
            let mask = try AttentionMask(shape: shape, allowed: Array(repeating: true, count: shape.reduce(1, *)))
            _ = try problem(q, k, v, .init(mask: mask))
        }
        for shape in [[16, 31], [17, 32], [2, 16, 32], [3, 1, 16, 32], [1, 4, 16, 32]] {
            let mask = try AttentionMask(shape: shape, additive: Array(repeating: 0, count: shape.reduce(1, *)))
            #expect(throws: AttentionError.maskNotBroadcastable(maskShape: shape, target: [2, 8, 16, 32])) {
                try problem(q, k, v, .init(mask: mask))
            }
        }
        #expect(throws: AttentionError.invalidRank(tensor: "mask", expected: "2, 3 or 4", actual: [32])) {
            try AttentionMask(shape: [32], allowed: Array(repeating: true, count: 32))
        }
        #expect(
            throws: AttentionError.storageSizeMismatch(
                tensor: "mask", shape: [4, 4], expectedCount: 16, actualCount: 15)
        ) {
            try AttentionMask(shape: [4, 4], additive: Array(repeating: 0, count: 15))
        }
        #expect(throws: AttentionError.zeroSizedDimension(tensor: "mask", shape: [0, 4])) {
            try AttentionMask(shape: [0, 4], allowed: [])
        }
    }

    @Test func windowScaleSoftcap() {
        #expect(throws: AttentionError.invalidWindow(left: -2, right: 0)) {
            try problem(q, k, v, .init(window: .init(left: -2, right: 0)))
        }
        #expect(throws: AttentionError.invalidWindow(left: 4, right: -3)) {
            try problem(q, k, v, .init(window: .init(left: 4, right: -3)))
        }
        for scale: Float in [.nan, .infinity, -.infinity] {
            #expect(throws: AttentionError.self) { try problem(q, k, v, .init(scale: scale)) }
        }
        for cap: Float in [0, -1, .nan, .infinity] {
            #expect(throws: AttentionError.self) { try problem(q, k, v, .init(softcap: cap)) }
        }
        #expect(throws: AttentionError.invalidSoftcap(0)) { try problem(q, k, v, .init(softcap: 0)) }
        #expect(throws: AttentionError.invalidScale(.infinity)) { try problem(q, k, v, .init(scale: .infinity)) }
        #expect(throws: Never.self) { try problem(q, k, v, .init(scale: 0, window: .init(left: -1, right: -1))) }
    }

    @Test func tensorStorageMustMatchShape() {
        #expect(
            throws: AttentionError.storageSizeMismatch(
                tensor: "tensor", shape: [2, 3], expectedCount: 6, actualCount: 5)
        ) {
            try Tensor(shape: [2, 3], storage: [1, 2, 3, 4, 5])
        }
    }

    @Test func buffersMustMatchTheProblem() throws {
        let p = try problem([1, 1, 2, 3], [1, 1, 4, 3], [1, 1, 4, 5])
        let q = [Float](repeating: 0, count: 6)
        let k = [Float](repeating: 0, count: 12)
        let v = [Float](repeating: 0, count: 20)
        var out = [Float](repeating: 0, count: 9)
        var lse = [Float](repeating: 0, count: 2)
        q.withUnsafeBufferPointer { qb in
            k.withUnsafeBufferPointer { kb in
                v.withUnsafeBufferPointer { vb in
                    out.withUnsafeMutableBufferPointer { ob in
                        lse.withUnsafeMutableBufferPointer { lb in
                            #expect(
                                throws: AttentionError.outputSizeMismatch(
                                    buffer: "output", expectedCount: 10, actualCount: 9)
                            ) {
                                try NaiveBackend().forward(
                                    p, AttentionBuffers(query: qb, key: kb, value: vb, output: ob, logSumExp: lb))
                            }
                            #expect(
                                throws: AttentionError.storageSizeMismatch(
                                    tensor: "key", shape: [1, 1, 4, 3], expectedCount: 12, actualCount: 6)
                            ) {
                                try NaiveBackend().forward(
                                    p, AttentionBuffers(query: qb, key: qb, value: vb, output: ob, logSumExp: lb))
                            }
                        }
                    }
                }
            }
        }
        var lseWrong = [Float](repeating: 0, count: 3)
        var outRight = [Float](repeating: 0, count: 10)
        _ = q.withUnsafeBufferPointer { qb in
            k.withUnsafeBufferPointer { kb in
                v.withUnsafeBufferPointer { vb in
                    outRight.withUnsafeMutableBufferPointer { ob in
                        lseWrong.withUnsafeMutableBufferPointer { lb in
                            #expect(
                                throws: AttentionError.outputSizeMismatch(
                                    buffer: "logSumExp", expectedCount: 2, actualCount: 3)
                            ) {
                                try NaiveBackend().forward(
                                    p, AttentionBuffers(query: qb, key: kb, value: vb, output: ob, logSumExp: lb))
                            }
                        }
                    }
                }
            }
        }
    }

    struct RefusingBackend: AttentionBackend {
        var id: BackendID { .opencl(device: 7) }
        func support(for problem: AttentionProblem) -> BackendSupport { .unsupported(reason: "D must be 128") }
        func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
            Issue.record("run must not be called on an unsupported problem")
        }
    }

    @Test func unsupportedProblemsAreRefusedWithTheReason() throws {
        let t = try Tensor(shape: [1, 1, 1, 1], storage: [1])
        #expect(
            throws: AttentionError.unsupported(
                backend: BackendID.opencl(device: 7).description, reason: "D must be 128")
        ) {
            try RefusingBackend().attention(query: t, key: t, value: t)
        }
    }

    @Test func errorMessagesNameTheProblem() {
        #expect(AttentionError.headsNotDivisible(queryHeads: 8, keyValueHeads: 3).description.contains("multiple"))
        #expect(
            AttentionError.maskNotBroadcastable(maskShape: [3, 4], target: [1, 1, 2, 4]).description.contains("[3, 4]"))
        #expect(AttentionError.invalidWindow(left: -2, right: 0).description.contains("-1 for unbounded"))
        #expect(AttentionError.backendFailure(backend: "x", message: "boom").description == "backend x failed: boom")
    }
}

@Suite struct AccuracyReporting {
    @Test func flagsViolationsNaNAndNonZeroMaskedRows() {
        let ref: [Double] = [1, 2, 0, 0]
        let lse: [Double] = [0.5, -.infinity]
        func report(_ out: [Float], _ l: [Float]) -> AccuracyReport {
            out.withUnsafeBufferPointer { o in
                l.withUnsafeBufferPointer { lb in
                    AccuracyReport(output: o, logSumExp: lb, reference: ref, referenceLSE: lse, valueDim: 2)
                }
            }
        }
        #expect(report([1, 2, 0, 0], [0.5, -.infinity]).passed)
        #expect(report([1.0002, 2, 0, 0], [0.5, -.infinity]).passed)
        #expect(!report([1.001, 2, 0, 0], [0.5, -.infinity]).passed)
        #expect(!report([.nan, 2, 0, 0], [0.5, -.infinity]).passed)
        #expect(!report([1, 2, 1e-30, 0], [0.5, -.infinity]).passed)
        #expect(!report([1, 2, 0, 0], [0.5, 0]).passed)
        #expect(!report([1, 2, 0, 0], [0.51, -.infinity]).passed)
        #expect(report([1, 2, 0, 0], [0.5, -.infinity]).nmse == 0)
    }

    @Test func seededTensorsAreReproducible() throws {
        #expect(try Tensor.random(shape: [3, 5], seed: 9) == Tensor.random(shape: [3, 5], seed: 9))
        #expect(try Tensor.random(shape: [3, 5], seed: 9) != Tensor.random(shape: [3, 5], seed: 10))
    }
}
