import AttentionKit
import AttentionVerification
import Dispatch
import Foundation

/// The serving shapes: batches of sequences of different lengths, each next to the same work in
/// other forms (contiguous caches; every sequence padded to the longest and masked) so the cost of
/// paging and the saving over padding are measured in the same run.
enum ServingShape: String, CaseIterable {
    /// 16 sequences, lengths seeded in [512, 16384], Hq32 Hkv8 D128, one query each, fp16 K/V in
    /// pages of 16.
    case serveDecode = "serve-decode"
    /// 8 packed prompts of 100 to 3000 tokens, causal, Hq32 Hkv8 D128.
    case servePrefill = "serve-prefill"

    static let (queryHeads, keyValueHeads, headDim) = (32, 8, 128)
    static let pageSize = 16

    /// The sequence lengths (seeded, so every run and machine measures the same batch).
    var lengths: [Int] {
        var rng = SplitMix64(seed: self == .serveDecode ? 2026 : 2027)
        switch self {
        case .serveDecode: return (0..<16).map { _ in Int.random(in: 512...16384, using: &rng) }
        case .servePrefill: return (0..<8).map { _ in Int.random(in: 100...3000, using: &rng) }
        }
    }

    var summary: String {
        let l = lengths
        let form = self == .serveDecode ? "Nq1, paged P\(Self.pageSize)" : "Nq = Nk, causal, packed"
        return "S\(l.count) Nk \(l.min() ?? 0)-\(l.max() ?? 0) (sum \(l.reduce(0, +))) H32/8 D128, \(form)"
    }
}

/// Element `index` of a reproducible input stream: uniform in [-1, 1), without storing it.
private func inputValue(_ stream: UInt64, _ index: Int) -> Float {
    var z = stream &* 0x9E37_79B9_7F4A_7C15 &+ UInt64(index) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    z ^= z >> 31
    return Float(z >> 40) / Float(1 << 23) - 1
}

/// serve-decode's K and V of sequence `s` in [Hkv, n, D] order: token j of head h is the contiguous
/// form's element ((s·Hkv + h)·capacity + j)·D, the streams every form is filled from.
private func serveDecodeTokens(sequence s: Int, length n: Int, capacity: Int) -> (keys: [Float], values: [Float]) {
    let (hkv, d) = (ServingShape.keyValueHeads, ServingShape.headDim)
    var keys = [Float](repeating: 0, count: hkv * n * d)
    var values = keys
    for h in 0..<hkv {
        for j in 0..<n {
            let from = ((s * hkv + h) * capacity + j) * d
            for e in 0..<d {
                keys[(h * n + j) * d + e] = inputValue(2, from + e)
                values[(h * n + j) * d + e] = inputValue(3, from + e)
            }
        }
    }
    return (keys, values)
}

/// Times one form of a serving shape on every backend, round-robin, and returns a row per backend.
struct ServingBench {
    var repetitions: Int
    var cellBudget: Double
    var roofline: Roofline

    func run(_ shape: ServingShape, storage: StorageTypes, backends: [BenchBackend]) -> [BenchRow] {
        // The reference backend would take seconds per call here; it checks these paths in the tests.
        let entries = backends.filter { $0.family != "naive" }
        do {
            switch shape {
            case .serveDecode: return try decode(storage: storage, entries)
            case .servePrefill: return try prefill(storage: storage, entries)
            }
        } catch {
            return entries.map { entry in
                var row = emptyRow(shape.rawValue, shape.summary, storage, entry)
                row.skipped = "failed: \(error)"
                return row
            }
        }
    }

    private func emptyRow(_ name: String, _ summary: String, _ storage: StorageTypes, _ entry: BenchBackend)
        -> BenchRow
    {
        BenchRow(
            shape: name, shapeSummary: summary, storage: storage.description, layout: "-", backend: entry.family,
            device: entry.device, repetitions: 0, dispatcherPick: "", backendName: entry.label)
    }

    // MARK: serve-decode

