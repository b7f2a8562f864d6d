import AttentionCore
import AttentionKit
import Foundation

/// How a sequence of `length` positions is cut into the shards of `ranks` ranks.
public struct RingPlan: Sendable, Equatable {
    public enum Sharding: String, Sendable, CaseIterable, CustomStringConvertible {
        /// Rank r holds positions [r·N/P, (r+1)·N/P).
        case contiguous
        /// The sequence in 2P chunks; rank r holds chunks r and 2P-1-r, so that under causal masking
        /// every rank has one early and one late chunk and the same work (striped / zig-zag sharding).
        case zigzag
        public var description: String { rawValue }
    }

    /// Positions in all (the sum of the sequence lengths).
    public let length: Int
    public let ranks: Int
    public let sharding: Sharding
    /// The sequences packed end to end (one for a plain problem; varlen: each its own problem), each
    /// sharded across every rank on its own.
    public let sequenceLengths: [Int]

    public init(length: Int, ranks: Int, sharding: Sharding) {
        self.init(sequenceLengths: [length], ranks: ranks, sharding: sharding)
    }

    /// Packed sequences of these lengths (varlen): rank r holds its chunks of every sequence, in
    /// sequence order.
    public init(sequenceLengths: [Int], ranks: Int, sharding: Sharding) {
        self.sequenceLengths = sequenceLengths.map { max($0, 0) }
        self.length = self.sequenceLengths.reduce(0, +)
        self.ranks = max(ranks, 1)
        self.sharding = sharding
    }

    /// Rank `rank`'s pieces, in the order its local rows store them: the sequence, the range of
    /// positions within the sequence, and the same range in packed positions.
    public func pieces(of rank: Int) -> [(sequence: Int, positions: Range<Int>, packed: Range<Int>)] {
        var pieces: [(sequence: Int, positions: Range<Int>, packed: Range<Int>)] = []
        var start = 0
        for (sequence, n) in sequenceLengths.enumerated() {
            func cut(_ index: Int, of parts: Int) -> Range<Int> { index * n / parts..<(index + 1) * n / parts }
            let ranges: [Range<Int>]
            switch sharding {
            case .contiguous: ranges = [cut(rank, of: ranks)]
            case .zigzag: ranges = [cut(rank, of: 2 * ranks), cut(2 * ranks - 1 - rank, of: 2 * ranks)]
            }
            for range in ranges where !range.isEmpty {
                pieces.append((sequence, range, start + range.lowerBound..<start + range.upperBound))
            }
            start += n
        }
        return pieces
    }

    /// The packed positions rank `rank` holds, as ranges in the order its local rows store them.
    public func chunks(of rank: Int) -> [Range<Int>] { pieces(of: rank).map(\.packed) }

    /// How many positions rank `rank` holds.
    public func rows(of rank: Int) -> Int { chunks(of: rank).reduce(0) { $0 + $1.count } }

    /// The local row of global position `position` on rank `rank` (nil if it is not held there).
    public func localRow(of position: Int, on rank: Int) -> Int? {
        var offset = 0
        for chunk in chunks(of: rank) {
            if chunk.contains(position) { return offset + position - chunk.lowerBound }
            offset += chunk.count
        }
        return nil
    }
}

/// Where a ring call's time went, on one rank.
public struct RingTimings: Sendable, Equatable {
    /// Seconds spent computing partial blocks and merging them.
    public var computeSeconds: Double = 0
    /// Seconds the rank waited for a K/V exchange after its compute of the step was done: the
    /// communication compute did not hide.
    public var exposedCommunicationSeconds: Double = 0
    /// Bytes this rank sent.
    public var bytesSent: Int = 0
    /// Steps (= ranks).
    public var steps: Int = 0
    /// Blocks computed (pairs of a local query chunk and a visiting K/V chunk that see each other).
    public var blocks: Int = 0
    public init() {}
}

