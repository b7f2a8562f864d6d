import AttentionCore
import Foundation

/// One call split across several backends at once (several OpenCL devices, or BLAS beside them), each
/// computing its share in place on the caller's buffers, concurrently.
///
/// Splits (`Split`):
/// - **heads**: each member takes a contiguous range of K/V heads (and their query heads), every batch;
/// - **batch**: each member takes a contiguous range of batch entries;
/// - **keys**: each member takes a contiguous key range of every row (`AttentionProblem.block`), writes
///   a partial (O, LSE) to scratch, and the partials are merged exactly (`mergePartialRows`) in member
///   order, so the result is bitwise the same on every run with the same members and weights.
///
/// Shares follow `weights` (relative speeds, from the members' profiles when the dispatcher builds
/// it), counted in visible query-key pairs, so that causal and windowed problems split by work and
/// every member finishes together. `.automatic` takes heads, then batch, when their granularity
/// leaves no member more than 10% off its share, and keys otherwise.
public struct MultiDeviceBackend: AttentionBackend {
    public enum Split: String, Sendable, CaseIterable, CustomStringConvertible {
        case automatic, heads, batch, keys
        public var description: String { rawValue }
    }

    /// One member's share of a problem: its backend index, its sub-problem and where it lies.
    public struct Part: Sendable, Equatable {
        public let member: Int
        public let problem: AttentionProblem
        /// First batch entry, K/V head, query row and key of the part in the full problem.
        public let batch: Int
        public let keyValueHead: Int
        public let query: Int
        public let key: Int
    }

    /// How a problem is cut: the split used and the parts in member order (members with no share
    /// are left out).
    public struct Partition: Sendable, Equatable {
        public let split: Split
        public let parts: [Part]
    }

    public let members: [any AttentionBackend]
    /// Relative speeds, normalised to sum 1.
    public let weights: [Double]
    public let split: Split

    /// - Parameters:
    ///   - members: at least two distinct backends, none of them a `MultiDeviceBackend`.
    ///   - weights: relative speeds (positive, finite), one per member; nil means equal shares.
    public init(members: [any AttentionBackend], weights: [Double]? = nil, split: Split = .automatic)
        throws(AttentionError)
    {
        let ids = members.map(\.id)
        guard members.count >= 2 else {
            throw .invalidConfiguration(
                setting: "members", value: ids.map(\.description).joined(separator: ","),
                reason: "a multi-device backend needs at least two members")
        }
        for (index, id) in ids.enumerated() {
            if case .multi = id {
                throw .invalidConfiguration(
                    setting: "members", value: id.description, reason: "multi backends do not nest")
            }
            guard !ids[..<index].contains(id) else {
                throw .invalidConfiguration(setting: "members", value: id.description, reason: "listed twice")
            }
        }
        let raw = weights ?? Array(repeating: 1, count: members.count)
        guard raw.count == members.count, raw.allSatisfy({ $0.isFinite && $0 > 0 }) else {
            throw .invalidConfiguration(
                setting: "weights", value: raw.map { "\($0)" }.joined(separator: ","),
                reason: "one positive, finite weight per member (\(members.count))")
        }
        let total = raw.reduce(0, +)
        self.members = members
        self.weights = raw.map { $0 / total }
        self.split = split
    }

    public var id: BackendID { .multi(members.map(\.id)) }

    // MARK: Partition

