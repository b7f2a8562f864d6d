import AttentionCore
import AttentionMachine
import CAttentionCPU
import Foundation

/// Decode for a batch of sequences (packed, cache lengths or paged), in one fork-join.
///
/// A work item is a range of at most `rangeLength` keys of one sequence, over every query row of
/// that sequence (all heads): the key-split of `KeySplitPlan`, with ranges per sequence, so one long
/// sequence among short ones is split across the threads instead of serialising the batch. Keys are
/// read where they lie, as runs of rows one stride apart: a run is the part of a key block inside
/// one page (paged) or the whole block (packed, cache lengths). A sequence covered by one range
/// writes its output directly; longer ones are merged exactly through their LSEs. The ranges depend
/// on the key lengths only, so results do not depend on the thread count.
struct SequenceDecodePlan {
    let batch: SequenceBatch
    /// Keys per range.
    let rangeLength: Int
    /// Keys per inner block (the score tile's width).
    let block: Int
    /// Ranges of each sequence, and the first item of each.
    let ranges: [Int]
    let firstItem: [Int]
    /// The first partial row of each sequence (ranges × Hq·Nq rows each, for multi-range sequences).
    let firstPartialRow: [Int]
    let partialRows: Int
    /// Items: (sequence, range).
    let items: [(sequence: Int, range: Int)]
    /// The most query rows per K/V head.
    let rowsPerGroup: Int

    static let rangeKeys = 2048
    static let blockKeys = 128

    /// The plan, or nil when the batch is not decode-like (too many query rows per K/V head).
    init?(_ batch: SequenceBatch) {
        let rows = batch.groupSize * batch.maxQueryLength
        guard batch.regime == .decodeLike, rows <= KeySplitPlan.maxRowsPerGroup else { return nil }
        self.batch = batch
        rangeLength = Self.rangeKeys
        block = Self.blockKeys
        rowsPerGroup = max(1, rows)
        var ranges: [Int] = []
        var first: [Int] = []
        var partialStart: [Int] = []
        var items: [(Int, Int)] = []
        var partialRows = 0
        for s in 0..<batch.count {
            let visible = batch.queryLengths[s] > 0 ? batch.keyLengths[s] : 0
            let count = (visible + rangeLength - 1) / rangeLength
            ranges.append(count)
            first.append(items.count)
            partialStart.append(partialRows)
            if count > 1 { partialRows += count * batch.queryHeads * batch.queryLengths[s] }
            for r in 0..<count { items.append((s, r)) }
        }
        self.ranges = ranges
        firstItem = first
        firstPartialRow = partialStart
        self.partialRows = partialRows
        // Longest sequences' ranges first: they finish with their merge.
        self.items = items.sorted { batch.keyLengths[$0.0] > batch.keyLengths[$1.0] }
    }

    /// Bytes of the partial results.
    var partialBytes: Int { 4 * partialRows * (batch.valueDim + 3) }

    /// Bytes one worker allocates: a score tile, its row statistics, a sequence's Q rows and O rows.
    var perThreadBytes: Int {
        let rows = batch.queryHeads * batch.maxQueryLength
        return 4 * (rowsPerGroup * block + rows * (batch.headDim + batch.valueDim + 3))
    }
}

/// One worker's view of a sequence-batch decode: borrowed operands and its own tiles.
struct SequenceDecodeKernel {
    let plan: SequenceDecodePlan
    let batch: SequenceBatch
    let cpu: ak_cpu_kernels
    let q: Operand, k: Operand, v: Operand, o: Operand
    let lse: UnsafeMutablePointer<Float>?
    let partials: SplitPartials
    let ld: Int
    let scores: UnsafeMutablePointer<Float>
    let queryTile: UnsafeMutablePointer<Float>
    let outTile: UnsafeMutablePointer<Float>
    let rowMax: UnsafeMutablePointer<Float>
    let rowSum: UnsafeMutablePointer<Float>
    let lseTile: UnsafeMutablePointer<Float>