/// Context-parallel attention (Ring Attention): every rank holds a shard of the sequence's Q, K and V
/// rows (`RingPlan`), computes its queries against each K/V shard as the shards travel around the
/// ring, the next exchange running on a second thread while it computes, and merges the partial
/// results with the log-sum-exp, ending with its own O and LSE rows, equal to those of one call over
/// the whole sequence within the fp32 tolerance.
///
/// The global problem has Nq == Nk (self-attention over one sequence); causal (bottom-right aligned,
/// which is top-left here), windows, softcap, GQA and fp16/bf16 K/V are supported; masks are not
/// (a mask would have to be sharded too). Each block is an ordinary problem (`AttentionProblem.block`)
/// run by `backend`, or by the dispatcher's choice when it is nil.
public struct RingAttention: Sendable {
    public let problem: AttentionProblem
    public let plan: RingPlan
    public let backend: (any AttentionBackend)?
    /// Each packed sequence's own problem (the whole problem when there is one sequence).
    let sequenceProblems: [AttentionProblem]

    /// - Parameters:
    ///   - problem: the whole problem; with `sequenceLengths`, B = 1 and Nq = Nk = their sum.
    ///   - sequenceLengths: varlen: sequences packed end to end along N, each its own problem (causal
    ///     per sequence) and sharded on its own; nil: one sequence.
    public init(
        problem: AttentionProblem, sequenceLengths: [Int]? = nil, ranks: Int, sharding: RingPlan.Sharding = .zigzag,
        backend: (any AttentionBackend)? = nil
    ) throws(AttentionError) {
        guard problem.queryLength == problem.keyLength else {
            throw .unsupportedOption(
                "ring attention shards one sequence's Q, K and V rows: Nq (\(problem.queryLength)) must equal Nk "
                    + "(\(problem.keyLength)); for decode against a sharded cache use ShardedKVAttention")
        }
        guard problem.options.mask == nil else {
            throw .unsupportedOption("ring attention does not take a mask (causal and window rules only)")
        }
        guard ranks >= 1 else {
            throw .invalidConfiguration(setting: "ranks", value: "\(ranks)", reason: "at least one rank")
        }
        self.problem = problem
        self.backend = backend
        guard let lengths = sequenceLengths else {
            self.plan = RingPlan(length: problem.queryLength, ranks: ranks, sharding: sharding)
            self.sequenceProblems = [problem]
            return
        }
        guard problem.batch == 1 else {
            throw .shapeMismatch("packed sequences need batch 1 (the sequences lie along N), got \(problem.batch)")
        }
        if let index = lengths.firstIndex(where: { $0 < 0 }) {
            throw .invalidSequenceOffsets(name: "sequence lengths", index: index, reason: "a length is negative")
        }
        guard lengths.reduce(0, +) == problem.queryLength else {
            throw .shapeMismatch(
                "the sequence lengths add up to \(lengths.reduce(0, +)), but the packed tensors hold "
                    + "\(problem.queryLength) positions")
        }
        self.plan = RingPlan(sequenceLengths: lengths, ranks: ranks, sharding: sharding)
        var problems: [AttentionProblem] = []
        for n in lengths {
            // Empty sequences have no rows on any rank; their placeholder is never used.
            let rows = max(n, 1)
            problems.append(
                try AttentionProblem(
                    query: [1, problem.queryHeads, rows, problem.headDim],
                    key: [1, problem.keyValueHeads, rows, problem.headDim],
                    value: [1, problem.keyValueHeads, rows, problem.valueDim], options: problem.options,
                    storage: problem.storage))
        }
        self.sequenceProblems = problems
    }

    /// This rank's shapes: Q [B, Hq, n, D], K [B, Hkv, n, D], V [B, Hkv, n, Dv], O [B, Hq, n, Dv], LSE [B, Hq, n].
    public func localShapes(rank: Int) -> (query: [Int], key: [Int], value: [Int], output: [Int], logSumExp: [Int]) {
        let n = plan.rows(of: rank)
        let p = problem
        return (
            [p.batch, p.queryHeads, n, p.headDim], [p.batch, p.keyValueHeads, n, p.headDim],
            [p.batch, p.keyValueHeads, n, p.valueDim], [p.batch, p.queryHeads, n, p.valueDim],
            [p.batch, p.queryHeads, n]
        )
    }

    /// Bytes of rank `rank`'s K and V shard as it travels (dense [B, Hkv, n, D] then [B, Hkv, n, Dv],
    /// in the K/V storage type).
    func shardBytes(of rank: Int) -> Int {
        let p = problem
        return p.batch * p.keyValueHeads * plan.rows(of: rank) * (p.headDim + p.valueDim) * p.storage.keyValue.byteSize
    }

