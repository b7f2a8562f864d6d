import AttentionCore
import CAttentionCPU
import Foundation

/// Decode by key ranges: the CPU's split-KV.
///
/// Decode reads every K and V row once, so the order of the reads decides the speed. Splitting the
/// work by K/V head (one item per head) makes each item walk rows that are H·D elements apart in a
/// [B, N, H, D] cache, every row on a new page; and with one K/V head (MQA, batch 1) there is one item
/// for all the cores. Here an item is a range of keys of one batch entry instead: it walks its keys in
/// small blocks and, for each block, every K/V head in turn (adjacent memory in any layout), keeping
/// one online softmax per query row of all heads. Each range ends in a normalised partial O and its
/// log-sum-exp; the ranges are merged exactly through the LSEs. The number of ranges depends on Nk
/// only, so results do not depend on the thread count.
struct KeySplitPlan {
    /// Key ranges per batch entry, and keys per range.
    let ranges: Int
    let rangeLength: Int
    /// Keys per inner block (the score tile's width).
    let block: Int
    /// Query rows per K/V head: G · Nq.
    let rowsPerGroup: Int

    /// Keys per inner block: one block of every head stays in L2 while the heads are walked, and
    /// the streams run long between the calls (measured on a decode with Hkv 2, 131k keys, fp16 K/V
    /// in [B, H, N, D]: 4.2-4.8 ms with 512, 5.7-6.3 ms with 128).
    static let blockKeys = 512
    /// Most query rows per K/V head the plan takes (the streaming kernels handle them 8 at a time).
    static let maxRowsPerGroup = 32

    /// The plan for a decode-like problem, or nil when the problem should be tiled by query blocks.
    static func make(_ p: AttentionProblem) -> KeySplitPlan? {
        let rows = p.groupSize * p.queryLength
        guard p.regime == .decodeLike, rows <= maxRowsPerGroup else { return nil }
        let ranges = min(16, max(1, (p.keyLength + 2047) / 2048))
        let length = (p.keyLength + ranges - 1) / ranges
        return KeySplitPlan(ranges: ranges, rangeLength: length, block: blockKeys, rowsPerGroup: rows)
    }

    /// Whether key ranges pay for this call: when a head's K or V rows are not adjacent in memory
    /// ([B, N, H, D] caches, packed QKV views), or when there are fewer (batch, K/V head) items than
    /// two per thread (MQA, batch 1). Otherwise one item per K/V head streams longer contiguous runs
    /// (measured 11-13 ms against 15-17 ms on decode-32k fp32 [B, H, N, D] with 128-key blocks; with
    /// 512-key blocks the two are within the noise, 10.5-11.2 against 11.1-11.3 ms).
    static func pays(_ p: AttentionProblem, _ buffers: AttentionBuffers, threads: Int) -> Bool {
        !headRowsAdjacent(p, buffers) || p.batch * p.keyValueHeads < 2 * threads
    }

    /// Whether each K/V head's K rows and V rows are adjacent in memory ([B, H, N, D]): ranges then
    /// walk one head group at a time; otherwise every group of a block in one call.
    static func headRowsAdjacent(_ p: AttentionProblem, _ buffers: AttentionBuffers) -> Bool {
        buffers.key.strides(for: p.keyShape).sequence == p.headDim
            && buffers.value.strides(for: p.valueShape).sequence == p.valueDim
    }

    /// Query rows a worker's score tile holds: one head group's, or every head's when the groups of
    /// a block are scored in one call.
    func tileRows(_ p: AttentionProblem, headRowsAdjacent: Bool) -> Int {
        headRowsAdjacent ? rowsPerGroup : rowsPerBatch(p)
    }

    /// The tiling of the per-thread tiles: a score tile of a head group's rows (`tileRows` says how
    /// many groups) by a block of keys.
    var tiling: BLASTiling { BLASTiling(queryRows: rowsPerGroup, keyBlock: block) }

