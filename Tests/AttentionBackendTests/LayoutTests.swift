import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionMachine
import AttentionOpenCL
import AttentionVerification
import Foundation
import Testing

/// Storage combinations of the layout sweep: each of Q, K/V and O meets each type somewhere, and
/// the types of Q and K/V vary independently.
enum StorageSweep {
    static let combinations = VerificationGrid.storageCombinations

    /// Small sweep cases (every feature of the sweep appears) plus the shapes that take other paths:
    /// GQA decode long enough for split-KV, MQA, early rows that see nothing, a key block boundary.
    static let cases: [VerificationCase] = {
        let sweep = Sweep.cases().filter { $0.work <= 8_000_000 }
        let picked = sweep.enumerated().filter { $0.offset % 6 == 0 }.map(\.element)
        return picked + [
            VerificationCase(
                batch: 2, heads: (8, 2), nq: 1, nk: 1030, d: 64, dv: 48, options: .init(causal: true),
                label: "GQA decode"),
            VerificationCase(
                heads: (4, 1), nq: 3, nk: 600, d: 32, dv: 32, options: .init(softcap: 10), label: "MQA short"),
            VerificationCase(
                heads: (4, 2), nq: 1, nk: 4500, d: 32, dv: 16, options: .init(causal: true), label: "key ranges"),
            VerificationCase(
                heads: (2, 2), nq: 70, nk: 7, d: 16, dv: 16, options: .init(causal: true), label: "empty rows"),
            VerificationCase(
                heads: (2, 2), nq: 130, nk: 130, d: 64, dv: 64, options: .init(causal: true), amplitude: 5,
                label: "causal blocks"),
        ]
    }()
}

/// Every backend on every layout and storage combination: strided views read in place, fp16/bf16
/// converted as consumed, against the float64 reference of the rounded inputs.
@Suite struct LayoutAndStorageParity {
    static func backends() -> [any AttentionBackend] {
        var list: [any AttentionBackend] = [NaiveBackend()]
        list += CPUISA.supported.map { BLASBackend(isa: $0) }
        for index in OpenCLRuntime.availableDevices.indices {
            list.append(OpenCLBackend(device: index))
            list.append(OpenCLBackend(device: index, allowSplitKV: false))
            // The GPU kernel, in two tile families (16 items per row in groups of 128; 8 in groups of 64).
            list.append(OpenCLBackend(device: index).gpuShaped(as: "NVIDIA"))
            list.append(OpenCLBackend(device: index).gpuShaped(as: "Mali"))
        }
        return list
    }

    @Test(arguments: OperandLayout.allCases, StorageSweep.combinations)
    func everyBackend(_ layout: OperandLayout, _ storage: StorageTypes) throws {
        for c in StorageSweep.cases where layout.fits(c, storage) {
            for backend in Self.backends() {
                let run = try LayoutRun(backend, c, layout: layout, storage: storage)
                #expect(run.report.passed, "\(backend.name) \(layout) \(storage) on \(c): \(run.report)")
                #expect(run.outputPaddingIntact, "\(backend.name) \(layout) \(storage) wrote outside O on \(c)")
            }
        }
    }

