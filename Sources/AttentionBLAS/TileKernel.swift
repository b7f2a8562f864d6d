import AttentionCore
import CAttentionCPU
import CBLAS

/// The mask's storage, borrowed for one call (read-only, shared by the worker threads).
enum MaskPointer: @unchecked Sendable {
    case none
    case boolean(UnsafePointer<Bool>)
    case additive(UnsafePointer<Float>)
}

/// One worker thread's view of a call: borrowed inputs and outputs plus its own score tile.
///
/// The loop structure lives here; every pass over scores, O or K/V rows is a call into the CPU
/// kernel variant chosen at run time (`CPUKernels`), compiled for this machine's instruction set.
struct TileKernel {
    let p: AttentionProblem
    let tiling: BLASTiling
    let cpu: ak_cpu_kernels
    let q: UnsafePointer<Float>
    let k: UnsafePointer<Float>
    let v: UnsafePointer<Float>
    let out: UnsafeMutablePointer<Float>
    let lse: UnsafeMutablePointer<Float>?
    let mask: MaskPointer
    /// Row stride of the score tile: the key block, a multiple of 16 floats (whole kernel vectors).
    let ld: Int
    let scores: UnsafeMutablePointer<Float>
    let rowMax: UnsafeMutablePointer<Float>
    let rowSum: UnsafeMutablePointer<Float>

    init(
        problem: AttentionProblem, tiling: BLASTiling, kernels: CPUKernels, maxRows rows: Int,
        buffers: AttentionBuffers,
        mask: MaskPointer
    ) {
        p = problem
        self.tiling = tiling
        cpu = kernels.table.pointee
        q = buffers.query.baseAddress!
        k = buffers.key.baseAddress!
        v = buffers.value.baseAddress!
        out = buffers.output.baseAddress!
        lse = buffers.logSumExp?.baseAddress
        self.mask = mask
        ld = tiling.keyBlock
        scores = .allocate(capacity: rows * ld)
        rowMax = .allocate(capacity: rows)
        rowSum = .allocate(capacity: rows)
    }

    func deallocate() {
        scores.deallocate()
        rowMax.deallocate()
        rowSum.deallocate()
    }

    func process(_ item: WorkItem) {
        let (d, dv, nq, nk) = (p.headDim, p.valueDim, p.queryLength, p.keyLength)
        let span = item.queryEnd - item.queryStart
        let rows = item.headCount * span
        let firstRow = (item.batch * p.queryHeads + item.head) * nq + item.queryStart
        let qBlock = q + firstRow * d
        let oBlock = out + firstRow * dv
        let kvFirstRow = (item.batch * p.keyValueHeads + item.head / p.groupSize) * nk

        // Visible ranges are monotone in i: the union is [lo(first), hi(last)]; every row sees
        // [lo(last), hi(first)], so blocks inside it need no per-element masking.
        let first = p.visibleKeys(forQuery: item.queryStart)
        let last = p.visibleKeys(forQuery: item.queryEnd - 1)
        let hasMask: Bool
        if case .none = mask { hasMask = false } else { hasMask = true }

        oBlock.update(repeating: 0, count: rows * dv)
        rowMax.update(repeating: -.infinity, count: rows)
        rowSum.update(repeating: 0, count: rows)

        // Few rows (decode): streaming loops instead of SGEMM, which would pack whole K/V blocks
        // for a handful of rows; here K and V are read once, each row of them used by every query row.
        let streaming = rows <= Self.streamingRows
        var j0 = first.lo
        while j0 <= last.hi {
            let j1 = min(last.hi + 1, j0 + tiling.keyBlock)
            let width = j1 - j0
            if streaming {
                cpu.dot_scores(rows, width, qBlock, d, k + (kvFirstRow + j0) * d, d, d, p.scale, scores, ld)
            } else {
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(width), Int32(d),
                    p.scale, qBlock, Int32(d), k + (kvFirstRow + j0) * d, Int32(d), 0, scores, Int32(ld))
            }
            if let cap = p.options.softcap { cpu.softcap(scores, ld, rows, width, cap) }
            if hasMask || j0 < last.lo || j1 - 1 > first.hi {
                applyVisibility(item, span: span, rows: rows, keyStart: j0, width: width)
            }
            cpu.softmax_update(scores, ld, rows, width, rowMax, rowSum, oBlock, dv, dv)
            if streaming {
                cpu.accumulate(rows, width, scores, ld, v + (kvFirstRow + j0) * dv, dv, dv, oBlock, dv)
            } else {
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dv), Int32(width),
                    1, scores, Int32(ld), v + (kvFirstRow + j0) * dv, Int32(dv), 1, oBlock, Int32(dv))
            }
            j0 = j1
        }
        cpu.finish(rows, oBlock, dv, dv, rowMax, rowSum, lse.map { $0 + firstRow })
    }

    /// Items with at most this many query rows use the streaming products (K and V read once)
    /// instead of SGEMM, which would pack whole K/V blocks for a handful of rows.
    static let streamingRows = 8

    /// Sets invisible scores to -inf (causal/window bounds of each row) and applies the mask.
    private func applyVisibility(_ item: WorkItem, span: Int, rows: Int, keyStart j0: Int, width: Int) {
        for r in 0..<rows {
            let i = item.queryStart + r % span
            let head = item.head + r / span
            let (lo, hi) = p.visibleKeys(forQuery: i)
            let row = scores + r * ld
            cpu.clip_row(row, width, lo - j0, hi - j0)
            guard let layout = p.maskLayout else { continue }
            let maskRow = layout.offset(batch: item.batch, head: head, row: i) + j0
            switch mask {
            case .none: break
            case .additive(let add): cpu.add_row(row, add + maskRow, width)
            case .boolean(let allowed):
                cpu.select_row(row, UnsafeRawPointer(allowed + maskRow).assumingMemoryBound(to: UInt8.self), width)
            }
        }
    }
}