    /// The parts of `problem`: each member's sub-problem, sized by its weight.
    public func partition(_ problem: AttentionProblem) throws(AttentionError) -> Partition {
        let choice = split == .automatic ? automaticSplit(problem) : split
        switch choice {
        case .heads, .automatic, .batch:
            let heads = choice != .batch
            let units = heads ? problem.keyValueHeads : problem.batch
            var parts: [Part] = []
            for (member, range) in Self.shares(of: units, weights: weights, work: { _ in 1 }).enumerated()
            where !range.isEmpty {
                let batches = heads ? 0..<problem.batch : range
                let kvHeads = heads ? range : 0..<problem.keyValueHeads
                parts.append(
                    Part(
                        member: member, problem: try Self.subproblem(problem, batches: batches, keyValueHeads: kvHeads),
                        batch: batches.lowerBound, keyValueHead: kvHeads.lowerBound, query: 0, key: 0))
            }
            return Partition(split: heads ? .heads : .batch, parts: parts)
        case .keys:
            // Work per key: the rows that see it (a difference array over the rows' visible intervals).
            var seen = [Int](repeating: 0, count: problem.keyLength + 1)
            for i in 0..<problem.queryLength {
                let (lo, hi) = problem.visibleKeys(forQuery: i)
                guard lo <= hi else { continue }
                seen[lo] += 1
                seen[hi + 1] -= 1
            }
            var running = 0
            let work = (0..<problem.keyLength).map { j -> Double in
                running += seen[j]
                return Double(running)
            }
            let bounds = Self.shares(of: problem.keyLength, weights: weights) { work[$0] }
            var parts: [Part] = []
            for (member, range) in bounds.enumerated() where !range.isEmpty {
                guard let block = problem.block(queries: 0..<problem.queryLength, keys: range) else { continue }
                let p = problem
                let sub = try AttentionProblem(
                    query: [p.batch, p.queryHeads, block.queries.count, p.headDim],
                    key: [p.batch, p.keyValueHeads, block.keys.count, p.headDim],
                    value: [p.batch, p.keyValueHeads, block.keys.count, p.valueDim],
                    options: try block.options(of: p),
                    // Partials are fp32 whatever the caller's output type: the merge rounds once.
                    storage: StorageTypes(query: p.storage.query, keyValue: p.storage.keyValue, output: .f32))
                parts.append(
                    Part(
                        member: member, problem: sub, batch: 0, keyValueHead: 0, query: block.queries.lowerBound,
                        key: block.keys.lowerBound))
            }
            return Partition(split: .keys, parts: parts)
        }
    }

    /// The problem of batch entries `batches` and K/V heads `keyValueHeads` (with their query heads).
    static func subproblem(_ p: AttentionProblem, batches: Range<Int>, keyValueHeads: Range<Int>)
        throws(AttentionError) -> AttentionProblem
    {
        let g = p.groupSize
        let queryHeads = keyValueHeads.lowerBound * g..<keyValueHeads.upperBound * g
        var options = p.options
        options.mask = try p.options.mask?.slice(
            p, batches: batches, heads: queryHeads, queries: 0..<p.queryLength, keys: 0..<p.keyLength)
        return try AttentionProblem(
            query: [batches.count, queryHeads.count, p.queryLength, p.headDim],
            key: [batches.count, keyValueHeads.count, p.keyLength, p.headDim],
            value: [batches.count, keyValueHeads.count, p.keyLength, p.valueDim], options: options, storage: p.storage)
    }

    /// Heads, then batch, when their granularity keeps every member within 10% of its share; else keys.
    private func automaticSplit(_ problem: AttentionProblem) -> Split {
        for (split, units) in [(Split.heads, problem.keyValueHeads), (.batch, problem.batch)] {
            let bounds = Self.shares(of: units, weights: weights) { _ in 1 }
            let off = zip(bounds, weights).map { abs(Double($0.count) / Double(units) - $1) }.max() ?? 1
            if off <= 0.1 { return split }
        }
        return .keys
    }

    /// Contiguous ranges of `0..<count`, one per weight, each holding about its weight's fraction of
    /// the total `work(unit)`; the last range ends at `count`.
    static func shares(of count: Int, weights: [Double], work: (Int) -> Double) -> [Range<Int>] {
        let total = (0..<count).reduce(0) { $0 + work($1) }
        var bounds: [Range<Int>] = []
        var start = 0
        var done = 0.0
        var target = 0.0
        for (index, weight) in weights.enumerated() {
            target += weight * total
            var end = start
            if index == weights.count - 1 {
                end = count
            } else {
                // Take units while that brings the running work closer to the target.
                while end < count, abs(done + work(end) - target) <= abs(done - target) {
                    done += work(end)
                    end += 1
                }
            }
            bounds.append(start..<end)
            start = end
        }
        return bounds
    }

    // MARK: AttentionBackend

    /// The partition and every member's support of its part: what `plan(for:)` decides, without
    /// its workspace sum and path text (the dispatcher asks this on every call).
    public func support(for problem: AttentionProblem) -> BackendSupport {
        let partition: Partition
        do throws(AttentionError) {
            partition = try self.partition(problem)
        } catch {
            return .unsupported(reason: Self.unsplittable(error))
        }
        for part in partition.parts {
            let member = members[part.member]
            if case .unsupported(let reason) = member.support(for: part.problem) {
                return .unsupported(reason: Self.memberRefuses(member, reason))
            }
        }
        return .supported
    }

    private static func unsplittable(_ error: AttentionError) -> String { "cannot split the problem: \(error)" }

    private static func memberRefuses(_ member: any AttentionBackend, _ reason: String) -> String {
        "\(member.id) cannot run its part: \(reason)"
    }

    public func workspaceBytes(for problem: AttentionProblem) -> Int {
        plan(for: problem).workspaceBytes
    }

