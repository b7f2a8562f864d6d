import AttentionCore
import AttentionMachine
import CBLAS
import Foundation
import Synchronization

/// Flash-style attention on the CPU: register-tiled products of the CPU kernel variant, or
/// OpenBLAS SGEMM tiles.
///
/// Per work item (a block of query rows of one batch and one key/value head) it loops over key
/// blocks: S = scale·Q_blk·K_blkᵀ, softcap and masking where the block needs them, an online
/// softmax (running max and sum, polynomial exp), O += P·V_blk, and finally O /= l,
/// lse = m + log l. The two products are the CPU variant's register-tiled kernels (K block packed
/// once, accumulators in registers; `products`, `usesTiledProducts(_:)`) or `cblas_sgemm`. The
/// Nq × Nk score matrix is never materialised: extra memory is `tiling.scratchBytesPerThread` per thread (about 256 KiB for D = 64), independent of N.
///
/// - Causal and window rules skip key blocks that no row of the item can see; only blocks that
///   straddle a boundary (or any block, with an explicit mask) pay for per-element masking.
/// - GQA/MQA: query heads of one group read the shared K/V head in place; when Nq is short,
///   several heads of a group are stacked into one item so decode still makes real GEMMs.
/// - Everything between the two products (softcap, masking, the softmax, the final scaling) and the
///   few-row decode products run in the CPU kernel variant for this machine's instruction set
///   (`CPUKernels`, chosen at run time; `isa` forces one).
/// - Work items are spread over `threads` threads by dynamic scheduling (largest items first).
///   With SGEMM products, OpenBLAS runs single-threaded inside tiles for the duration of the call
///   (its global thread count is set to 1 and restored afterwards) and such calls are serialised
///   process-wide for that reason; with the tiled products nothing calls OpenBLAS and nothing is
///   serialised but the worker pool's fork-join.
public struct BLASBackend: AttentionBackend {
    /// Worker threads per call.
    public let threads: Int
    /// A fixed tiling for every problem, or `nil` to choose per problem (see `tiling(for:)`).
    public let tiling: BLASTiling?
    /// Tilings measured by `attnbench tune`, by head dimension (used for prefill-like problems).
    public let tunedTilings: [Tuned<BLASTiling>]
    /// The CPU kernel variant, or why none can be used (a forced instruction set this CPU lacks).
    public let kernels: Result<CPUKernels, AttentionError>
    /// How prefill tiles compute S = Q Kᵀ and O += P V.
    public let products: BLASProducts

    /// - Parameters:
    ///   - threads: worker threads per call (default: every core).
    ///   - tiling: one tiling for every problem; `nil` chooses per problem.
    ///   - tunedTilings: measured tilings by head dimension, preferred over the table for prefill.
    ///   - isa: the CPU kernel variant; `nil` takes `configuration`'s (`ATTENTIONKIT_CPU_ISA`, else
    ///     the widest this machine runs).
    ///   - products: SGEMM or the CPU variant's register-tiled products for prefill tiles (default:
    ///     `.automatic`).
    public init(
        threads: Int? = nil, tiling: BLASTiling? = nil, tunedTilings: [Tuned<BLASTiling>] = [], isa: CPUISA? = nil,
        products: BLASProducts = .automatic, configuration: AttentionConfiguration = .process
    ) {
        self.products = products
        self.threads = max(1, threads ?? CPUInfo.logicalCores)
        self.tiling = tiling
        self.tunedTilings = tunedTilings
        if let isa {
            kernels = Result { () throws(AttentionError) in try CPUKernels(isa: isa) }
        } else {
            kernels = CPUKernels.resolve(configuration)
        }
    }

    /// The instruction set the CPU kernels use, when usable.
    public var isa: CPUISA? { try? kernels.get().isa }

    public var id: BackendID { .blas }

    public func support(for problem: AttentionProblem) -> BackendSupport {
        if case .failure(let error) = kernels { return .unsupported(reason: error.description) }
        let limit = Int(Int32.max)
        if problem.headDim > limit || problem.valueDim > limit {
            return .unsupported(reason: "head dimension exceeds OpenBLAS's 32-bit index range")
        }
        return .supported
    }

