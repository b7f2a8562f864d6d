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
    /// Ranges of each sequence.
    let ranges: [Int]
    /// The first partial row of each sequence (ranges × Hq·Nq rows each, for multi-range sequences).
    let firstPartialRow: [Int]
    let partialRows: Int
    /// Items: (sequence, range).
    let items: [(sequence: Int, range: Int)]

    /// Keys per range.
    static let rangeLength = 2048
    /// Keys per inner block (the score tile's width). serve-decode on the 2-core Zen 5 machine, 512
    /// against 128: paged 20.8-21.7 against 22.2-23.0 ms, contiguous 21.5-22.0 against 24.5 ms.
    static let block = 512

    /// The plan, or nil when the batch is not decode-like (too many query rows per K/V head).
    init?(_ batch: SequenceBatch) {
        guard batch.regime == .decodeLike, batch.groupSize * batch.maxQueryLength <= KeySplitPlan.maxRowsPerGroup
        else { return nil }
        self.batch = batch
        var ranges: [Int] = []
        var partialStart: [Int] = []
        var items: [(Int, Int)] = []
        var partialRows = 0
        for s in 0..<batch.count {
            let visible = batch.queryLengths[s] > 0 ? batch.keyLengths[s] : 0
            let count = (visible + Self.rangeLength - 1) / Self.rangeLength
            ranges.append(count)
            partialStart.append(partialRows)
            if count > 1 { partialRows += count * batch.queryHeads * batch.queryLengths[s] }
            for r in 0..<count { items.append((s, r)) }
        }
        self.ranges = ranges
        firstPartialRow = partialStart
        self.partialRows = partialRows
        // Longest sequences' ranges first (largest items first balances the threads).
        self.items = items.sorted { batch.keyLengths[$0.0] > batch.keyLengths[$1.0] }
    }
}

/// Where a batch's rows are, as raw pointers borrowed for one call: no enum switches or array
/// reference counting in the per-run loop (two threads retaining one array bounce its cache line).
struct RowIndex: @unchecked Sendable {
    enum Form { case packed, cacheLengths, paged }
    let form: Form
    /// Packed: S + 1 query and key offsets.
    let queryOffsets: UnsafePointer<Int32>
    let keyOffsets: UnsafePointer<Int32>
    /// Paged: the block table [B, maxPages].
    let blockTable: UnsafePointer<Int32>
    let maxPages: Int
    let pageSize: Int

    /// Runs `body` with the index of `batch`'s arrays.
    static func with<R>(_ batch: SequenceBatch, _ body: (RowIndex) throws(AttentionError) -> R) throws(AttentionError)
        -> R
    {
        let none: [Int32] = [0]
        let (cuQ, cuK, table, form): ([Int32], [Int32], PageTable?, Form)
        switch batch.layout {
        case .packed(let q, let k): (cuQ, cuK, table, form) = (q, k, nil, .packed)
        case .cacheLengths: (cuQ, cuK, table, form) = (none, none, nil, .cacheLengths)
        case .paged(_, let t): (cuQ, cuK, table, form) = (none, none, t, .paged)
        }
        let blocks = table?.blockTable ?? none
        return try cuQ.withUnsafeBufferPointer { (q) throws(AttentionError) -> R in
            try cuK.withUnsafeBufferPointer { (k) throws(AttentionError) -> R in
                try blocks.withUnsafeBufferPointer { (b) throws(AttentionError) -> R in
                    let index = RowIndex(
                        form: form, queryOffsets: q.baseAddress!, keyOffsets: k.baseAddress!,
                        blockTable: b.baseAddress!, maxPages: table?.maxPages ?? 1, pageSize: table?.pageSize ?? 1)
                    return try body(index)
                }
            }
        }
    }

    /// The page holding key j of sequence s.
    @inline(__always)
    func page(_ s: Int, _ j: Int) -> Int { Int(blockTable[s * maxPages + j / pageSize]) }
}

/// One worker's view of a sequence-batch decode: borrowed operands and its own tiles.
struct SequenceDecodeKernel {
    let plan: SequenceDecodePlan
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
    /// Pages: the K and V row of each key of the block (head 0), so one kernel call covers the
    /// block across page boundaries.
    let keyRows: UnsafeMutablePointer<UnsafeRawPointer?>
    let valueRows: UnsafeMutablePointer<UnsafeRawPointer?>
    let index: RowIndex
    /// The batch's scalars, read once (the per-item loops touch no `SequenceBatch` members, whose
    /// copies would retain and copy its arrays).
    let hq: Int, hkv: Int, g: Int, d: Int, dv: Int
    let scale: Float
    let softcap: Float?
    let causal: Bool
    let window: AttentionWindow?
    let queryLengths: [Int]
    let keyLengths: [Int]