    private func decode(storage requested: StorageTypes, _ entries: [BenchBackend]) throws -> [BenchRow] {
        let shape = ServingShape.serveDecode
        var storage = requested
        if storage.keyValue == .f32 { storage.keyValue = .f16 }  // the shape is defined with fp16 K/V
        let lengths = shape.lengths
        let (hq, hkv, d) = (ServingShape.queryHeads, ServingShape.keyValueHeads, ServingShape.headDim)
        let (count, capacity) = (lengths.count, lengths.max() ?? 1)
        let kShape = [count, hkv, capacity, d]
        // Keys past a sequence's length stay zero (never read by the batch forms; masked when padded).
        var k = [Float](repeating: 0, count: kShape.reduce(1, *))
        var v = k
        for b in 0..<count {
            for h in 0..<hkv {
                for j in 0..<lengths[b] {
                    let row = ((b * hkv + h) * capacity + j) * d
                    for e in 0..<d {
                        k[row + e] = inputValue(2, row + e)
                        v[row + e] = inputValue(3, row + e)
                    }
                }
            }
        }
        let q = (0..<(count * hq * d)).map { inputValue(1, $0) }
        let contiguous = try ServingOperands(
            cachedQuery: q, [count, hq, 1, d], key: k, kShape, value: v, kShape, layout: .bhsd,
            lengths: lengths.map { Int32($0) }, options: .init(), storage: storage)
        defer { contiguous.deallocate() }
        let paged = try contiguous.paged(pageSize: ServingShape.pageSize, seed: 5)
        defer { paged.deallocate() }
        k = []
        v = []
        let batch = paged.batch
        // Padded: the contiguous caches at full capacity, keys past each length masked out.
        var allowed = [Bool](repeating: false, count: count * capacity)
        for b in 0..<count { for j in 0..<lengths[b] { allowed[b * capacity + j] = true } }
        let padded = try AttentionProblem(
            query: [count, hq, 1, d], key: kShape, value: kShape,
            options: .init(mask: try AttentionMask(shape: [count, 1, 1, capacity], allowed: allowed)), storage: storage)
        let paddedBuffers = contiguous.buffers(logSumExp: nil)

        let forms: [(String, (BenchBackend) throws -> Void)] = [
            (shape.rawValue, { try $0.forward(batch, paged.buffers(logSumExp: nil)) }),
            (shape.rawValue + " contiguous", { try $0.forward(contiguous.batch, contiguous.buffers(logSumExp: nil)) }),
            (shape.rawValue + " padded", { try $0.forward(padded, paddedBuffers) }),
        ]
        // The same batch through an OpenCLKVCache (pages in device memory, filled once here), on each
        // OpenCL entry; other backends have no device-resident cache (their rows say so).
        let resident = ResidentCaches(lengths: lengths, storage: storage.keyValue)
        let query = try Tensor(shape: [count, hq, 1, d], storage: q)
        let residentForm: (String, (BenchBackend) throws -> Void) = (
            shape.rawValue + " resident",
            { entry in
                guard case .backend(let backend) = entry.kind, let openCL = backend as? OpenCLBackend else {
                    throw CLIError("device-resident caches (OpenCLKVCache) are for OpenCL devices")
                }
                let cache = try resident.cache(for: openCL)
                _ = try cache.attention(query: query, sequences: Array(0..<count))
            }
        )
        var rows = try timeForms(forms + [residentForm], shape, storage, entries, batch: batch)
        // Accuracy of the paged form: the shortest and the longest sequence against the reference.
        try checkDecodeRows(&rows, entries, paged, q: q, lengths: lengths)
        return rows
    }

