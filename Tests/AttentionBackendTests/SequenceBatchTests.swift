import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionMachine
import AttentionOpenCL
import AttentionVerification
import Foundation
import Testing

/// Batches of sequences (varlen, cache lengths, paged) on every backend, sequence by sequence
/// against the float64 reference of each sequence alone.
@Suite struct SequenceBatchParity {
    /// Decode-like and prefill-like batches with lengths 0, 1 and long side by side.
    static let cases: [SequenceBatchCase] = [
        SequenceBatchCase(queryLengths: [1, 1, 1, 1], keyLengths: [0, 1, 2500, 37], heads: (8, 2), d: 32, dv: 16),
        SequenceBatchCase(
            queryLengths: [1, 1, 1], keyLengths: [4200, 5, 300], heads: (4, 1), d: 64, dv: 64,
            options: .init(causal: true), keyValue: .f16, amplitude: 4),
        SequenceBatchCase(
            queryLengths: [3, 3], keyLengths: [2, 700], heads: (4, 2), d: 16, dv: 24,
            options: .init(causal: true, window: .init(left: 100, right: 0)), keyValue: .bf16),
        SequenceBatchCase(
            queryLengths: [2, 2, 2], keyLengths: [130, 0, 17], heads: (2, 2), d: 16, dv: 16,
            options: .init(softcap: 5), amplitude: 20),
    ]

    /// Prefill-like (packed only: cache and paged batches share one Nq).
    static let packedCases: [SequenceBatchCase] = [
        SequenceBatchCase(
            queryLengths: [0, 1, 90, 40], keyLengths: [5, 1, 90, 60], heads: (4, 2), d: 32, dv: 32,
            options: .init(causal: true)),
        SequenceBatchCase(
            queryLengths: [33, 7], keyLengths: [0, 200], heads: (2, 1), d: 16, dv: 8, keyValue: .f16),
        // No query rows at all, and no key rows at all: nothing to read or write, never a trap.
        SequenceBatchCase(queryLengths: [0, 0], keyLengths: [3, 5], heads: (2, 1), d: 16, dv: 16),
        SequenceBatchCase(queryLengths: [2, 1], keyLengths: [0, 0], heads: (2, 1), d: 16, dv: 16),
    ]

    static let forms: [SequenceForm] = [
        .packed, .cacheLengths(.bhsd), .cacheLengths(.bshd), .paged(pageSize: 1), .paged(pageSize: 16),
        .paged(pageSize: 256),
    ]

    @Test(arguments: forms)
    func everyBackend(_ form: SequenceForm) throws {
        var cases = Self.cases
        if form == .packed { cases += Self.packedCases }
        for c in cases {
            for backend in LayoutAndStorageParity.backends() {
                let run = try SequenceBatchRun(backend, c, form: form)
                #expect(run.report.passed, "\(backend.name) \(form) on \(c): \(run.report)")
            }
        }
    }

    @Test func prefillLikeCacheBatches() throws {
        let c = SequenceBatchCase(
            queryLengths: [20, 20], keyLengths: [20, 300], heads: (4, 2), d: 32, dv: 32, options: .init(causal: true),
            keyValue: .f16)
        for form in [SequenceForm.cacheLengths(.bshd), .paged(pageSize: 16)] {
            for backend in LayoutAndStorageParity.backends() {
                let run = try SequenceBatchRun(backend, c, form: form)
                #expect(run.report.passed, "\(backend.name) \(form) on \(c): \(run.report)")
            }
        }
    }
}