    /// Per worker thread: one score tile, fp32 tiles of its Q and O rows, and (fp16/bf16 K/V) one
    /// converted K and V block.
    public func workspaceBytes(for problem: AttentionProblem) -> Int {
        let tile = tiling(for: problem)
        let perThread =
            threads
            * (tile.scratchBytesPerThread
                + TileKernel.tileBytes(
                    problem, rows: tile.queryRows, keyBlock: tile.keyBlock, tiledProducts: usesTiledProducts(problem)))
        // Decode by key ranges (a layout decision made per call): score, Q and O tiles of up to every
        // head's rows per thread, and the partial results. Prefill with the tiled products: the keys
        // packed once for the call.
        let keySplit = KeySplitPlan.make(problem)
        let rangeTiles = keySplit.map { plan in
            threads * 4 * plan.rowsPerBatch(problem) * (plan.block + problem.headDim + problem.valueDim + 2)
        }
        return max(perThread, rangeTiles ?? 0) + (keySplit?.partialBytes(problem) ?? 0) + (sharedKeyBytes(problem) ?? 0)
    }

    public func plan(for problem: AttentionProblem) -> ExecutionPlan {
        let support = support(for: problem)
        let tile = tiling(for: problem)
        let kernels = isa.map { "\($0) kernels" } ?? "no CPU kernels"
        let how = usesTiledProducts(problem) ? ", tiled products" : problem.regime == .prefillLike ? ", SGEMM" : ""
        return ExecutionPlan(
            support: support, workspaceBytes: workspaceBytes(for: problem), path: "\(kernels), tiles \(tile)\(how)")
    }

    /// The tiling a problem runs with, decided here and nowhere else: the fixed `tiling` if one was
    /// given; else, for prefill-like problems, the tuned tiling of the nearest head dimension; else
    /// the table (`BLASTiling.default`), whose long key blocks suit decode. (Tuned tilings come from
    /// prefill probes, so they are not applied to decode-like problems.)
    public func tiling(for problem: AttentionProblem) -> BLASTiling {
        if let tiling { return tiling }
        if problem.regime == .prefillLike, let tuned = tunedTilings.nearest(to: max(problem.headDim, problem.valueDim))
        {
            return tuned
        }
        return .default(headDim: problem.headDim, valueDim: problem.valueDim, queryLength: problem.queryLength)
    }

    public func run(_ problem: AttentionProblem, _ buffers: AttentionBuffers) throws(AttentionError) {
        let cpu = try kernels.get()
        if let plan = KeySplitPlan.make(problem), KeySplitPlan.pays(problem, buffers, threads: threads) {
            runKeySplit(problem, buffers, cpu, plan)
            return
        }
        let tile = tiling(for: problem)
        let items = WorkItem.plan(problem, tiling: tile, threads: threads)
        let maxRows = items.map(\.rows).max() ?? 1
        let shared = sharedKeyBytes(problem) != nil ? SharedKeys(problem, buffers, cpu, workers: threads) : nil
        defer { shared?.deallocate() }
        parallel(items.count, problem, buffers, cpu, tile, maxRows: maxRows, sharedKeys: shared) { kernel, index in
            kernel.process(items[index])
        }
    }

    /// The bytes of the call's shared packed keys (`SharedKeys`), or nil when items pack their own.
    package func sharedKeyBytes(_ problem: AttentionProblem) -> Int? {
        guard usesTiledProducts(problem), problem.flops >= Self.inlineProblemFlops,
            KeySplitPlan.make(problem) == nil
        else { return nil }
        return SharedKeys.bytes(problem, tiling: tiling(for: problem))
    }