    @Test func anFP16OverflowPoisonsOnlyItsRows() throws {
        // 70000 rounds to +Inf in fp16: the query row holding it becomes NaN, every other row is
        // bitwise what it is without the overflow.
        let c = VerificationCase(batch: 1, heads: (4, 2), nq: 9, nk: 40, d: 16, dv: 16)
        let (q, k, v) = try c.inputs()
        var hot = q
        hot[0, 1, 4, 3] = 70_000
        let storage = StorageTypes(query: .f16, keyValue: .f16, output: .f32)
        let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, storage: storage)
        for backend in Self.backends() {
            let clean = try run(backend, problem, q, k, v)
            let dirty = try run(backend, problem, hot, k, v)
            for row in 0..<(4 * 9) {
                let slice = row * 16..<(row + 1) * 16
                if row == 1 * 9 + 4 {
                    let poisoned = dirty[slice].allSatisfy { $0.isNaN }
                    #expect(poisoned, "\(backend.name): the overflowing row is not NaN")
                } else {
                    #expect(
                        dirty[slice].map(\.bitPattern) == clean[slice].map(\.bitPattern), "\(backend.name) row \(row)")
                }
            }
        }
    }

    /// Runs with fp16 Q/K/V built from fp32 tensors; returns O.
    private func run(
        _ backend: any AttentionBackend, _ p: AttentionProblem, _ q: Tensor, _ k: Tensor, _ v: Tensor
    ) throws -> [Float] {
        let (qh, kh, vh) = (
            q.storage.map(StorageType.encodeHalf), k.storage.map(StorageType.encodeHalf),
            v.storage.map(StorageType.encodeHalf)
        )
        var out = [Float](repeating: 0, count: p.outputShape.reduce(1, *))
        try qh.withUnsafeBufferPointer { qb in
            try kh.withUnsafeBufferPointer { kb in
                try vh.withUnsafeBufferPointer { vb in
                    try out.withUnsafeMutableBufferPointer { ob in
                        try backend.forward(
                            p,
                            AttentionBuffers(
                                query: TensorView(qb, storage: .f16), key: TensorView(kb, storage: .f16),
                                value: TensorView(vb, storage: .f16), output: TensorView(ob), logSumExp: nil))
                    }
                }
            }
        }
        return out
    }
}

/// Conversions to fp16 and bf16: round to nearest even, bit for bit.
@Suite struct StorageConversions {
    /// (fp32 bits, fp16 bits) from NumPy 2.4: `np.array(bits, np.uint32).view(np.float32)
    /// .astype(np.float16).view(np.uint16)`: zeros, ties to even, the largest finite half and the
    /// overflow threshold, subnormal boundaries, Inf and NaN payloads (quiet and signalling).
    static let numpyHalf: [(UInt32, UInt16)] = [
        (0x0000_0000, 0x0000), (0x8000_0000, 0x8000), (0x3F80_0000, 0x3C00), (0xC020_0000, 0xC100),
        (0x477F_E000, 0x7BFF), (0x477F_EFFD, 0x7BFF), (0x477F_F000, 0x7C00), (0x4788_B800, 0x7C00),
        (0xCE6E_6B28, 0xFC00), (0x3880_0000, 0x0400), (0x387F_C000, 0x03FF), (0x3380_0000, 0x0001),
        (0x3300_0000, 0x0000), (0x3300_0001, 0x0001), (0x33C0_0000, 0x0002), (0x3F80_2000, 0x3C01),
        (0x3F80_1000, 0x3C00), (0x3F80_3000, 0x3C02), (0x4500_1000, 0x6800), (0x4500_3000, 0x6802),
        (0x3300_D959, 0x0001), (0x3440_0000, 0x0003), (0x7F80_0000, 0x7C00), (0xFF80_0000, 0xFC00),
        (0x7FC0_0000, 0x7E00), (0xFFC0_0000, 0xFE00), (0x7F80_0001, 0x7C01), (0x7FA0_0000, 0x7D00),
        (0x7F80_2000, 0x7C01), (0xFF80_0001, 0xFC01), (0x7FFF_FFFF, 0x7FFF),
    ]