    private func checkDecodeRows(
        _ rows: inout [BenchRow], _ entries: [BenchBackend], _ paged: ServingOperands, q: [Float], lengths: [Int]
    ) throws {
        let (hq, hkv, d) = (ServingShape.queryHeads, ServingShape.keyValueHeads, ServingShape.headDim)
        let capacity = lengths.max() ?? 1
        let type = paged.batch.storage.keyValue
        let checked = [
            lengths.indices.min { lengths[$0] < lengths[$1] } ?? 0,
            lengths.indices.max { lengths[$0] < lengths[$1] } ?? 0,
        ]
        for (index, entry) in entries.enumerated() where rows[index].skipped == nil {
            do {
                try entry.forward(paged.batch, paged.buffers(logSumExp: nil))
            } catch {
                continue
            }
            let output = paged.readOutput()
            var worst = AccuracyReport()
            for s in checked {
                let n = lengths[s]
                let tokens = serveDecodeTokens(sequence: s, length: n, capacity: capacity)
                let (keys, values) = (tokens.keys.map(type.rounded), tokens.values.map(type.rounded))
                let problem = try AttentionProblem(
                    query: [1, hq, 1, d], key: [1, hkv, n, d], value: [1, hkv, n, d])
                let query = try Tensor(shape: problem.queryShape, storage: Array(q[s * hq * d..<(s + 1) * hq * d]))
                let result = AttentionResult(
                    output: try Tensor(
                        shape: problem.outputShape, storage: Array(output[s * hq * d..<(s + 1) * hq * d])),
                    logSumExp: try Tensor(shape: problem.lseShape))
                let report = AccuracyReport.sampled(
                    problem, query: query, key: try Tensor(shape: problem.keyShape, storage: keys),
                    value: try Tensor(shape: problem.valueShape, storage: values), result: result, count: hq)
                worst.maxAbsError = max(worst.maxAbsError, report.maxAbsError)
                worst.violations += report.violations
            }
            rows[index].maxAbsError = worst.maxAbsError
            rows[index].withinTolerance = worst.violations == 0
        }
    }

    // MARK: serve-prefill

    private func prefill(storage: StorageTypes, _ entries: [BenchBackend]) throws -> [BenchRow] {
        let shape = ServingShape.servePrefill
        let lengths = shape.lengths
        let (hq, hkv, d) = (ServingShape.queryHeads, ServingShape.keyValueHeads, ServingShape.headDim)
        let total = lengths.reduce(0, +)
        let offsets = [Int32(0)] + lengths.indices.map { Int32(lengths[...$0].reduce(0, +)) }
        let q = (0..<(total * hq * d)).map { inputValue(1, $0) }
        let k = (0..<(total * hkv * d)).map { inputValue(2, $0) }
        let v = (0..<(total * hkv * d)).map { inputValue(3, $0) }
        let options = AttentionOptions(causal: true)
        let packed = try ServingOperands(
            packedQuery: q, [total, hq, d], key: k, [total, hkv, d], value: v, [total, hkv, d],
            queryOffsets: offsets, keyOffsets: offsets, options: options, storage: storage)
        defer { packed.deallocate() }
        // Padded: every prompt left-padded to the longest (so bottom-right causal still aligns), the
        // padding keys masked out; dense [B, H, N, D].
        let (count, longest) = (lengths.count, lengths.max() ?? 1)
        func pad(_ values: [Float], heads: Int) -> [Float] {
            var out = [Float](repeating: 0, count: count * heads * longest * d)
            for b in 0..<count {
                let shift = longest - lengths[b]
                for t in 0..<lengths[b] {
                    for h in 0..<heads {
                        let from = ((Int(offsets[b]) + t) * heads + h) * d
                        let to = ((b * heads + h) * longest + shift + t) * d
                        for e in 0..<d { out[to + e] = values[from + e] }
                    }
                }
            }
            return out
        }
        var allowed = [Bool](repeating: false, count: count * longest * longest)
        for b in 0..<count {
            for i in 0..<longest where i >= longest - lengths[b] {
                for j in (longest - lengths[b])..<longest { allowed[(b * longest + i) * longest + j] = true }
            }
        }
        let padded = try AttentionProblem(
            query: [count, hq, longest, d], key: [count, hkv, longest, d], value: [count, hkv, longest, d],
            options: .init(
                causal: true, mask: try AttentionMask(shape: [count, 1, longest, longest], allowed: allowed)),
            storage: storage)
        let paddedOperands = try OperandMemory(
            padded, layout: .bhsd, q: try Tensor(shape: padded.queryShape, storage: pad(q, heads: hq)),
            k: try Tensor(shape: padded.keyShape, storage: pad(k, heads: hkv)),
            v: try Tensor(shape: padded.valueShape, storage: pad(v, heads: hkv)))
        defer { paddedOperands.deallocate() }
        let paddedBuffers = paddedOperands.buffers(logSumExp: nil)
        let forms: [(String, (BenchBackend) throws -> Void)] = [
            (shape.rawValue, { try $0.forward(packed.batch, packed.buffers(logSumExp: nil)) }),
            (shape.rawValue + " padded", { try $0.forward(padded, paddedBuffers) }),
        ]
        return try timeForms(forms, shape, storage, entries, batch: packed.batch)
    }

