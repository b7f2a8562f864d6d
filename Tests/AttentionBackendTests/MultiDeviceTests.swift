import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionMachine
import AttentionOpenCL
import AttentionVerification
import Testing

/// `AttentionProblem.block`: a rectangle of rows and keys re-expressed as its own problem sees exactly
/// the pairs the full problem sees there.
@Suite struct AttentionBlocks {
    static let rules: [(Bool, AttentionWindow?)] = [
        (false, nil), (true, nil), (true, .init(left: 3, right: 0)), (false, .init(left: 2, right: 5)),
        (false, .init(left: -1, right: 1)), (false, .init(left: 4, right: -1)), (true, .init(left: 0, right: 0)),
    ]

    /// Slices of masks: all of a mask is the mask itself (a split by heads of a mask broadcast over
    /// heads copies nothing); a part is exactly the elements it covers, in the mask's broadcast form.
    @Test func maskSlicesAreTheCoveredElements() throws {
        let (b, hq, nq, nk) = (2, 4, 5, 7)
        let allowed = (0..<(b * nq * nk)).map { ($0 * 5) % 3 != 0 }
        let broadcast = try AttentionMask(shape: [b, 1, nq, nk], allowed: allowed)
        let p = try AttentionProblem(
            query: [b, hq, nq, 8], key: [b, 2, nk, 8], value: [b, 2, nk, 8], options: .init(mask: broadcast))
        let whole = try broadcast.slice(p, batches: 0..<b, heads: 1..<3, queries: 0..<nq, keys: 0..<nk)
        #expect(whole == broadcast)
        let part = try broadcast.slice(p, batches: 1..<2, heads: 0..<hq, queries: 2..<4, keys: 3..<7)
        #expect(part.shape == [1, 1, 2, 4])
        var expected: [Bool] = []
        for i in 2..<4 { for j in 3..<7 { expected.append(allowed[(1 * nq + i) * nk + j]) } }
        #expect(part.values == .boolean(expected))
        let additive = try AttentionMask(shape: [nq, nk], additive: (0..<(nq * nk)).map { Float($0) })
        let q = try AttentionProblem(
            query: [b, hq, nq, 8], key: [b, 2, nk, 8], value: [b, 2, nk, 8], options: .init(mask: additive))
        #expect(try additive.slice(q, batches: 1..<2, heads: 2..<4, queries: 0..<nq, keys: 0..<nk) == additive)
        let rows = try additive.slice(q, batches: 0..<b, heads: 0..<hq, queries: 4..<5, keys: 0..<2)
        #expect(rows.shape == [1, 2] && rows.values == .additive([28, 29]))
    }

    @Test func blocksSeeWhatTheFullProblemSees() throws {
        for (nq, nk) in [(9, 9), (5, 12), (12, 5), (1, 7), (7, 1)] {
            for (causal, window) in Self.rules {
                let p = try AttentionProblem(
                    query: [1, 1, nq, 4], key: [1, 1, nk, 4], value: [1, 1, nk, 4],
                    options: .init(causal: causal, window: window))
                for q0 in 0..<nq {
                    for q1 in (q0 + 1)...nq {
                        for k0 in 0..<nk {
                            for k1 in (k0 + 1)...nk {
                                try Self.check(p, queries: q0..<q1, keys: k0..<k1)
                            }
                        }
                    }
                }
            }
        }
    }

    static func check(_ p: AttentionProblem, queries: Range<Int>, keys: Range<Int>) throws {
        func seen(_ i: Int, _ j: Int) -> Bool {
            let (lo, hi) = p.visibleKeys(forQuery: i)
            return lo <= j && j <= hi
        }
        let anyVisible = queries.contains { i in keys.contains { seen(i, $0) } }
        guard let block = p.block(queries: queries, keys: keys) else {
            #expect(!anyVisible, "nil block for \(queries) x \(keys) of \(p.queryLength)x\(p.keyLength)")
            return
        }
        #expect(queries.contains(block.queries.lowerBound) && block.queries.upperBound <= queries.upperBound)
        #expect(keys.contains(block.keys.lowerBound) && block.keys.upperBound <= keys.upperBound)
        let local = try AttentionProblem(
            query: [1, 1, block.queries.count, 4], key: [1, 1, block.keys.count, 4],
            value: [1, 1, block.keys.count, 4],
            options: .init(causal: block.causal, window: block.window))
        for i in queries {
            for j in keys {
                var inBlock = false
                if block.queries.contains(i), block.keys.contains(j) {
                    let (lo, hi) = local.visibleKeys(forQuery: i - block.queries.lowerBound)
                    let jl = j - block.keys.lowerBound
                    inBlock = lo <= jl && jl <= hi
                }
                let position = "(\(i), \(j)) of \(queries) x \(keys), \(p.queryLength)x\(p.keyLength)"
                #expect(
                    inBlock == seen(i, j),
                    "\(position) causal \(p.options.causal) window \(String(describing: p.options.window)): \(block)")
            }
        }
    }
}