    /// Runs this rank's part. `query`, `key`, `value`: this rank's shard (`localShapes`), any strides,
    /// in the problem's storage types; `output` (dense fp32) and `logSumExp` are written completely.
    /// Every rank of `communicator` must call this with the same problem and plan.
    public func run(
        on communicator: some RingCommunicator, query: TensorView, key: TensorView, value: TensorView,
        output: UnsafeMutableBufferPointer<Float>, logSumExp: UnsafeMutableBufferPointer<Float>
    ) throws(AttentionError) -> RingTimings {
        let rank = communicator.rank
        guard communicator.size == plan.ranks, rank >= 0, rank < plan.ranks else {
            throw .invalidConfiguration(
                setting: "ranks", value: "\(communicator.size)", reason: "the plan is for \(plan.ranks) ranks")
        }
        let shapes = localShapes(rank: rank)
        let localTypes = StorageTypes(query: problem.storage.query, keyValue: problem.storage.keyValue, output: .f32)
        try AttentionBuffers(query: query, key: key, value: value, output: TensorView(output), logSumExp: logSumExp)
            .check(
                operands: [
                    ("query", query, shapes.query, localTypes.query), ("key", key, shapes.key, localTypes.keyValue),
                    ("value", value, shapes.value, localTypes.keyValue),
                    ("output", TensorView(output), shapes.output, .f32),
                ], logSumExpCount: shapes.logSumExp.reduce(1, *))
        output.update(repeating: 0)
        logSumExp.update(repeating: -.infinity)

        let capacity = (0..<plan.ranks).map(shardBytes).max() ?? 0
        let buffers = (
            UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 1), alignment: 64),
            UnsafeMutableRawBufferPointer.allocate(byteCount: max(capacity, 1), alignment: 64)
        )
        defer {
            buffers.0.deallocate()
            buffers.1.deallocate()
        }
        pack(key: key, value: value, rows: plan.rows(of: rank), into: buffers.0)
        var current = buffers.0
        var next = buffers.1
        var timings = RingTimings()
        timings.steps = plan.ranks
        let queryStrides = query.strides(for: shapes.query)
        for step in 0..<plan.ranks {
            let source = (rank - step + plan.ranks) % plan.ranks
            // The next shard travels while this one is used.
            var exchange: Exchange?
            if step < plan.ranks - 1 {
                let incoming = (source - 1 + plan.ranks) % plan.ranks
                let send = UnsafeRawBufferPointer(rebasing: current[0..<shardBytes(of: source)])
                let receive = UnsafeMutableRawBufferPointer(rebasing: next[0..<shardBytes(of: incoming)])
                exchange = Exchange(
                    communicator, send: send, to: (rank + 1) % plan.ranks, receive: receive,
                    from: (rank - 1 + plan.ranks) % plan.ranks)
                timings.bytesSent += send.count
            }
            let started = DispatchTime.now().uptimeNanoseconds
            var failure: AttentionError?
            do throws(AttentionError) {
                timings.blocks += try computeStep(
                    rank: rank, source: source, shard: UnsafeRawBufferPointer(current), query: query,
                    queryStrides: queryStrides, output: output, logSumExp: logSumExp)
            } catch {
                failure = error
            }
            let computed = DispatchTime.now().uptimeNanoseconds
            timings.computeSeconds += Double(computed - started) * 1e-9
            if let exchange {
                let exchangeError = exchange.wait()
                timings.exposedCommunicationSeconds += Double(DispatchTime.now().uptimeNanoseconds - computed) * 1e-9
                if let exchangeError, failure == nil { failure = exchangeError }
            }
            if let failure { throw failure }
            swap(&current, &next)
        }
        return timings
    }

    /// This rank's queries against the K/V shard of `source`: every pair of chunks that see each other,
    /// one block each, merged into `output` / `logSumExp` in a fixed order.
    private func computeStep(
        rank: Int, source: Int, shard: UnsafeRawBufferPointer, query: TensorView, queryStrides: Strides,
        output: UnsafeMutableBufferPointer<Float>, logSumExp: UnsafeMutableBufferPointer<Float>
    ) throws(AttentionError) -> Int {
        let p = problem
        let localRows = plan.rows(of: rank)
        let sourceRows = plan.rows(of: source)
        let keyShape = [p.batch, p.keyValueHeads, sourceRows, p.headDim]
        let valueShape = [p.batch, p.keyValueHeads, sourceRows, p.valueDim]
        let kvType = p.storage.keyValue
        let keyElements = keyShape.reduce(1, *)
        let keys = TensorView(
            reading: shard.baseAddress!, storage: kvType, strides: .bhsd(keyShape), capacity: keyElements)
        let values = TensorView(
            reading: shard.baseAddress! + keyElements * kvType.byteSize, storage: kvType, strides: .bhsd(valueShape),
            capacity: valueShape.reduce(1, *))
        var blocks = 0
        var queryOffset = 0
        for queryPiece in plan.pieces(of: rank) {
            let queryChunk = queryPiece.positions
            defer { queryOffset += queryChunk.count }
            var keyOffset = 0
            for keyPiece in plan.pieces(of: source) {
                let keyChunk = keyPiece.positions
                defer { keyOffset += keyChunk.count }
                guard keyPiece.sequence == queryPiece.sequence,
                    let block = sequenceProblems[queryPiece.sequence].block(queries: queryChunk, keys: keyChunk)
                else { continue }
                let firstRow = queryOffset + block.queries.lowerBound - queryChunk.lowerBound
                let firstKey = keyOffset + block.keys.lowerBound - keyChunk.lowerBound
                let sub = try AttentionProblem(
                    query: [p.batch, p.queryHeads, block.queries.count, p.headDim],
                    key: [p.batch, p.keyValueHeads, block.keys.count, p.headDim],
                    value: [p.batch, p.keyValueHeads, block.keys.count, p.valueDim], options: try block.options(of: p),
                    storage: StorageTypes(query: p.storage.query, keyValue: kvType, output: .f32))
                var partial = [Float](repeating: 0, count: sub.outputShape.reduce(1, *))
                var partialLSE = [Float](repeating: 0, count: sub.lseShape.reduce(1, *))
                let chosen = backend ?? Dispatcher.process.decide(sub).chosen
                try partial.withUnsafeMutableBufferPointer { (out) throws(AttentionError) in
                    try partialLSE.withUnsafeMutableBufferPointer { (lse) throws(AttentionError) in
                        try chosen.forward(
                            sub,
                            AttentionBuffers(
                                query: query.advanced(
                                    by: queryStrides.offset(batch: 0, head: 0, position: firstRow),
                                    strides: queryStrides),
                                key: keys.advanced(by: firstKey * p.headDim, strides: .bhsd(keyShape)),
                                value: values.advanced(by: firstKey * p.valueDim, strides: .bhsd(valueShape)),
                                output: TensorView(out), logSumExp: lse))
                    }
                }
                mergeRows(
                    partial, partialLSE, rows: block.queries.count, firstRow: firstRow, localRows: localRows,
                    output: output, logSumExp: logSumExp)
                blocks += 1
            }
        }
        return blocks
    }

    /// Merges a block's partial rows (dense [B, Hq, rows, Dv]) into the running result.
    private func mergeRows(
        _ partial: [Float], _ partialLSE: [Float], rows: Int, firstRow: Int, localRows: Int,
        output: UnsafeMutableBufferPointer<Float>, logSumExp: UnsafeMutableBufferPointer<Float>
    ) {
        let dv = problem.valueDim
        var pair = [Float](repeating: 0, count: 2 * dv)
        var pairLSE: [Float] = [0, 0]
        for bh in 0..<(problem.batch * problem.queryHeads) {
            for i in 0..<rows {
                let target = bh * localRows + firstRow + i
                let from = bh * rows + i
                pairLSE[0] = logSumExp[target]
                pairLSE[1] = partialLSE[from]
                for c in 0..<dv {
                    pair[c] = output[target * dv + c]
                    pair[dv + c] = partial[from * dv + c]
                }
                logSumExp[target] = mergePartialRows(
                    count: 2, valueDim: dv, logSumExp: pairLSE, logSumExpStride: 1, outputs: pair, outputStride: dv,
                    into: output.baseAddress! + target * dv)
            }
        }
    }

    /// K then V, dense in the K/V storage type, into `target`.
    private func pack(key: TensorView, value: TensorView, rows: Int, into target: UnsafeMutableRawBufferPointer) {
        let p = problem
        let size = p.storage.keyValue.byteSize
        var offset = 0
        for (view, width) in [(key, p.headDim), (value, p.valueDim)] {
            let shape = [p.batch, p.keyValueHeads, rows, width]
            let s = view.strides(for: shape)
            for b in 0..<p.batch {
                for h in 0..<p.keyValueHeads {
                    for n in 0..<rows {
                        (target.baseAddress! + offset).copyMemory(
                            from: view.address + s.offset(batch: b, head: h, position: n) * size,
                            byteCount: width * size)
                        offset += width * size
                    }
                }
            }
        }
    }

    /// Times `plan.ranks - 1` exchanges of the largest shard without compute: what the ring's
    /// communication costs when nothing hides it (the denominator of the overlap figure).
    public func measureCommunication(on communicator: some RingCommunicator) throws(AttentionError) -> Double {
        let bytes = (0..<plan.ranks).map(shardBytes).max() ?? 0
        let send = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes, 1), alignment: 64)
        let receive = UnsafeMutableRawBufferPointer.allocate(byteCount: max(bytes, 1), alignment: 64)
        defer {
            send.deallocate()
            receive.deallocate()
        }
        send.initializeMemory(as: UInt8.self, repeating: 0)
        let rank = communicator.rank
        let started = DispatchTime.now().uptimeNanoseconds
        for _ in 0..<(plan.ranks - 1) {
            try communicator.sendReceive(
                UnsafeRawBufferPointer(rebasing: send[0..<bytes]), to: (rank + 1) % plan.ranks,
                UnsafeMutableRawBufferPointer(rebasing: receive[0..<bytes]), from: (rank - 1 + plan.ranks) % plan.ranks)
        }
        return Double(DispatchTime.now().uptimeNanoseconds - started) * 1e-9
    }
}