    public func plan(for problem: AttentionProblem) -> ExecutionPlan {
        let partition: Partition
        do throws(AttentionError) {
            partition = try self.partition(problem)
        } catch {
            return ExecutionPlan(support: .unsupported(reason: Self.unsplittable(error)), workspaceBytes: 0)
        }
        var workspace = 0
        var shares: [String] = []
        for part in partition.parts {
            let member = members[part.member]
            let plan = member.plan(for: part.problem)
            if case .unsupported(let reason) = plan.support {
                return ExecutionPlan(
                    support: .unsupported(reason: Self.memberRefuses(member, reason)), workspaceBytes: 0)
            }
            workspace += plan.workspaceBytes + Self.scratchBytes(part.problem, split: partition.split)
            let count: Int
            switch partition.split {
            case .heads, .automatic: count = part.problem.keyValueHeads
            case .batch: count = part.problem.batch
            case .keys: count = part.problem.keyLength
            }
            shares.append("\(member.id) \(count)")
        }
        let unit = ["heads": "K/V heads", "batch": "batch entries", "keys": "keys"][partition.split.rawValue] ?? ""
        let merge = partition.split == .keys ? " + LSE merge" : ""
        return ExecutionPlan(
            support: .supported, workspaceBytes: workspace,
            path: "split by \(partition.split) (\(shares.joined(separator: ", ")) \(unit))\(merge)")
    }