    /// Batches of sequences: decode-like batches in one fork-join over key ranges of every sequence
    /// (`SequenceDecodePlan`); prefill-like batches one sequence at a time, each over all threads,
    /// reading packed and cache-length operands in place (a paged sequence's pages are gathered
    /// first: its SGEMM tiles need one stride).
    public func run(batch: SequenceBatch, _ buffers: AttentionBuffers) throws(AttentionError) {
        let cpu = try kernels.get()
        guard let plan = SequenceDecodePlan(batch) else { return try runBySequence(batch, buffers) }
        let partials = SplitPartials(rows: plan.partialRows, valueDim: batch.valueDim)
        defer { partials.deallocate() }
        let items = plan.items
        let next = WorkCounter()
        try RowIndex.with(batch) { index in
            // Tiny batches (a few short sequences) run on the calling thread: waking a helper would
            // cost more than their keys.
            let workers = batch.keyValueBytes < Self.inlineBatchBytes ? 1 : min(threads, max(1, items.count))
            WorkerPool.shared.run(workers: workers) { _ in
                let kernel = SequenceDecodeKernel(plan, cpu, buffers, partials, index)
                defer { kernel.deallocate() }
                while true {
                    let item = next.value.add(1, ordering: .relaxed).oldValue
                    guard item < items.count else { break }
                    kernel.process(sequence: items[item].sequence, range: items[item].range)
                }
            }
            // No keys: zero rows, -inf; several ranges: the exact merge.
            let merged = (0..<batch.count).filter { batch.queryLengths[$0] > 0 && plan.ranges[$0] != 1 }
            guard !merged.isEmpty else { return }
            let kernel = SequenceDecodeKernel(plan, cpu, buffers, partials, index)
            defer { kernel.deallocate() }
            for s in merged { kernel.merge(sequence: s) }
        }
    }

    /// Sequence batches reading fewer K/V bytes than this run on one thread.
    static let inlineBatchBytes = 256.0 * 1024
    /// Problems with less work than this (and K/V under `inlineBatchBytes`) run on the calling
    /// thread: waking a helper (tens of µs, more when another runtime's threads spin on the cores,
    /// as PyTorch's OpenMP workers do) would cost more than it saves.
    static let inlineProblemFlops = 2e6

    /// Decode-like problems: key ranges over all heads (see `KeySplitPlan`), then the exact merge.
    private func runKeySplit(
        _ problem: AttentionProblem, _ buffers: AttentionBuffers, _ cpu: CPUKernels, _ plan: KeySplitPlan
    ) {
        let partials = SplitPartials(problem, plan)
        defer { partials.deallocate() }
        let ranges = plan.ranges
        let adjacent = KeySplitPlan.headRowsAdjacent(problem, buffers)
        let rows = plan.tileRows(problem, headRowsAdjacent: adjacent)
        parallel(problem.batch * ranges, problem, buffers, cpu, plan.tiling, maxRows: rows) { kernel, i in
            kernel.processKeyRange(
                batch: i / ranges, range: i % ranges, plan: plan, partials: partials, groupsOuter: adjacent)
        }
        parallel(problem.batch, problem, buffers, cpu, plan.tiling, maxRows: plan.rowsPerGroup) { kernel, b in
            let row = UnsafeMutablePointer<Float>.allocate(capacity: problem.valueDim)
            defer { row.deallocate() }
            kernel.mergeKeyRanges(batch: b, plan: plan, partials: partials, row: row)
        }
    }

    /// Whether prefill tiles of `problem` use the register-tiled products: `.tiled`, or `.automatic`
    /// with an AVX2, AVX-512 or NEON kernel variant; and always only when Dv is a multiple of 16
    /// (other value widths take SGEMM).
    public func usesTiledProducts(_ problem: AttentionProblem) -> Bool {
        guard problem.valueDim % 16 == 0, let isa else { return false }
        switch products {
        case .sgemm: return false
        case .tiled: return true
        case .automatic: return isa != .baseline
        }
    }

    /// Runs `body(kernel, index)` for index 0..<count on the worker threads (dynamic scheduling, one
    /// tile kernel per thread), with OpenBLAS single-threaded for the duration.
    private func parallel(
        _ count: Int, _ problem: AttentionProblem, _ buffers: AttentionBuffers, _ cpu: CPUKernels, _ tile: BLASTiling,
        maxRows: Int, sharedKeys: SharedKeys? = nil, _ body: @escaping @Sendable (TileKernel, Int) -> Void
    ) {
        let tiny = problem.flops < Self.inlineProblemFlops && problem.keyValueBytes < Self.inlineBatchBytes
        let workers = tiny ? 1 : min(threads, count)
        let tiled = usesTiledProducts(problem)
        let next = WorkCounter()
        withMaskPointer(problem.options.mask) { mask in
            let work = {
                WorkerPool.shared.run(workers: workers) { _ in
                    let kernel = TileKernel(
                        problem: problem, tiling: tile, kernels: cpu, maxRows: maxRows, buffers: buffers, mask: mask,
                        tiledProducts: tiled, sharedKeys: sharedKeys)
                    defer { kernel.deallocate() }
                    while true {
                        let index = next.value.add(1, ordering: .relaxed).oldValue
                        guard index < count else { break }
                        body(kernel, index)
                    }
                }
            }
            // With the tiled products nothing calls OpenBLAS (few-row items use the streaming kernels):
            // no process-wide lock, so single-threaded calls from several threads run side by side.
            guard !tiled else { return work() }
            openBLASSerialiser.withLock { _ in
                let saved = openblas_get_num_threads()
                openblas_set_num_threads(1)
                defer { openblas_set_num_threads(saved) }
                work()
            }
        }
    }
}