    /// Bytes of the partial results (O, LSE, running max and sum of every row of every range).
    func partialBytes(_ p: AttentionProblem) -> Int { 4 * p.batch * ranges * rowsPerBatch(p) * (p.valueDim + 3) }

    /// Query rows of one batch entry (all heads), the unit of the partial buffers.
    func rowsPerBatch(_ p: AttentionProblem) -> Int { p.queryHeads * p.queryLength }
}

/// Partial results of every key range: O rows [B, ranges, Hq·Nq, Dv] and LSEs [B, ranges, Hq·Nq].
struct SplitPartials: @unchecked Sendable {
    let output: UnsafeMutablePointer<Float>
    let logSumExp: UnsafeMutablePointer<Float>
    let rowMax: UnsafeMutablePointer<Float>
    let rowSum: UnsafeMutablePointer<Float>

    init(_ p: AttentionProblem, _ plan: KeySplitPlan) {
        self.init(rows: p.batch * plan.ranges * plan.rowsPerBatch(p), valueDim: p.valueDim)
    }

    init(rows: Int, valueDim: Int) {
        output = .allocate(capacity: rows * valueDim)
        logSumExp = .allocate(capacity: rows)
        rowMax = .allocate(capacity: rows)
        rowSum = .allocate(capacity: rows)
    }

    func deallocate() {
        output.deallocate()
        logSumExp.deallocate()
        rowMax.deallocate()
        rowSum.deallocate()
    }
}

extension TileKernel {
    /// Keys of range `range` of batch entry `b`, for every query row of the batch entry: writes the
    /// range's normalised partial O and LSE.
    /// `groupsOuter`: `KeySplitPlan.headRowsAdjacent` (then the score tile holds one group's rows,
    /// else every head's).
    func processKeyRange(batch b: Int, range: Int, plan: KeySplitPlan, partials: SplitPartials, groupsOuter: Bool) {
        let (d, dv, nq, g) = (p.headDim, p.valueDim, p.queryLength, p.groupSize)
        let rowsPerBatch = plan.rowsPerBatch(p)
        let firstPartialRow = (b * plan.ranges + range) * rowsPerBatch
        let out = partials.output + firstPartialRow * dv
        let rowMax = partials.rowMax + firstPartialRow
        let rowSum = partials.rowSum + firstPartialRow
        out.update(repeating: 0, count: rowsPerBatch * dv)
        rowMax.update(repeating: -.infinity, count: rowsPerBatch)
        rowSum.update(repeating: 0, count: rowsPerBatch)

        // Keys any row can see within this range; rows of a head see [lo(last), hi(first)] entirely.
        let first = p.visibleKeys(forQuery: 0)
        let last = p.visibleKeys(forQuery: nq - 1)
        let lo = max(range * plan.rangeLength, first.lo)
        let hi = min((range + 1) * plan.rangeLength, p.keyLength, last.hi + 1)
        let hasMask: Bool
        if case .none = mask { hasMask = false } else { hasMask = true }
        let (rows, heads) = (plan.rowsPerGroup, p.keyValueHeads)
        let items = (0..<heads).map { group in
            WorkItem(batch: b, head: group * g, headCount: g, queryStart: 0, queryEnd: nq, cost: 0)
        }
        // Each group's query rows, fetched once for the whole range: in place where they can be,
        // else widened into a tile of all the batch entry's rows. Scored together, the groups' rows
        // must be one stride apart, so they are taken (or widened) as one run of every head's rows.
        let all = WorkItem(batch: b, head: 0, headCount: p.queryHeads, queryStart: 0, queryEnd: nq, cost: 0)
        let inPlace = groupsOuter ? items.map(queryRowsInPlace(of:)) : [queryRowsInPlace(of: all)]
        let gatherTile = UnsafeMutablePointer<Float>.allocate(
            capacity: inPlace.contains { $0 == nil } ? rowsPerBatch * d : 0)
        defer { gatherTile.deallocate() }
        let queries: [(UnsafePointer<Float>, Int)]
        if groupsOuter {
            queries = items.indices.map { group in
                inPlace[group] ?? gatherQueryRows(of: items[group], into: gatherTile + group * rows * d)
            }
        } else {
            let (query, ldq) = inPlace[0] ?? gatherQueryRows(of: all, into: gatherTile)
            queries = (0..<heads).map { group in (query + group * rows * ldq, ldq) }
        }
        // The passes over each block. Each K/V head's rows adjacent ([B, H, N, D]): one head group
        // per pass, each streaming its own rows. Otherwise ([B, N, H, D] caches, packed QKV views)
        // every group in one pass, whose calls read the block's rows in address order (see
        // `dot_scores_groups`); the score tile then holds every group's rows.
        let passes = groupsOuter ? (0..<heads).map { $0..<($0 + 1) } : [0..<heads]
        var j0 = lo
        while j0 < hi {
            let width = min(plan.block, hi - j0)
            let needsVisibility = hasMask || j0 < last.lo || j0 + width - 1 > first.hi
            for groups in passes {
                let g0 = groups.lowerBound
                let (query, ldq) = queries[g0]
                cpu.dot_scores_groups(
                    groups.count, rows, width, query, ldq, rows * ldq, k.dtype, k.row(b, g0, j0),
                    k.strides.sequence, nil, k.strides.head, d, p.scale, scores, ld, rows * ld)
                for group in groups {
                    let tile = scores + (group - g0) * rows * ld
                    prepareScores(
                        items[group], span: nq, rows: rows, keyStart: j0, width: width, visibility: needsVisibility,
                        tile: tile)
                    cpu.softmax_update(
                        tile, ld, rows, width, rowMax + group * rows, rowSum + group * rows, out + group * rows * dv,
                        dv, dv)
                }
                cpu.accumulate_groups(
                    groups.count, rows, width, scores, ld, rows * ld, v.dtype, v.row(b, g0, j0),
                    v.strides.sequence, nil, v.strides.head, dv, out + g0 * rows * dv, dv, rows * dv)
            }
            j0 += width
        }
        cpu.finish(rowsPerBatch, out, dv, dv, rowMax, rowSum, partials.logSumExp + firstPartialRow)
    }