/// One `sendReceive` on its own thread.
private final class Exchange: @unchecked Sendable {
    private let done = DispatchSemaphore(value: 0)
    private var error: AttentionError?

    init(
        _ communicator: some RingCommunicator, send: UnsafeRawBufferPointer, to destination: Int,
        receive: UnsafeMutableRawBufferPointer, from source: Int
    ) {
        let buffers = RawBuffers(send: send, receive: receive)
        let thread = Thread { [self] in
            do throws(AttentionError) {
                try communicator.sendReceive(buffers.send, to: destination, buffers.receive, from: source)
            } catch {
                self.error = error
            }
            done.signal()
        }
        thread.name = "AttentionKit ring exchange"
        thread.start()
    }

    /// Waits for the exchange; its error, if any.
    func wait() -> AttentionError? {
        done.wait()
        return error
    }
}

/// The two buffers of one exchange, handed to its thread (which alone touches them until `wait`).
private struct RawBuffers: @unchecked Sendable {
    let send: UnsafeRawBufferPointer
    let receive: UnsafeMutableRawBufferPointer
}

extension RingPlan {
    /// Rank `rank`'s rows of a [B, H, length, D] tensor (dimension 2 is the sequence), in local order.
    public func shard(_ tensor: Tensor, rank: Int) throws(AttentionError) -> Tensor {
        let s = tensor.shape
        guard s.count == 4, s[2] == length else {
            throw .shapeMismatch("a ring shard needs a [B, H, \(length), D] tensor, got \(s)")
        }
        let chunks = chunks(of: rank)
        var values: [Float] = []
        values.reserveCapacity(s[0] * s[1] * rows(of: rank) * s[3])
        for bh in 0..<(s[0] * s[1]) {
            for chunk in chunks {
                values +=
                    tensor.storage[
                        ((bh * length + chunk.lowerBound) * s[3])..<((bh * length + chunk.upperBound) * s[3])]
            }
        }
        return try Tensor(shape: [s[0], s[1], rows(of: rank), s[3]], storage: values)
    }