/// Borrows the mask's storage for the duration of `body`.
private func withMaskPointer(_ mask: AttentionMask?, _ body: (MaskPointer) -> Void) {
    switch mask?.values {
    case nil: body(.none)
    case .boolean(let values)?: values.withUnsafeBufferPointer { body(.boolean($0.baseAddress!)) }
    case .additive(let values)?: values.withUnsafeBufferPointer { body(.additive($0.baseAddress!)) }
    }
}

/// The next work item to take, shared by the workers of one call.
final class WorkCounter: Sendable {
    let value = Atomic<Int>(0)
}

/// How the BLAS backend's prefill tiles compute their two products.
public enum BLASProducts: String, Sendable, Codable, CaseIterable {
    /// The register-tiled products of the CPU kernel variant where there is one (AVX2, AVX-512,
    /// NEON), SGEMM on the baseline variant.
    case automatic
    /// OpenBLAS `cblas_sgemm` for both products.
    case sgemm
    /// The CPU kernel variant's register-tiled products (K packed once per key block, accumulators
    /// in registers), whatever the variant.
    case tiled
}

/// Guards OpenBLAS's process-global thread count.
private let openBLASSerialiser = Mutex<Void>(())

/// A block of query rows: heads [head, head + headCount) of one batch entry (all in one GQA group),
/// query positions [queryStart, queryEnd). Its rows are contiguous in Q and O.
package struct WorkItem: Sendable {
    package var batch: Int
    package var head: Int
    package var headCount: Int
    package var queryStart: Int
    package var queryEnd: Int
    /// Query rows in the item (never more than the tiling's `queryRows`).
    package var rows: Int { headCount * (queryEnd - queryStart) }
    /// Relative cost, for scheduling the largest first.
    package var cost: Int

    package static func plan(_ p: AttentionProblem, tiling: BLASTiling, threads: Int) -> [WorkItem] {
        var items: [WorkItem] = []
        let nq = p.queryLength
        func cost(_ start: Int, _ end: Int, heads: Int) -> Int {
            let first = p.visibleKeys(forQuery: start)
            let last = p.visibleKeys(forQuery: end - 1)
            return heads * (end - start) * max(1, max(first.hi, last.hi) - min(first.lo, last.lo) + 1)
        }
        if nq >= tiling.queryRows / 2 {
            for b in 0..<p.batch {
                for h in 0..<p.queryHeads {
                    var start = 0
                    while start < nq {
                        let end = min(nq, start + tiling.queryRows)
                        items.append(
                            WorkItem(
                                batch: b, head: h, headCount: 1, queryStart: start, queryEnd: end,
                                cost: cost(start, end, heads: 1)))
                        start = end
                    }
                }
            }
        } else {
            // Short queries: stack whole heads of a group, but keep at least two items per thread.
            var perItem = max(1, min(p.groupSize, tiling.queryRows / nq))
            while perItem > 1 && p.batch * p.queryHeads / perItem < 2 * threads { perItem = (perItem + 1) / 2 }
            for b in 0..<p.batch {
                for group in 0..<p.keyValueHeads {
                    var h = group * p.groupSize
                    let groupEnd = h + p.groupSize
                    while h < groupEnd {
                        let count = min(perItem, groupEnd - h)
                        items.append(
                            WorkItem(
                                batch: b, head: h, headCount: count, queryStart: 0, queryEnd: nq,
                                cost: cost(0, nq, heads: count)))
                        h += count
                    }
                }
            }
        }
        // Largest first; ties keep memory order.
        return items.enumerated().sorted { ($0.element.cost, -$0.offset) > ($1.element.cost, -$1.offset) }.map(
            \.element)
    }
}