    /// The exact merge of the ranges of batch entry `b`: O = Σ e^(lse_r - M) O_r / Σ e^(lse_r - M),
    /// LSE = M + log Σ e^(lse_r - M); rows that saw no key stay 0 / -inf, NaN rows stay NaN.
    func mergeKeyRanges(
        batch b: Int, plan: KeySplitPlan, partials: SplitPartials, row buffer: UnsafeMutablePointer<Float>
    ) {
        let (dv, nq) = (p.valueDim, p.queryLength)
        let rowsPerBatch = plan.rowsPerBatch(p)
        for row in 0..<rowsPerBatch {
            let first = b * plan.ranges * rowsPerBatch + row
            let rowLSE = mergePartialRows(
                partials, first: first, stride: rowsPerBatch, count: plan.ranges, valueDim: dv, into: buffer)
            let (h, n) = (row / nq, row % nq)
            cpu.store_rows(o.dtype, buffer, dv, 1, dv, o.row(b, h, n), o.strides.sequence)
            if let lse { lse[b * rowsPerBatch + row] = rowLSE }
        }
    }
}

/// The exact merge of `count` partial results of one query row (partial rows `first`, `first +
/// stride`, ...) into `target`, returning the merged LSE (`mergePartialRows` in AttentionCore).
func mergePartialRows(
    _ partials: SplitPartials, first: Int, stride: Int, count: Int, valueDim dv: Int,
    into target: UnsafeMutablePointer<Float>
) -> Float {
    mergePartialRows(
        count: count, valueDim: dv, logSumExp: partials.logSumExp + first, logSumExpStride: stride,
        outputs: partials.output + first * dv, outputStride: stride * dv, into: target)
}