    init(
        _ plan: SequenceDecodePlan, _ cpu: CPUKernels, _ buffers: AttentionBuffers, _ partials: SplitPartials,
        _ index: RowIndex
    ) {
        self.plan = plan
        self.index = index
        let batch = plan.batch
        self.cpu = cpu.table.pointee
        q = Operand(buffers.query, shape: batch.queryShape)
        k = Operand(buffers.key, shape: batch.keyShape)
        v = Operand(buffers.value, shape: batch.valueShape)
        o = Operand(buffers.output, shape: batch.outputShape)
        lse = buffers.logSumExp?.baseAddress
        self.partials = partials
        ld = SequenceDecodePlan.block
        let rows = batch.queryHeads * max(1, batch.maxQueryLength)
        scores = .allocate(capacity: rows * ld)
        queryTile = .allocate(capacity: rows * batch.headDim)
        outTile = .allocate(capacity: rows * batch.valueDim)
        rowMax = .allocate(capacity: rows)
        rowSum = .allocate(capacity: rows)
        lseTile = .allocate(capacity: rows)
        keyRows = .allocate(capacity: SequenceDecodePlan.block)
        valueRows = .allocate(capacity: SequenceDecodePlan.block)
        (hq, hkv, g, d, dv) = (batch.queryHeads, batch.keyValueHeads, batch.groupSize, batch.headDim, batch.valueDim)
        (scale, softcap, causal) = (batch.scale, batch.options.softcap, batch.options.causal)
        window = batch.options.window
        (queryLengths, keyLengths) = (batch.queryLengths, batch.keyLengths)
    }

    /// `SequenceBatch.visibleKeys` on the kernel's copies of the batch's scalars.
    @inline(__always)
    private func visibleKeys(sequence s: Int, query i: Int) -> (lo: Int, hi: Int) {
        AttentionProblem.visibleKeys(
            query: i, queryLength: queryLengths[s], keyLength: keyLengths[s], causal: causal, window: window)
    }

    func deallocate() {
        for tile in [scores, queryTile, outTile, rowMax, rowSum, lseTile] { tile.deallocate() }
        keyRows.deallocate()
        valueRows.deallocate()
    }

    /// Element offset of query (or output) row (h, i) of sequence s.
    private func rowOffset(_ operand: Operand, sequence s: Int, head h: Int, query i: Int) -> Int {
        let st = operand.strides
        if index.form == .packed { return (Int(index.queryOffsets[s]) + i) * st.sequence + h * st.head }
        return s * st.batch + h * st.head + i * st.sequence
    }

    /// The K and V rows of keys [j0, j0 + width) of sequence s, K/V head 0, as one strided run
    /// (packed, cache lengths: base addresses, rows one sequence stride apart, no table) or, for
    /// pages, in the row tables (`keyRows`, `valueRows`), each key's row in its page.
    @inline(__always)
    private func blockRows(sequence s: Int, start j0: Int, width: Int) -> (
        k: UnsafeRawPointer, v: UnsafeRawPointer, table: Bool
    ) {
        switch index.form {
        case .packed:
            let j = Int(index.keyOffsets[s]) + j0
            return (
                UnsafeRawPointer(k.base + j * k.strides.sequence * k.type.byteSize),
                UnsafeRawPointer(v.base + j * v.strides.sequence * v.type.byteSize), false
            )
        case .cacheLengths:
            return (UnsafeRawPointer(k.row(s, 0, j0)), UnsafeRawPointer(v.row(s, 0, j0)), false)
        case .paged:
            let pageSize = index.pageSize
            var c = 0
            while c < width {
                let j = j0 + c
                let page = index.page(s, j)
                let n = min(width - c, pageSize - j % pageSize)
                let (kRow, vRow) = (k.row(page, 0, j % pageSize), v.row(page, 0, j % pageSize))
                let (kStep, vStep) = (k.strides.sequence * k.type.byteSize, v.strides.sequence * v.type.byteSize)
                for t in 0..<n {
                    keyRows[c + t] = UnsafeRawPointer(kRow + t * kStep)
                    valueRows[c + t] = UnsafeRawPointer(vRow + t * vStep)
                }
                c += n
            }
            return (UnsafeRawPointer(k.base), UnsafeRawPointer(v.base), true)
        }
    }