    /// The global [B, H, length, W] tensor from every rank's [B, H, rows, W] shard (W = 1 for
    /// [B, H, rows] log-sum-exp shards, given with a trailing 1 or without).
    public func assemble(_ shards: [Tensor]) throws(AttentionError) -> Tensor {
        guard shards.count == ranks, let first = shards.first, first.shape.count >= 3 else {
            throw .shapeMismatch("assembling needs one shard per rank (\(ranks)), got \(shards.count)")
        }
        let (b, h) = (first.shape[0], first.shape[1])
        let width = first.shape.count == 4 ? first.shape[3] : 1
        var values = [Float](repeating: 0, count: b * h * length * width)
        for (rank, shard) in shards.enumerated() {
            guard shard.shape.count == first.shape.count, shard.shape[0] == b, shard.shape[1] == h,
                shard.shape[2] == rows(of: rank), shard.shape.count == 3 || shard.shape[3] == width
            else {
                throw .shapeMismatch("rank \(rank)'s shard has shape \(shard.shape); expected \(rows(of: rank)) rows")
            }
            let n = rows(of: rank)
            var local = 0
            for chunk in chunks(of: rank) {
                for position in chunk {
                    for bh in 0..<(b * h) {
                        let from = (bh * n + local) * width
                        let to = (bh * length + position) * width
                        for c in 0..<width { values[to + c] = shard.storage[from + c] }
                    }
                    local += 1
                }
            }
        }
        let shape = first.shape.count == 4 ? [b, h, length, width] : [b, h, length]
        return try Tensor(shape: shape, storage: values)
    }
}