    init(_ plan: SequenceDecodePlan, _ cpu: CPUKernels, _ buffers: AttentionBuffers, _ partials: SplitPartials) {
        self.plan = plan
        batch = plan.batch
        self.cpu = cpu.table.pointee
        q = Operand(buffers.query, shape: batch.queryShape)
        k = Operand(buffers.key, shape: batch.keyShape)
        v = Operand(buffers.value, shape: batch.valueShape)
        o = Operand(buffers.output, shape: batch.outputShape)
        lse = buffers.logSumExp?.baseAddress
        self.partials = partials
        ld = plan.block
        let rows = batch.queryHeads * max(1, batch.maxQueryLength)
        scores = .allocate(capacity: plan.rowsPerGroup * ld)
        queryTile = .allocate(capacity: rows * batch.headDim)
        outTile = .allocate(capacity: rows * batch.valueDim)
        rowMax = .allocate(capacity: rows)
        rowSum = .allocate(capacity: rows)
        lseTile = .allocate(capacity: rows)
    }

    func deallocate() {
        for tile in [scores, queryTile, outTile, rowMax, rowSum, lseTile] { tile.deallocate() }
    }

    /// Element offset of query (or output) row (h, i) of sequence s.
    private func rowOffset(_ operand: Operand, sequence s: Int, head h: Int, query i: Int) -> Int {
        let st = operand.strides
        switch batch.layout {
        case .packed(let cuQ, _): return (Int(cuQ[s]) + i) * st.sequence + h * st.head
        case .cacheLengths, .paged: return s * st.batch + h * st.head + i * st.sequence
        }
    }

    /// Calls `body(kRow, vRow, column, count)` for the runs of keys [j0, j0 + width) of K/V head
    /// `g` of sequence s: rows one sequence stride apart, `column` the run's offset in the block.
    @inline(__always)
    private func forEachRun(
        sequence s: Int, group g: Int, start j0: Int, width: Int,
        _ body: (UnsafeRawPointer, UnsafeRawPointer, Int, Int) -> Void
    ) {
        let (ks, vs) = (k.strides, v.strides)
        let (kb, vb) = (k.type.byteSize, v.type.byteSize)
        switch batch.layout {
        case .packed(_, let cuK):
            let j = Int(cuK[s]) + j0
            body(
                k.base + (j * ks.sequence + g * ks.head) * kb, v.base + (j * vs.sequence + g * vs.head) * vb, 0, width)
        case .cacheLengths:
            body(k.row(s, g, j0), v.row(s, g, j0), 0, width)
        case .paged(_, let table):
            let pageSize = table.pageSize
            var c = 0
            while c < width {
                let j = j0 + c
                let page = table.page(sequence: s, key: j)
                let n = min(width - c, pageSize - j % pageSize)
                body(k.row(page, g, j % pageSize), v.row(page, g, j % pageSize), c, n)
                c += n
            }
        }
    }