    /// Keys of range `range` of sequence `s` for every query row of the sequence.
    func process(sequence s: Int, range: Int) {
        let nq = queryLengths[s]
        let rowsPerSequence = hq * nq
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
        // Q rows: in place when they are fp32 and one stride apart (always for one query per head),
        // else widened into the tile (all heads in one call when one stride apart).
        let query: UnsafePointer<Float>
        let ldq: Int
        let uniform = q.uniformRowStride(heads: hq, span: nq)
        let firstQuery = q.base + rowOffset(q, sequence: s, head: 0, query: 0) * q.type.byteSize
        if let stride = uniform, q.type == .f32, stride >= d {
            (query, ldq) = (UnsafePointer(firstQuery.assumingMemoryBound(to: Float.self)), stride)
        } else if let stride = uniform {
            cpu.load_rows(q.dtype, firstQuery, stride, hq * nq, d, queryTile, d)
            (query, ldq) = (UnsafePointer(queryTile), d)
        } else {
            for h in 0..<hq {
                cpu.load_rows(
                    q.dtype, q.base + rowOffset(q, sequence: s, head: h, query: 0) * q.type.byteSize,
                    q.strides.sequence, nq, d, queryTile + h * nq * d, d)
            }
            (query, ldq) = (UnsafePointer(queryTile), d)
        }
        let first = visibleKeys(sequence: s, query: 0)
        let last = visibleKeys(sequence: s, query: nq - 1)
        let lo = max(range * SequenceDecodePlan.rangeLength, first.lo)
        let hi = min((range + 1) * SequenceDecodePlan.rangeLength, keyLengths[s], last.hi + 1)
        // Per block: the scores of every head group in one call, then the softmax step per group,
        // then P·V in one call; the group kernels walk keys outermost, so each call reads the
        // block's rows of all heads together (in address order for pages and [B, N, H, D] caches;
        // as Hkv streams for [B, H, N, D] caches, which measured 19.7-20.8 ms against 21.5-21.8 ms
        // walking one head at a time on serve-decode's contiguous form). Pages go through row
        // tables, so a call covers the whole block whatever the page size, and the kernels'
        // prefetches run ahead across page boundaries.
        var j0 = lo
        while j0 < hi {
            let width = min(SequenceDecodePlan.block, hi - j0)
            let needsVisibility = j0 < last.lo || j0 + width - 1 > first.hi
            let block = blockRows(sequence: s, start: j0, width: width)
            cpu.dot_scores_groups(
                hkv, rows, width, query, ldq, rows * ldq, k.dtype, block.k, k.strides.sequence,
                block.table ? UnsafePointer(keyRows) : nil, k.strides.head, d, scale, scores, ld, rows * ld)
            for group in 0..<hkv {
                let tile = scores + group * rows * ld
                if let cap = softcap { cpu.softcap(tile, ld, rows, width, cap) }
                if needsVisibility {
                    for r in 0..<rows {
                        let (lo, hi) = visibleKeys(sequence: s, query: r % nq)
                        cpu.clip_row(tile + r * ld, width, lo - j0, hi - j0)
                    }
                }
                cpu.softmax_update(
                    tile, ld, rows, width, rowMax + group * rows, rowSum + group * rows, out + group * rows * dv, dv,
                    dv)
            }
            cpu.accumulate_groups(
                hkv, rows, width, scores, ld, rows * ld, v.dtype, block.v, v.strides.sequence,
                block.table ? UnsafePointer(valueRows) : nil, v.strides.head, dv, out, dv, rows * dv)
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
        let ranges = plan.ranges[s]
        let rowsPerSequence = hq * queryLengths[s]
        let base = plan.firstPartialRow[s]
        for row in 0..<rowsPerSequence {
            lseTile[row] = mergePartialRows(
                partials, first: base + row, stride: rowsPerSequence, count: ranges, valueDim: dv,
                into: outTile + row * dv)
        }
        store(sequence: s, rows: outTile, logSumExp: lseTile)
    }

    /// Stores Hq·Nq fp32 rows (head-major) as sequence s's output rows, and their LSEs.
    func store(sequence s: Int, rows: UnsafePointer<Float>, logSumExp: UnsafePointer<Float>) {
        let nq = queryLengths[s]
        if let ldo = o.uniformRowStride(heads: hq, span: nq) {
            let first = o.base + rowOffset(o, sequence: s, head: 0, query: 0) * o.type.byteSize
            cpu.store_rows(o.dtype, rows, dv, hq * nq, dv, first, ldo)
        } else {
            for h in 0..<hq {
                let target = o.base + rowOffset(o, sequence: s, head: h, query: 0) * o.type.byteSize
                cpu.store_rows(o.dtype, rows + h * nq * dv, dv, nq, dv, target, o.strides.sequence)
            }
        }
        guard let lse else { return }
        if index.form == .packed {
            let start = Int(index.queryOffsets[s])
            for h in 0..<hq {
                for i in 0..<nq { lse[(start + i) * hq + h] = logSumExp[h * nq + i] }
            }
        } else {
            (lse + s * hq * nq).update(from: logSumExp, count: hq * nq)
        }
    }
}