    @Test func halfMatchesNumPyOnEdgeValues() {
        for (input, expected) in Self.numpyHalf {
            let got = StorageType.encodeHalf(Float(bitPattern: input))
            #expect(
                got == expected,
                "0x\(String(input, radix: 16)) -> 0x\(String(got, radix: 16)), NumPy 0x\(String(expected, radix: 16))")
        }
    }

    @Test func halfRoundTripsAndMatchesTheHardwareOnRandomValues() throws {
        var rng = SplitMix64(seed: 42)
        let values = (0..<200_000).map { _ in Float(bitPattern: UInt32(truncatingIfNeeded: rng.next())) }.filter {
            !$0.isNaN
        }
        for x in values {
            #expect(StorageType.encodeHalf(x) == Float16(x).bitPattern, "\(x)")
        }
        for bits in 0...UInt16.max {
            let h = Float16(bitPattern: bits)
            let widened = StorageType.decodeHalf(bits)
            #expect(h.isNaN ? widened.isNaN : widened == Float(h))
        }
        // The kernels' vector and scalar paths agree with the reference, on every CPU variant.
        let sample = Array(values.prefix(4099))
        let expected = sample.map(StorageType.encodeHalf)
        for isa in CPUISA.supported {
            let kernels = try CPUKernels(isa: isa)
            #expect(kernels.encode(sample, as: .f16) == expected, "\(isa)")
            let decoded = kernels.decode(expected, as: .f16)
            #expect(decoded.map(\.bitPattern) == expected.map { StorageType.decodeHalf($0).bitPattern }, "\(isa)")
        }
    }

    @Test func bfloatRoundsToNearestEven() throws {
        #expect(StorageType.encodeBFloat(1.0) == 0x3F80)
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x3F80_8000)) == 0x3F80)  // tie, even stays
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x3F81_8000)) == 0x3F82)  // tie, odd rounds up
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x3F80_8001)) == 0x3F81)
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x7F7F_FFFF)) == 0x7F80)  // overflow to Inf
        #expect(StorageType.encodeBFloat(-.infinity) == 0xFF80)
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x7F80_0001)) == 0x7FC0)  // signalling NaN quietened
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0xFFC1_2345)) == 0xFFC1)
        #expect(StorageType.encodeBFloat(Float(bitPattern: 0x0000_8000)) == 0x0000)  // subnormal tie to even
        var rng = SplitMix64(seed: 7)
        let sample = (0..<4099).map { _ in Float(bitPattern: UInt32(truncatingIfNeeded: rng.next())) }
        let expected = sample.map(StorageType.encodeBFloat)
        for isa in CPUISA.supported {
            let kernels = try CPUKernels(isa: isa)
            #expect(kernels.encode(sample, as: .bf16) == expected, "\(isa)")
            #expect(kernels.decode(expected, as: .bf16).map(\.bitPattern) == expected.map { UInt32($0) << 16 })
        }
    }
}

/// Views that do not fit the problem are typed errors naming the tensor.
@Suite struct ViewValidation {
    let problem = try! AttentionProblem(query: [1, 2, 4, 8], key: [1, 2, 6, 8], value: [1, 2, 6, 8])

    func check(q: TensorView? = nil, k: TensorView? = nil, o: TensorView? = nil) throws(AttentionError) {
        let dense = UnsafeMutablePointer<Float>.allocate(capacity: 1024)
        defer { dense.deallocate() }
        let out = UnsafeMutablePointer<Float>.allocate(capacity: 1024)
        defer { out.deallocate() }
        let input = TensorView(address: dense, storage: .f32, strides: nil, capacity: 64)
        try AttentionBuffers(
            query: q ?? input, key: k ?? TensorView(address: dense, storage: .f32, strides: nil, capacity: 96),
            value: TensorView(address: dense, storage: .f32, strides: nil, capacity: 96),
            output: o ?? TensorView(address: out, storage: .f32, strides: nil, capacity: 64), logSumExp: nil
        ).check(against: problem)
    }

    @Test func badViewsAreRefused() throws {
        let memory = UnsafeMutablePointer<Float>.allocate(capacity: 4096)
        defer { memory.deallocate() }
        try check()  // the dense views fit
        func expectError(_ name: String, _ body: () throws -> Void) {
            do {
                try body()
                Issue.record("\(name): accepted")
            } catch {
                #expect(error is AttentionError && "\(error)".contains(name), "\(error)")
            }
        }
        expectError("query") {
            try check(
                q: TensorView(
                    address: memory, storage: .f32, strides: .init(batch: 64, head: -8, sequence: 8), capacity: 4096))
        }
        expectError("key") {
            try check(
                k: TensorView(
                    address: memory, storage: .f32, strides: .init(batch: 0, head: 100, sequence: 8), capacity: 147))
        }
        expectError("key") { try check(k: TensorView(address: memory, storage: .f16, strides: nil, capacity: 96)) }
        // Output heads 1 apart, rows 8 apart: different elements share memory.
        expectError("output") {
            try check(
                o: TensorView(
                    address: memory + 2048, storage: .f32, strides: .init(batch: 64, head: 1, sequence: 8),
                    capacity: 1024))
        }
        // An output view over the query's memory.
        expectError("query") {
            try check(
                q: TensorView(address: memory, storage: .f32, strides: nil, capacity: 64),
                o: TensorView(address: memory + 32, storage: .f32, strides: nil, capacity: 64))
        }
        // A view that fits is accepted (offset 147 is the last element; capacity 148).
        try check(
            k: TensorView(
                address: memory, storage: .f32, strides: .init(batch: 0, head: 100, sequence: 8), capacity: 148))
    }
}