/// A host tensor held in a storage type (fp32, or fp16 / bf16 bits rounded to nearest even): a rank's
/// shard, sent and received as bytes, read through a `TensorView`.
package struct StoredOperand: Sendable {
    package let shape: [Int]
    package let type: StorageType
    private var floats: [Float]
    private var halves: [UInt16]

    /// Zeros of `shape`, to receive into.
    package init(shape: [Int], type: StorageType) {
        self.shape = shape
        self.type = type
        let count = shape.reduce(1, *)
        floats = type == .f32 ? [Float](repeating: 0, count: count) : []
        halves = type == .f32 ? [] : [UInt16](repeating: 0, count: count)
    }

    package init(_ tensor: Tensor, as type: StorageType) {
        shape = tensor.shape
        self.type = type
        floats = type == .f32 ? tensor.storage : []
        halves = type == .f32 ? [] : tensor.storage.map(type.encode)
    }

    package func withView<R>(_ body: (TensorView) throws(AttentionError) -> R) throws(AttentionError) -> R {
        if type == .f32 {
            return try floats.withUnsafeBufferPointer { (p) throws(AttentionError) in try body(TensorView(p)) }
        }
        return try halves.withUnsafeBufferPointer { (p) throws(AttentionError) in try body(TensorView(p, storage: type))
        }
    }

    package func send(_ communicator: some RingCommunicator, to target: Int) throws(AttentionError) {
        try withView { (view) throws(AttentionError) in
            try communicator.send(
                UnsafeRawBufferPointer(start: view.address, count: view.capacity * type.byteSize), to: target)
        }
    }

    package mutating func receive(_ communicator: some RingCommunicator, from source: Int) throws(AttentionError) {
        if type == .f32 {
            try floats.withUnsafeMutableBufferPointer { (p) throws(AttentionError) in
                try communicator.receive(UnsafeMutableRawBufferPointer(p), from: source)
            }
        } else {
            try halves.withUnsafeMutableBufferPointer { (p) throws(AttentionError) in
                try communicator.receive(UnsafeMutableRawBufferPointer(p), from: source)
            }
        }
    }
}

/// Views of a rank's three operands and fresh fp32 output and LSE buffers of the given sizes, for
/// the duration of `body`; returns body's result with the filled buffers.
package func withRankBuffers<R>(
    _ operands: (StoredOperand, StoredOperand, StoredOperand), outputCount: Int, logSumExpCount: Int,
    _ body: (TensorView, TensorView, TensorView, UnsafeMutableBufferPointer<Float>, UnsafeMutableBufferPointer<Float>)
        throws(AttentionError) -> R
) throws(AttentionError) -> (result: R, output: [Float], logSumExp: [Float]) {
    var output = [Float](repeating: 0, count: outputCount)
    var lse = [Float](repeating: 0, count: logSumExpCount)
    let result = try output.withUnsafeMutableBufferPointer { (o) throws(AttentionError) in
        try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) in
            try operands.0.withView { (q) throws(AttentionError) in
                try operands.1.withView { (k) throws(AttentionError) in
                    try operands.2.withView { (v) throws(AttentionError) in try body(q, k, v, o, l) }
                }
            }
        }
    }
    return (result, output, lse)
}