    /// Scratch a part needs beside its member's own workspace: its partial O and LSE for key splits,
    /// its LSE rows for head splits.
    static func scratchBytes(_ part: AttentionProblem, split: Split) -> Int {
        let rows = part.batch * part.queryHeads * part.queryLength
        switch split {
        case .keys: return 4 * rows * (part.valueDim + 1)
        case .heads, .automatic: return 4 * rows
        case .batch: return 0
        }
    }

    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        let partition = try partition(problem)
        let full = (
            q: buffers.query.strides(for: problem.queryShape), k: buffers.key.strides(for: problem.keyShape),
            v: buffers.value.strides(for: problem.valueShape), o: buffers.output.strides(for: problem.outputShape)
        )
        let keySplit = partition.split == .keys
        let count = partition.parts.count
        // Scratch: partial O and LSE per part (keys), LSE per part (heads); batch splits write in place.
        let scratch = Scratch(
            outputs: partition.parts.map { keySplit ? $0.problem.outputShape.reduce(1, *) : 0 },
            lses: partition.parts.map { partition.split == .batch ? 0 : $0.problem.lseShape.reduce(1, *) })
        let failures = Failures(count: count)
        Self.concurrently(count) { index in
            let part = partition.parts[index]
            let firstHead = part.keyValueHead * problem.groupSize
            let q = buffers.query.advanced(
                by: full.q.offset(batch: part.batch, head: firstHead, position: part.query), strides: full.q)
            let k = buffers.key.advanced(
                by: full.k.offset(batch: part.batch, head: part.keyValueHead, position: part.key), strides: full.k)
            let v = buffers.value.advanced(
                by: full.v.offset(batch: part.batch, head: part.keyValueHead, position: part.key), strides: full.v)
            let o =
                keySplit
                ? TensorView(scratch.outputs[index])
                : buffers.output.advanced(
                    by: full.o.offset(batch: part.batch, head: firstHead, position: part.query), strides: full.o)
            var lse: UnsafeMutableBufferPointer<Float>? = scratch.lses[index]
            if partition.split == .batch {
                // Batch entries' LSE rows are contiguous in the caller's [B, Hq, Nq].
                let rows = problem.queryHeads * problem.queryLength
                lse = buffers.logSumExp.map {
                    UnsafeMutableBufferPointer(
                        rebasing: $0[part.batch * rows..<(part.batch + part.problem.batch) * rows])
                }
            }
            do throws(AttentionError) {
                try members[part.member].forward(
                    part.problem, AttentionBuffers(query: q, key: k, value: v, output: o, logSumExp: lse))
            } catch {
                failures.record(error, at: index)
            }
        }
        if let (index, error) = failures.first {
            throw .backendFailure(
                backend: id.description,
                message: "\(members[partition.parts[index].member].id) failed on its part: \(error)")
        }
        switch partition.split {
        case .batch: break
        case .heads, .automatic: scatterLogSumExp(problem, partition, scratch.lses, into: buffers.logSumExp)
        case .keys: merge(problem, partition, scratch.outputs, scratch.lses, into: buffers, strides: full.o)
        }
    }

    /// Head splits: each part's [B, heads, Nq] LSE rows into the caller's [B, Hq, Nq].
    private func scatterLogSumExp(
        _ problem: AttentionProblem, _ partition: Partition, _ lses: [UnsafeMutableBufferPointer<Float>],
        into target: UnsafeMutableBufferPointer<Float>?
    ) {
        guard let target else { return }
        let nq = problem.queryLength
        for (index, part) in partition.parts.enumerated() {
            let heads = part.problem.queryHeads
            let first = part.keyValueHead * problem.groupSize
            for b in 0..<problem.batch {
                for h in 0..<heads {
                    let from = (b * heads + h) * nq
                    let to = (b * problem.queryHeads + first + h) * nq
                    for i in 0..<nq { target[to + i] = lses[index][from + i] }
                }
            }
        }
    }

    /// Key splits: every row's partials merged in part (= member) order into the caller's output and LSE.
    private func merge(
        _ problem: AttentionProblem, _ partition: Partition, _ outputs: [UnsafeMutableBufferPointer<Float>],
        _ lses: [UnsafeMutableBufferPointer<Float>], into buffers: AttentionBuffers, strides: Strides
    ) {
        let dv = problem.valueDim
        let count = partition.parts.count
        var rowLSE = [Float](repeating: 0, count: count)
        var rowOutputs = [Float](repeating: 0, count: count * dv)
        var merged = [Float](repeating: 0, count: dv)
        for b in 0..<problem.batch {
            for h in 0..<problem.queryHeads {
                for i in 0..<problem.queryLength {
                    // Parts whose rows do not include i saw none of its keys: LSE -inf, O 0.
                    for (r, part) in partition.parts.enumerated() {
                        let local = i - part.query
                        guard local >= 0, local < part.problem.queryLength else {
                            rowLSE[r] = -.infinity
                            for c in 0..<dv { rowOutputs[r * dv + c] = 0 }
                            continue
                        }
                        let row = (b * problem.queryHeads + h) * part.problem.queryLength + local
                        rowLSE[r] = lses[r][row]
                        for c in 0..<dv { rowOutputs[r * dv + c] = outputs[r][row * dv + c] }
                    }
                    let lse = merged.withUnsafeMutableBufferPointer { target in
                        mergePartialRows(
                            count: count, valueDim: dv, logSumExp: rowLSE, logSumExpStride: 1, outputs: rowOutputs,
                            outputStride: dv, into: target.baseAddress!)
                    }
                    for c in 0..<dv { buffers.output.store(merged[c], strides, b, h, i, c) }
                    buffers.logSumExp?[(b * problem.queryHeads + h) * problem.queryLength + i] = lse
                }
            }
        }
    }

    /// Runs `body(0..<count)` on `count` threads (the caller's among them) and waits for all.
    /// Members run their own worker pools inside, so this does not borrow one.
    static func concurrently(_ count: Int, _ body: @escaping @Sendable (Int) -> Void) {
        guard count > 1 else {
            if count == 1 { body(0) }
            return
        }
        let done = DispatchSemaphore(value: 0)
        for index in 1..<count {
            let thread = Thread {
                body(index)
                done.signal()
            }
            thread.name = "AttentionKit multi-device \(index)"
            thread.start()
        }
        body(0)
        for _ in 1..<count { done.wait() }
    }
}

/// A call's partial buffers: zeroed fp32 outputs and LSE rows per part, freed with the object.
private final class Scratch: @unchecked Sendable {
    let outputs: [UnsafeMutableBufferPointer<Float>]
    let lses: [UnsafeMutableBufferPointer<Float>]

    init(outputs: [Int], lses: [Int]) {
        func allocate(_ count: Int) -> UnsafeMutableBufferPointer<Float> {
            let buffer = UnsafeMutableBufferPointer<Float>.allocate(capacity: count)
            buffer.initialize(repeating: 0)
            return buffer
        }
        self.outputs = outputs.map(allocate)
        self.lses = lses.map(allocate)
    }

    deinit {
        for buffer in outputs + lses { buffer.deallocate() }
    }
}

/// The first error of each part, recorded from the parts' threads.
private final class Failures: @unchecked Sendable {
    private let lock = NSLock()
    private var errors: [AttentionError?]

    init(count: Int) { errors = Array(repeating: nil, count: count) }

    func record(_ error: AttentionError, at index: Int) {
        lock.withLock { errors[index] = error }
    }

    /// The lowest-indexed part that failed, and its error.
    var first: (Int, AttentionError)? {
        lock.withLock {
            errors.enumerated().first { $0.element != nil }.map { ($0.offset, $0.element!) }
        }
    }
}