    /// Keys of range `range` of sequence `s` for every query row of the sequence.
    func process(sequence s: Int, range: Int) {
        let (d, dv, nq, g) = (batch.headDim, batch.valueDim, batch.queryLengths[s], batch.groupSize)
        let rowsPerSequence = batch.queryHeads * nq
        let rows = g * nq
        let single = plan.ranges[s] == 1
        let out: UnsafeMutablePointer<Float>
        if single {
            out = outTile
        } else {
            let first = plan.firstPartialRow[s] + range * rowsPerSequence
            out = partials.output + first * dv
        }
        out.update(repeating: 0, count: rowsPerSequence * dv)
        rowMax.update(repeating: -.infinity, count: rowsPerSequence)
        rowSum.update(repeating: 0, count: rowsPerSequence)
        for h in 0..<batch.queryHeads {
            cpu.load_rows(
                q.dtype, q.base + rowOffset(q, sequence: s, head: h, query: 0) * q.type.byteSize, q.strides.sequence,
                nq, d, queryTile + h * nq * d, d)
        }
        let first = batch.visibleKeys(sequence: s, query: 0)
        let last = batch.visibleKeys(sequence: s, query: nq - 1)
        let lo = max(range * plan.rangeLength, first.lo)
        let hi = min((range + 1) * plan.rangeLength, batch.keyLengths[s], last.hi + 1)
        var j0 = lo
        while j0 < hi {
            let width = min(plan.block, hi - j0)
            let needsVisibility = j0 < last.lo || j0 + width - 1 > first.hi
            for group in 0..<batch.keyValueHeads {
                let query = queryTile + group * rows * d
                let o = out + group * rows * dv
                forEachRun(sequence: s, group: group, start: j0, width: width) { kRow, _, column, count in
                    cpu.dot_scores(
                        rows, count, query, d, k.dtype, kRow, k.strides.sequence, d, batch.scale, scores + column, ld)
                }
                if let cap = batch.options.softcap { cpu.softcap(scores, ld, rows, width, cap) }
                if needsVisibility {
                    for r in 0..<rows {
                        let (lo, hi) = batch.visibleKeys(sequence: s, query: r % nq)
                        cpu.clip_row(scores + r * ld, width, lo - j0, hi - j0)
                    }
                }
                cpu.softmax_update(scores, ld, rows, width, rowMax + group * rows, rowSum + group * rows, o, dv, dv)
                forEachRun(sequence: s, group: group, start: j0, width: width) { _, vRow, column, count in
                    cpu.accumulate(rows, count, scores + column, ld, v.dtype, vRow, v.strides.sequence, dv, o, dv)
                }
            }
            j0 += width
        }
        if single {
            cpu.finish(rowsPerSequence, out, dv, dv, rowMax, rowSum, lseTile)
            store(sequence: s, rows: out, logSumExp: lseTile)
        } else {
            let first = plan.firstPartialRow[s] + range * rowsPerSequence
            cpu.finish(rowsPerSequence, out, dv, dv, rowMax, rowSum, partials.logSumExp + first)
        }
    }

    /// The exact merge of the ranges of sequence `s` (more than one): O = Σ e^(lse_r - M) O_r /
    /// Σ e^(lse_r - M), LSE = M + log Σ e^(lse_r - M); rows that saw no key stay 0 / -inf, NaN rows NaN.
    func merge(sequence s: Int) {
        let (dv, ranges) = (batch.valueDim, plan.ranges[s])
        let rowsPerSequence = batch.queryHeads * batch.queryLengths[s]
        let base = plan.firstPartialRow[s]
        for row in 0..<rowsPerSequence {
            var m = -Float.infinity
            var poisoned = false
            for r in 0..<ranges {
                let x = partials.logSumExp[base + r * rowsPerSequence + row]
                if x.isNaN { poisoned = true } else if x > m { m = x }
            }
            let target = outTile + row * dv
            target.update(repeating: poisoned ? .nan : 0, count: dv)
            var total: Float = 0
            if !poisoned && m != -.infinity {
                for r in 0..<ranges {
                    let partial = base + r * rowsPerSequence + row
                    let weight = expf(partials.logSumExp[partial] - m)
                    guard weight > 0 else { continue }
                    total += weight
                    let source = partials.output + partial * dv
                    for c in 0..<dv { target[c] += weight * source[c] }
                }
                let inverse = 1 / total
                for c in 0..<dv { target[c] *= inverse }
            }
            lseTile[row] = poisoned ? .nan : m == -.infinity ? -.infinity : m + logf(total)
        }
        store(sequence: s, rows: outTile, logSumExp: lseTile)
    }

    /// Stores Hq·Nq fp32 rows (head-major) as sequence s's output rows, and their LSEs.
    func store(sequence s: Int, rows: UnsafePointer<Float>, logSumExp: UnsafePointer<Float>) {
        let (dv, nq, hq) = (batch.valueDim, batch.queryLengths[s], batch.queryHeads)
        for h in 0..<hq {
            let target = o.base + rowOffset(o, sequence: s, head: h, query: 0) * o.type.byteSize
            cpu.store_rows(o.dtype, rows + h * nq * dv, dv, nq, dv, target, o.strides.sequence)
        }
        guard let lse else { return }
        switch batch.layout {
        case .packed(let cuQ, _):
            for h in 0..<hq {
                for i in 0..<nq { lse[(Int(cuQ[s]) + i) * hq + h] = logSumExp[h * nq + i] }
            }
        case .cacheLengths, .paged:
            (lse + s * hq * nq).update(from: logSumExp, count: hq * nq)
        }
    }
}