    // MARK: Timing

    /// Every (form, backend) cell timed round-robin; GFLOP/s and K/V GB/s count the batch's useful
    /// work in every form, so a padded row's lower rate is the padding's waste.
    private func timeForms(
        _ forms: [(String, (BenchBackend) throws -> Void)], _ shape: ServingShape, _ storage: StorageTypes,
        _ entries: [BenchBackend], batch: SequenceBatch
    ) throws -> [BenchRow] {
        var rows: [BenchRow] = []
        var cells: [(row: Int, call: () throws -> Void)] = []
        for (name, call) in forms {
            for entry in entries {
                var row = emptyRow(name, shape.summary, storage, entry)
                do {
                    try call(entry)  // warm-up, and whether it runs at all
                    cells.append((rows.count, { try call(entry) }))
                } catch {
                    row.skipped = "\(error)"
                }
                rows.append(row)
            }
        }
        var times = [[Double]](repeating: [], count: rows.count)
        var spent = [Double](repeating: 0, count: rows.count)
        for round in 0..<repetitions {
            for cell in cells where round == 0 || spent[cell.row] + (times[cell.row].last ?? 0) <= cellBudget {
                let start = DispatchTime.now().uptimeNanoseconds
                try cell.call()
                let seconds = Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
                times[cell.row].append(seconds)
                spent[cell.row] += seconds
            }
        }
        let decodeLike = batch.regime == .decodeLike
        for index in rows.indices where !times[index].isEmpty {
            let sorted = times[index].sorted()
            let median = sorted[sorted.count / 2]
            rows[index].repetitions = sorted.count
            rows[index].medianSeconds = median
            rows[index].minSeconds = sorted.first
            rows[index].maxSeconds = sorted.last
            rows[index].gflops = batch.flops / median / 1e9
            rows[index].rooflineFraction = rows[index].gflops.map { $0 / roofline.sgemmGFLOPS }
            if decodeLike {
                rows[index].keyValueGBps = batch.keyValueBytes / median / 1e9
                rows[index].bandwidthFraction = rows[index].keyValueGBps.map { $0 / roofline.memoryReadGBps }
            }
        }
        // Notes: each form against the first (the batch form) on the same backend.
        let perForm = entries.count
        for index in rows.indices where index >= perForm {
            guard let own = rows[index].medianSeconds, let base = rows[index % perForm].medianSeconds else { continue }
            rows[index].kernel = "\(format(own / base)) x the time of \(shape.rawValue)"
        }
        return rows
    }
}

/// serve-decode's sequences in an `OpenCLKVCache` per OpenCL backend, filled on first use with the
/// same tokens as the other forms (fp16 pages of `ServingShape.pageSize`).
private final class ResidentCaches {
    let lengths: [Int]
    let storage: StorageType
    private var caches: [String: OpenCLKVCache] = [:]

    init(lengths: [Int], storage: StorageType) {
        self.lengths = lengths
        self.storage = storage
    }

    func cache(for backend: OpenCLBackend) throws -> OpenCLKVCache {
        if let cache = caches[backend.name] { return cache }
        let (hkv, d, pageSize) = (ServingShape.keyValueHeads, ServingShape.headDim, ServingShape.pageSize)
        let capacity = lengths.max() ?? 1
        let pages = lengths.reduce(0) { $0 + ($1 + pageSize - 1) / pageSize }
        let cache = try OpenCLKVCache(
            backend: backend, keyValueHeads: hkv, headDim: d, pageSize: pageSize, pageCapacity: pages, storage: storage)
        for (b, n) in lengths.enumerated() {
            // [Hkv, n, D] as the cache takes tokens, [n, Hkv, D].
            let tokens = serveDecodeTokens(sequence: b, length: n, capacity: capacity)
            let id = cache.addSequence()
            try cache.append(
                sequence: id,
                keys: try Tensor(shape: [n, hkv, d], storage: permuteHeadsAndPositions(tokens.keys, [1, hkv, n, d])),
                values: try Tensor(
                    shape: [n, hkv, d], storage: permuteHeadsAndPositions(tokens.values, [1, hkv, n, d])))
        }
        caches[backend.name] = cache
        return cache
    }
}