/// `MultiDeviceBackend`: every split on BLAS + the reference, and BLAS + each OpenCL device, against
/// the float64 reference, on the layout sweep's cases, layouts and storage types.
@Suite struct MultiDeviceParity {
    static func members() -> [[any AttentionBackend]] {
        var sets: [[any AttentionBackend]] = [[BLASBackend(), NaiveBackend()]]
        for index in OpenCLRuntime.availableDevices.indices {
            sets.append([BLASBackend(), OpenCLBackend(device: index)])
        }
        return sets
    }

    static let cases: [VerificationCase] =
        StorageSweep.cases + [
            VerificationCase(
                batch: 3, heads: (6, 3), nq: 37, nk: 53, d: 16, dv: 24,
                options: .init(causal: true, window: .init(left: 9, right: 0)), label: "GQA window"),
            VerificationCase(
                heads: (2, 1), nq: 64, nk: 64, d: 32, dv: 32, options: .init(causal: true), amplitude: 8,
                label: "causal large logits"),
        ]

    @Test(arguments: MultiDeviceBackend.Split.allCases)
    func everySplit(_ split: MultiDeviceBackend.Split) throws {
        for members in Self.members() {
            for weights in [[1.0, 1.0], [3.0, 1.0]] {
                let backend = try MultiDeviceBackend(members: members, weights: weights, split: split)
                for c in Self.cases where c.work <= 4_000_000 {
                    for (layout, storage) in [
                        (OperandLayout.bhsd, StorageTypes.f32), (.bshd, StorageTypes(query: .f32, keyValue: .f16)),
                        (.cacheView, StorageTypes(query: .bf16, keyValue: .bf16, output: .f16)),
                    ] where layout.fits(c, storage) {
                        let run = try LayoutRun(backend, c, layout: layout, storage: storage)
                        #expect(run.report.passed, "\(backend.name) \(split) \(weights) \(layout) \(storage) \(c)")
                        #expect(run.outputPaddingIntact, "\(backend.name) \(split) wrote outside O on \(c)")
                    }
                }
            }
        }
    }

    /// Masks (per head, broadcast, additive) are cut to each part.
    @Test(arguments: MultiDeviceBackend.Split.allCases)
    func masksAreCut(_ split: MultiDeviceBackend.Split) throws {
        var rng = SplitMix64(seed: 5)
        let (b, hq, hkv, nq, nk) = (2, 4, 2, 9, 31)
        let masks = [
            try AttentionMask(
                shape: [b, hq, nq, nk], allowed: (0..<(b * hq * nq * nk)).map { _ in rng.next() % 3 != 0 }),
            try AttentionMask(shape: [nq, nk], additive: (0..<(nq * nk)).map { _ in Float(rng.next() % 5) - 2 }),
            try AttentionMask(shape: [hq, nq, nk], allowed: (0..<(hq * nq * nk)).map { $0 % 31 != 4 && $0 % 7 != 0 }),
        ]
        for mask in masks {
            let c = VerificationCase(
                batch: b, heads: (hq, hkv), nq: nq, nk: nk, d: 8, dv: 8, options: .init(causal: true, mask: mask),
                label: "mask")
            for members in Self.members() {
                let backend = try MultiDeviceBackend(members: members, weights: [2, 1], split: split)
                let run = try LayoutRun(backend, c, layout: .bhsd, storage: .f32)
                #expect(run.report.passed, "\(backend.name) \(split) mask \(mask.shape): \(run.report)")
            }
        }
    }