/// One thread per rank of a `LocalRing`, each running `body` on its operands with fresh fp32 O and
/// LSE buffers of `shapes(rank)`; every rank's O, LSE and timings, in rank order.
func runRanks(
    _ inputs: [(StoredOperand, StoredOperand, StoredOperand)],
    shapes: @escaping @Sendable (Int) -> (query: [Int], key: [Int], value: [Int], output: [Int], logSumExp: [Int]),
    _ body:
        @escaping @Sendable (
            LocalCommunicator, TensorView, TensorView, TensorView, UnsafeMutableBufferPointer<Float>,
            UnsafeMutableBufferPointer<Float>
        ) throws(AttentionError) -> RingTimings
) throws(AttentionError) -> (outputs: [Tensor], lses: [Tensor], timings: [RingTimings]) {
    let collected = Collected(ranks: inputs.count)
    try LocalRing(size: inputs.count).run { (communicator) throws(AttentionError) in
        let rank = communicator.rank
        let shape = shapes(rank)
        let (timings, output, lse) = try withRankBuffers(
            inputs[rank], outputCount: shape.output.reduce(1, *), logSumExpCount: shape.logSumExp.reduce(1, *)
        ) { (q, k, v, o, l) throws(AttentionError) in try body(communicator, q, k, v, o, l) }
        collected.store(
            rank: rank, output: try Tensor(shape: shape.output, storage: output),
            logSumExp: try Tensor(shape: shape.logSumExp, storage: lse), timings: timings)
    }
    return collected.all
}

extension RingAttention {
    /// Runs every rank in this process (`LocalRing`, one thread per rank) on global [B, H, N, D] host
    /// tensors: each rank gets its shards (K/V in the problem's K/V storage type, Q in its query type),
    /// and the ranks' O and LSE rows are assembled into the global result. What `attnbench ring --ranks N`
    /// runs, and what the tests check against a single call.
    public func runLocally(query: Tensor, key: Tensor, value: Tensor) throws(AttentionError) -> (
        result: AttentionResult, timings: [RingTimings]
    ) {
        guard query.shape == problem.queryShape, key.shape == problem.keyShape, value.shape == problem.valueShape else {
            throw .shapeMismatch(
                "ring inputs \(query.shape), \(key.shape), \(value.shape) do not match the problem's "
                    + "\(problem.queryShape), \(problem.keyShape), \(problem.valueShape)")
        }
        var shards: [(StoredOperand, StoredOperand, StoredOperand)] = []
        for rank in 0..<plan.ranks {
            shards.append(
                (
                    StoredOperand(try plan.shard(query, rank: rank), as: problem.storage.query),
                    StoredOperand(try plan.shard(key, rank: rank), as: problem.storage.keyValue),
                    StoredOperand(try plan.shard(value, rank: rank), as: problem.storage.keyValue)
                ))
        }
        let shapes: @Sendable (Int) -> (query: [Int], key: [Int], value: [Int], output: [Int], logSumExp: [Int]) = {
            localShapes(rank: $0)
        }
        let (outputs, lses, timings) = try runRanks(shards, shapes: shapes) {
            (communicator, q, k, v, o, l) throws(AttentionError) in
            try run(on: communicator, query: q, key: k, value: v, output: o, logSumExp: l)
        }
        return (
            AttentionResult(output: try plan.assemble(outputs), logSumExp: try plan.assemble(lses)), timings
        )
    }
}

/// Each rank's result, stored from the ranks' threads.
final class Collected: @unchecked Sendable {
    private let lock = NSLock()
    private var outputs: [Tensor?]
    private var lses: [Tensor?]
    private var timings: [RingTimings]

    init(ranks: Int) {
        outputs = Array(repeating: nil, count: ranks)
        lses = Array(repeating: nil, count: ranks)
        timings = Array(repeating: RingTimings(), count: ranks)
    }

    func store(rank: Int, output: Tensor, logSumExp: Tensor, timings t: RingTimings) {
        lock.withLock {
            outputs[rank] = output
            lses[rank] = logSumExp
            timings[rank] = t
        }
    }

    var all: (outputs: [Tensor], lses: [Tensor], timings: [RingTimings]) {
        lock.withLock { (outputs.map { $0! }, lses.map { $0! }, timings) }
    }
}