/// Views whose rows are closer than a row (stride 0: one row broadcast to every key or head) are
/// legal inputs; SGEMM cannot take them as leading dimensions, so the backends must not either.
@Suite struct BroadcastViews {
    @Test func zeroStridesGiveTheReferenceResult() throws {
        let (hq, hkv, nq, nk, d) = (4, 2, 40, 70, 16)
        var rng = SplitMix64(seed: 11)
        let qRow = (0..<(hq * d)).map { _ in Float.random(in: -1...1, using: &rng) }  // one position, every head
        let kRow = (0..<(hkv * d)).map { _ in Float.random(in: -1...1, using: &rng) }  // one key row per head
        let v = (0..<(hkv * nk * d)).map { _ in Float.random(in: -1...1, using: &rng) }
        let problem = try AttentionProblem(query: [1, hq, nq, d], key: [1, hkv, nk, d], value: [1, hkv, nk, d])
        // The same values as dense tensors, for the reference.
        var qDense: [Float] = []
        var kDense: [Float] = []
        for h in 0..<hq { for _ in 0..<nq { qDense += qRow[(h * d)..<((h + 1) * d)] } }
        for h in 0..<hkv { for _ in 0..<nk { kDense += kRow[(h * d)..<((h + 1) * d)] } }
        let reference = NaiveBackend.reference(
            problem, query: try Tensor(shape: problem.queryShape, storage: qDense),
            key: try Tensor(shape: problem.keyShape, storage: kDense),
            value: try Tensor(shape: problem.valueShape, storage: v))
        for backend in LayoutAndStorageParity.backends() {
            var out = [Float](repeating: .nan, count: hq * nq * d)
            try qRow.withUnsafeBufferPointer { q in
                try kRow.withUnsafeBufferPointer { k in
                    try v.withUnsafeBufferPointer { vb in
                        try out.withUnsafeMutableBufferPointer { o in
                            try backend.forward(
                                problem,
                                AttentionBuffers(
                                    query: TensorView(q, strides: Strides(batch: 0, head: d, sequence: 0)),
                                    key: TensorView(k, strides: Strides(batch: 0, head: d, sequence: 0)),
                                    value: TensorView(vb), output: TensorView(o), logSumExp: nil))
                        }
                    }
                }
            }
            for (got, want) in zip(out, reference.output) {
                #expect(AccuracyReport.withinTolerance(Double(got), of: want), "\(backend.name): \(got) vs \(want)")
            }
        }
    }

    @Test func aLogSumExpBufferOverInputsIsRefused() throws {
        let problem = try AttentionProblem(query: [1, 1, 4, 8], key: [1, 1, 4, 8], value: [1, 1, 4, 8])
        var memory = [Float](repeating: 0, count: 64)
        var out = [Float](repeating: 0, count: 32)
        memory.withUnsafeMutableBufferPointer { m in
            out.withUnsafeMutableBufferPointer { o in
                let input = TensorView(UnsafeBufferPointer(rebasing: m[0..<32]))
                let lse = UnsafeMutableBufferPointer(rebasing: m[4..<8])
                #expect(throws: AttentionError.overlappingOutput("the log-sum-exp buffer overlaps the query")) {
                    try AttentionBuffers(query: input, key: input, value: input, output: TensorView(o), logSumExp: lse)
                        .check(against: problem)
                }
            }
        }
    }
}