/// Every malformed batch is a typed error before anything is read.
@Suite struct SequenceBatchValidation {
    @Test func decreasingOffsets() {
        #expect(
            throws: AttentionError.invalidSequenceOffsets(
                name: "cuSeqlensQ", index: 2, reason: "1 is below the previous offset 3")
        ) {
            _ = try SequenceBatch(
                query: [4, 2, 8], key: [4, 2, 8], value: [4, 2, 8],
                layout: .packed(queryOffsets: [0, 3, 1, 4], keyOffsets: [0, 1, 2, 4]))
        }
    }

    @Test func offsetsBeyondTheTensor() throws {
        do {
            _ = try SequenceBatch(
                query: [4, 2, 8], key: [4, 2, 8], value: [4, 2, 8],
                layout: .packed(queryOffsets: [0, 2, 4], keyOffsets: [0, 2, 9]))
            Issue.record("accepted a key offset beyond the tensor")
        } catch let error {
            guard case .invalidSequenceOffsets(name: "cuSeqlensK", index: 2, _) = error else {
                Issue.record("wrong error \(error)")
                return
            }
        }
        #expect(throws: AttentionError.self) {
            _ = try SequenceBatch(
                query: [4, 2, 8], key: [4, 2, 8], value: [4, 2, 8],
                layout: .packed(queryOffsets: [1, 2, 4], keyOffsets: [0, 2, 4]))
        }
        #expect(throws: AttentionError.self) {
            _ = try SequenceBatch(
                query: [4, 2, 8], key: [4, 2, 8], value: [4, 2, 8],
                layout: .packed(queryOffsets: [0, 2, 3], keyOffsets: [0, 2, 4]))
        }
    }

    @Test func lengthsBeyondCapacity() {
        #expect(throws: AttentionError.invalidCacheLength(sequence: 1, length: 9, limit: 8)) {
            _ = try SequenceBatch(
                query: [2, 2, 1, 8], key: [2, 2, 8, 8], value: [2, 2, 8, 8], layout: .cacheLengths([3, 9]))
        }
        #expect(throws: AttentionError.invalidCacheLength(sequence: 0, length: -1, limit: 8)) {
            _ = try SequenceBatch(
                query: [2, 2, 1, 8], key: [2, 2, 8, 8], value: [2, 2, 8, 8], layout: .cacheLengths([-1, 2]))
        }
    }

    @Test func badPages() {
        let table = PageTable(pageSize: 4, maxPages: 2, blockTable: [0, 1, 2, 7])
        // Sequence 1 needs two pages; its second names page 7 of a 4-page pool.
        #expect(throws: AttentionError.self) {
            _ = try SequenceBatch(
                query: [2, 2, 1, 8], key: [4, 4, 2, 8], value: [4, 4, 2, 8],
                layout: .paged(lengths: [3, 6], table: table))
        }
        // A length beyond the table's pages.
        #expect(throws: AttentionError.invalidCacheLength(sequence: 0, length: 9, limit: 8)) {
            _ = try SequenceBatch(
                query: [2, 2, 1, 8], key: [4, 4, 2, 8], value: [4, 4, 2, 8],
                layout: .paged(lengths: [9, 2], table: table))
        }
        // Page size not a power of two.
        #expect(throws: AttentionError.invalidPageTable(reason: "page size 3 is not a power of two from 1 to 1024")) {
            _ = try SequenceBatch(
                query: [1, 2, 1, 8], key: [4, 3, 2, 8], value: [4, 3, 2, 8],
                layout: .paged(lengths: [2], table: PageTable(pageSize: 3, maxPages: 1, blockTable: [0])))
        }
        // Entries past a sequence's length are never read, so -1 is fine there.
        #expect(throws: Never.self) {
            _ = try SequenceBatch(
                query: [2, 2, 1, 8], key: [4, 4, 2, 8], value: [4, 4, 2, 8],
                layout: .paged(
                    lengths: [3, 4], table: PageTable(pageSize: 4, maxPages: 2, blockTable: [0, -1, 2, -1])))
        }
    }

    @Test func masksAreRefused() throws {
        let mask = try AttentionMask(shape: [1, 1], allowed: [true])
        #expect(throws: AttentionError.self) {
            _ = try SequenceBatch(
                query: [1, 2, 8], key: [1, 2, 8], value: [1, 2, 8],
                layout: .packed(queryOffsets: [0, 1], keyOffsets: [0, 1]), options: .init(mask: mask))
        }
    }

    @Test func buffersTooSmall() throws {
        let batch = try SequenceBatch(
            query: [3, 2, 8], key: [5, 2, 8], value: [5, 2, 8],
            layout: .packed(queryOffsets: [0, 3], keyOffsets: [0, 5]))
        let small = [Float](repeating: 0, count: 79)
        var out = [Float](repeating: 0, count: 48)
        small.withUnsafeBufferPointer { k in
            out.withUnsafeMutableBufferPointer { o in
                let q = [Float](repeating: 0, count: 48)
                q.withUnsafeBufferPointer { q in
                    let buffers = AttentionBuffers(query: q, key: k, value: k, output: o, logSumExp: nil)
                    #expect(throws: AttentionError.self) { try NaiveBackend().forward(batch, buffers) }
                }
            }
        }
    }
}

/// The dispatcher models a batch by the sum over its sequences, not the padded product.
@Suite struct SequenceBatchDispatch {
    @Test func workIsTheSumOverSequences() throws {
        let lengths: [Int32] = [16384] + Array(repeating: 512, count: 15)
        let batch = try SequenceBatch(
            query: [16, 32, 1, 128], key: [16, 8, 16384, 128], value: [16, 8, 16384, 128],
            layout: .cacheLengths(lengths), storage: StorageTypes(keyValue: .f16))
        let padded = try #require(batch.paddedProblem)
        #expect(batch.keyValueBytes == Double(16384 + 15 * 512) * 8 * 256 * 2)
        #expect(batch.keyValueBytes < padded.keyValueBytes / 5)
        #expect(batch.flops < padded.flops / 5)
        let dispatcher = Dispatcher()
        let decision = dispatcher.decide(batch)
        let paddedDecision = dispatcher.decide(padded)
        let chosen = try #require(decision.options[decision.chosenIndex].estimatedSeconds)
        let paddedChosen = try #require(paddedDecision.options[paddedDecision.chosenIndex].estimatedSeconds)
        #expect(chosen < paddedChosen / 3, "batch \(chosen) s against padded \(paddedChosen) s")
        #expect(decision.chosen.support(for: batch).isSupported)
    }
}