    /// The same call several times gives the same bits (the merge runs in member order), on every member
    /// set (BLAS + the reference, BLAS + each OpenCL device), and key splits balance causal work: the first
    /// member's keys are more than its weight's share of the keys.
    @Test func reproducibleAndBalanced() throws {
        let problem = try AttentionProblem(
            query: [1, 2, 200, 16], key: [1, 2, 200, 16], value: [1, 2, 200, 16], options: .init(causal: true))
        let q = try Tensor.random(shape: [1, 2, 200, 16], seed: 1)
        let k = try Tensor.random(shape: [1, 2, 200, 16], seed: 2)
        let v = try Tensor.random(shape: [1, 2, 200, 16], seed: 3)
        for members in Self.members() {
            let backend = try MultiDeviceBackend(members: members, weights: [1, 1], split: .keys)
            let partition = try backend.partition(problem)
            #expect(partition.parts.count == 2)
            // Causal: early keys are seen by more rows, so the first half of the work is fewer than half the keys.
            #expect(partition.parts[0].problem.keyLength < 100 && partition.parts[0].problem.keyLength > 50)
            let first = try backend.attention(query: q, key: k, value: v, options: .init(causal: true))
            for _ in 0..<3 {
                let again = try backend.attention(query: q, key: k, value: v, options: .init(causal: true))
                #expect(
                    first.output.storage.map(\.bitPattern) == again.output.storage.map(\.bitPattern), "\(backend.name)")
                #expect(
                    first.logSumExp.storage.map(\.bitPattern) == again.logSumExp.storage.map(\.bitPattern),
                    "\(backend.name)")
            }
        }
    }

    @Test func automaticSplitAndExplanation() throws {
        let backend = try MultiDeviceBackend(members: [BLASBackend(), NaiveBackend()])
        let byHeads = try AttentionProblem(query: [1, 8, 64, 32], key: [1, 4, 64, 32], value: [1, 4, 64, 32])
        #expect(try backend.partition(byHeads).split == .heads)
        #expect(backend.plan(for: byHeads).path.contains("split by heads (blas 2, naive 2 K/V heads)"))
        let byBatch = try AttentionProblem(query: [4, 3, 8, 32], key: [4, 1, 8, 32], value: [4, 1, 8, 32])
        #expect(try backend.partition(byBatch).split == .batch)
        let byKeys = try AttentionProblem(query: [1, 3, 1, 32], key: [1, 1, 5000, 32], value: [1, 1, 5000, 32])
        #expect(try backend.partition(byKeys).split == .keys)
        #expect(backend.plan(for: byKeys).path.hasSuffix("+ LSE merge"))
    }

    @Test func badMembersAndWeightsAreTypedErrors() throws {
        #expect(throws: AttentionError.self) { try MultiDeviceBackend(members: [BLASBackend()]) }
        #expect(throws: AttentionError.self) { try MultiDeviceBackend(members: [BLASBackend(), BLASBackend()]) }
        #expect(throws: AttentionError.self) {
            try MultiDeviceBackend(members: [BLASBackend(), NaiveBackend()], weights: [1, .nan])
        }
        #expect(throws: AttentionError.self) {
            try MultiDeviceBackend(members: [BLASBackend(), NaiveBackend()], weights: [1])
        }
        let inner = try MultiDeviceBackend(members: [BLASBackend(), NaiveBackend()])
        #expect(throws: AttentionError.self) { try MultiDeviceBackend(members: [inner, NaiveBackend()]) }
        #expect(try BackendID(parsing: "multi:blas+opencl:1") == .multi([.blas, .opencl(device: 1)]))
        #expect(BackendID.multi([.blas, .naive]).description == "multi:blas+naive")
        for bad in ["multi:blas", "multi:blas+blas", "multi:multi:blas+naive", "multi:blas+cuda"] {
            #expect(throws: AttentionError.self) { try BackendID(parsing: bad) }
        }
    }

    /// A member that cannot run its part makes the whole backend say so, naming the member.
    @Test func unsupportedMemberIsExplained() throws {
        let backend = try MultiDeviceBackend(members: [BLASBackend(), OpenCLBackend(device: 99)], split: .heads)
        let problem = try AttentionProblem(query: [1, 2, 4, 8], key: [1, 2, 4, 8], value: [1, 2, 4, 8])
        guard case .unsupported(let reason) = backend.support(for: problem) else {
            Issue.record("a missing OpenCL device must make the split unsupported")
            return
        }
        #expect(reason.contains("opencl:99"))
    }

    /// The dispatcher lists the multi-device candidate where there are two devices, and on a machine
    /// whose devices all compute on the host's cores it never picks it, and says why.
    @Test func dispatcherConsidersIt() throws {
        let dispatcher = Dispatcher(configuration: .init(), profile: .defaults(configuration: .init()))
        let multi = dispatcher.candidates.first { $0.backend is MultiDeviceBackend }
        guard !OpenCLRuntime.availableDevices.isEmpty else {
            #expect(multi == nil)
            return
        }
        let candidate = try #require(multi)
        let problem = try AttentionProblem(query: [1, 8, 512, 64], key: [1, 8, 512, 64], value: [1, 8, 512, 64])
        let decision = dispatcher.decide(problem)
        let option = try #require(decision.options.first { $0.backend == candidate.backend.id })
        #expect(option.estimatedSeconds != nil)
        if OpenCLRuntime.availableDevices.allSatisfy(\.info.isCPU) {
            #expect(decision.winner.backend != candidate.backend.id)
            #expect(option.detail.contains("members share the host's cores"))
        }
        // Forced by name, it runs.
        let forced = try dispatcher.backend(candidate.backend.id)
        #expect(forced.id == candidate.backend.id)
    }
}
