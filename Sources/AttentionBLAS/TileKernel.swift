import AttentionCore
import CAttentionCPU
import CBLAS

/// The mask's storage, borrowed for one call (read-only, shared by the worker threads).
enum MaskPointer: @unchecked Sendable {
    case none
    case boolean(UnsafePointer<Bool>)
    case additive(UnsafePointer<Float>)
}

/// One operand as a tile kernel reads or writes it: typed base address and strides.
struct Operand {
    let base: UnsafeMutableRawPointer
    let type: StorageType
    let strides: Strides

    init(_ view: TensorView, shape: [Int]) {
        base = view.address
        type = view.storage
        strides = view.strides(for: shape)
    }

    /// The C kernels' name for the storage type.
    var dtype: Int32 { type.kernelCode }

    /// The address of element (b, h, n, 0).
    func row(_ b: Int, _ h: Int, _ n: Int) -> UnsafeMutableRawPointer {
        base + strides.offset(batch: b, head: h, position: n) * type.byteSize
    }

    /// The stride between the rows of an item (`heads` heads of `span` positions each, in that
    /// order) when it is one uniform stride, else nil.
    func uniformRowStride(heads: Int, span: Int) -> Int? {
        if heads == 1 { return strides.sequence }
        if span == 1 { return strides.head }
        return strides.head == span * strides.sequence ? strides.sequence : nil
    }
}

/// One worker thread's view of a call: borrowed inputs and outputs plus its own tiles.
///
/// The loop structure lives here; every pass over scores, O or K/V rows is a call into the CPU
/// kernel variant chosen at run time (`CPUKernels`), compiled for this machine's instruction set.
/// Dense fp32 rows are used in place (SGEMM leading dimensions are the sequence strides); rows
/// stored as fp16/bf16, or spread over heads irregularly, are converted into fp32 tiles: Q once per
/// item, K and V one key block at a time as they are consumed, O once at the end.
struct TileKernel {
    let p: AttentionProblem
    let tiling: BLASTiling
    let cpu: ak_cpu_kernels
    let q: Operand, k: Operand, v: Operand, o: Operand
    let lse: UnsafeMutablePointer<Float>?
    let mask: MaskPointer
    /// Row stride of the score tile: the key block, a multiple of 16 floats (whole kernel vectors).
    let ld: Int
    let scores: UnsafeMutablePointer<Float>
    let rowMax: UnsafeMutablePointer<Float>
    let rowSum: UnsafeMutablePointer<Float>
    /// fp32 tiles of the item's Q and O rows, for operands that cannot be used in place, and (only
    /// when K/V are fp16/bf16) of one converted K and V block.
    let qTile: UnsafeMutablePointer<Float>
    let oTile: UnsafeMutablePointer<Float>
    let kTile: UnsafeMutablePointer<Float>?
    let vTile: UnsafeMutablePointer<Float>?
    /// With the register-tiled products: the key block transposed ([D][keyBlock]), and the item's
    /// query rows packed for the score product (`pack_queries`).
    let keysTransposed: UnsafeMutablePointer<Float>?
    let queriesPacked: UnsafeMutablePointer<Float>?
    /// Every head's keys packed once for the call (the tiled products read them instead of
    /// packing each block).
    let sharedKeys: SharedKeys?

    init(
        problem: AttentionProblem, tiling: BLASTiling, kernels: CPUKernels, maxRows rows: Int,
        buffers: AttentionBuffers, mask: MaskPointer, tiledProducts: Bool, sharedKeys: SharedKeys? = nil
    ) {
        self.sharedKeys = tiledProducts ? sharedKeys : nil
        p = problem
        self.tiling = tiling
        cpu = kernels.table.pointee
        q = Operand(buffers.query, shape: problem.queryShape)
        k = Operand(buffers.key, shape: problem.keyShape)
        v = Operand(buffers.value, shape: problem.valueShape)
        o = Operand(buffers.output, shape: problem.outputShape)
        lse = buffers.logSumExp?.baseAddress
        self.mask = mask
        ld = tiling.keyBlock
        scores = .allocate(capacity: rows * ld)
        rowMax = .allocate(capacity: rows)
        rowSum = .allocate(capacity: rows)
        qTile = .allocate(capacity: rows * problem.headDim)
        oTile = .allocate(capacity: rows * problem.valueDim)
        // SGEMM reads K/V blocks in place only when they are fp32 with rows at least a row apart and
        // a leading dimension it can take (32-bit).
        let kInPlace = k.type == .f32 && (problem.headDim...Self.sgemmLimit).contains(k.strides.sequence)
        let vInPlace = v.type == .f32 && (problem.valueDim...Self.sgemmLimit).contains(v.strides.sequence)
        if tiledProducts {
            // K is packed (transposed, widened) by the tiled products themselves, V rows are read
            // and widened where they lie.
            keysTransposed = .allocate(capacity: tiling.keyBlock * problem.headDim)
            queriesPacked = .allocate(capacity: rows * problem.headDim)
            kTile = nil
            vTile = nil
        } else {
            keysTransposed = nil
            queriesPacked = nil
            kTile = kInPlace && vInPlace ? nil : .allocate(capacity: tiling.keyBlock * problem.headDim)
            vTile = kInPlace && vInPlace ? nil : .allocate(capacity: tiling.keyBlock * problem.valueDim)
        }
    }

    func deallocate() {
        for tile in [scores, rowMax, rowSum, qTile, oTile] { tile.deallocate() }
        kTile?.deallocate()
        vTile?.deallocate()
        keysTransposed?.deallocate()
        queriesPacked?.deallocate()
    }

    /// Extra bytes one worker allocates beyond the score tile and row statistics.
    static func tileBytes(_ p: AttentionProblem, rows: Int, keyBlock: Int, tiledProducts: Bool) -> Int {
        var floats = rows * (p.headDim + p.valueDim)
        if tiledProducts {
            floats += keyBlock * p.headDim + rows * p.headDim
        } else if p.storage.keyValue != .f32 {
            floats += keyBlock * (p.headDim + p.valueDim)
        }
        return 4 * floats
    }

    /// Where the rows of one item live: a pointer and row stride for Q and O (in place, or a tile).
    private struct ItemRows {
        var q: UnsafePointer<Float>, ldq: Int
        var o: UnsafeMutablePointer<Float>, ldo: Int
        var oInPlace: Bool
    }

    /// The item's Q rows where they lie, with their stride, when they are fp32 and one stride apart
    /// (at least a row: SGEMM refuses shorter leading dimensions); nil when they must be gathered.
    func queryRowsInPlace(of item: WorkItem) -> (UnsafePointer<Float>, Int)? {
        let span = item.queryEnd - item.queryStart
        guard q.type == .f32, let ldq = q.uniformRowStride(heads: item.headCount, span: span),
            (p.headDim...Self.sgemmLimit).contains(ldq)
        else { return nil }
        return (UnsafePointer(q.row(item.batch, item.head, item.queryStart).assumingMemoryBound(to: Float.self)), ldq)
    }

    /// The item's Q rows widened into `tile` (rows `headDim` apart).
    func gatherQueryRows(of item: WorkItem, into tile: UnsafeMutablePointer<Float>) -> (UnsafePointer<Float>, Int) {
        let (d, span) = (p.headDim, item.queryEnd - item.queryStart)
        for hh in 0..<item.headCount {
            cpu.load_rows(
                q.dtype, q.row(item.batch, item.head + hh, item.queryStart), q.strides.sequence, span, d,
                tile + hh * span * d, d)
        }
        return (UnsafePointer(tile), d)
    }

    /// Q rows of the item in fp32 (in place when they can be), and where O accumulates.
    private func rows(of item: WorkItem, span: Int) -> ItemRows {
        let dv = p.valueDim
        let (b, h, start) = (item.batch, item.head, item.queryStart)
        let (query, ldq) = queryRowsInPlace(of: item) ?? gatherQueryRows(of: item, into: qTile)
        var result = ItemRows(q: query, ldq: ldq, o: oTile, ldo: dv, oInPlace: false)
        if o.type == .f32, let ldo = o.uniformRowStride(heads: item.headCount, span: span),
            (dv...Self.sgemmLimit).contains(ldo)
        {
            result.o = o.row(b, h, start).assumingMemoryBound(to: Float.self)
            result.ldo = ldo
            result.oInPlace = true
        }
        return result
    }

    /// K and V rows [j0, j0 + width) of K/V head `g` in fp32 (in place when they are fp32).
    private func keyValueBlock(
        batch b: Int, group g: Int, start j0: Int, width: Int
    ) -> (k: UnsafePointer<Float>, ldk: Int, v: UnsafePointer<Float>, ldv: Int) {
        let (d, dv) = (p.headDim, p.valueDim)
        let kRows = k.row(b, g, j0)
        let vRows = v.row(b, g, j0)
        guard let kTile, let vTile else {
            return (
                UnsafePointer(kRows.assumingMemoryBound(to: Float.self)), k.strides.sequence,
                UnsafePointer(vRows.assumingMemoryBound(to: Float.self)), v.strides.sequence
            )
        }
        cpu.load_rows(k.dtype, kRows, k.strides.sequence, width, d, kTile, d)
        cpu.load_rows(v.dtype, vRows, v.strides.sequence, width, dv, vTile, dv)
        return (UnsafePointer(kTile), d, UnsafePointer(vTile), dv)
    }

    func process(_ item: WorkItem) {
        let (d, dv, nq) = (p.headDim, p.valueDim, p.queryLength)
        let span = item.queryEnd - item.queryStart
        let rowCount = item.headCount * span
        let firstRow = (item.batch * p.queryHeads + item.head) * nq + item.queryStart
        let group = item.head / p.groupSize
        let r = rows(of: item, span: span)

        // Visible ranges are monotone in i: the union is [lo(first), hi(last)]; every row sees
        // [lo(last), hi(first)], so blocks inside it need no per-element masking.
        let first = p.visibleKeys(forQuery: item.queryStart)
        let last = p.visibleKeys(forQuery: item.queryEnd - 1)
        let hasMask: Bool
        if case .none = mask { hasMask = false } else { hasMask = true }

        for row in 0..<rowCount { (r.o + row * r.ldo).update(repeating: 0, count: dv) }
        rowMax.update(repeating: -.infinity, count: rowCount)
        rowSum.update(repeating: 0, count: rowCount)

        // Few rows (decode): streaming loops instead of the tiled products or SGEMM, which pack whole
        // K/V blocks for a handful of rows; here K and V are read once, each row of them used by every
        // query row, widened in registers as they pass.
        let products: BlockProducts
        if rowCount <= Self.streamingRows {
            products = .streaming
        } else if let keysTransposed, let queriesPacked {
            cpu.pack_queries(rowCount, d, r.q, r.ldq, queriesPacked)
            products = .tiled(keys: keysTransposed, queries: queriesPacked)
        } else {
            products = .sgemm
        }
        var j0 = first.lo
        while j0 <= last.hi {
            let j1 = min(last.hi + 1, j0 + tiling.keyBlock)
            let width = j1 - j0
            let kRows = k.row(item.batch, group, j0)
            let vRows = v.row(item.batch, group, j0)
            let needsVisibility = hasMask || j0 < last.lo || j1 - 1 > first.hi
            switch products {
            case .tiled(let tile, let queries):
                // K packed for the call (shared by every item), or here once per block.
                let (kt, ldk): (UnsafePointer<Float>, Int)
                if let sharedKeys {
                    (kt, ldk) = (sharedKeys.keys(batch: item.batch, group: group, start: j0), sharedKeys.ld)
                } else {
                    cpu.pack_keys(k.dtype, kRows, k.strides.sequence, width, d, tile, tiling.keyBlock)
                    (kt, ldk) = (UnsafePointer(tile), tiling.keyBlock)
                }
                cpu.qk_tile(rowCount, width, d, queries, kt, ldk, p.scale, scores, ld)
                prepareScores(
                    item, span: span, rows: rowCount, keyStart: j0, width: width, visibility: needsVisibility)
                cpu.softmax_update(scores, ld, rowCount, width, rowMax, rowSum, r.o, r.ldo, dv)
                if let widened = sharedKeys?.values(batch: item.batch, group: group, start: j0) {
                    cpu.pv_tile(rowCount, width, scores, ld, StorageType.f32.kernelCode, widened, dv, dv, r.o, r.ldo)
                } else {
                    cpu.pv_tile(rowCount, width, scores, ld, v.dtype, vRows, v.strides.sequence, dv, r.o, r.ldo)
                }
            case .sgemm:
                // SGEMM needs fp32 rows (converted K and V blocks unless they are fp32 in place).
                let block = keyValueBlock(batch: item.batch, group: group, start: j0, width: width)
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rowCount), Int32(width), Int32(d),
                    p.scale, r.q, Int32(r.ldq), block.k, Int32(block.ldk), 0, scores, Int32(ld))
                prepareScores(
                    item, span: span, rows: rowCount, keyStart: j0, width: width, visibility: needsVisibility)
                cpu.softmax_update(scores, ld, rowCount, width, rowMax, rowSum, r.o, r.ldo, dv)
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rowCount), Int32(dv), Int32(width),
                    1, scores, Int32(ld), block.v, Int32(block.ldv), 1, r.o, Int32(r.ldo))
            case .streaming:
                cpu.dot_scores(
                    rowCount, width, r.q, r.ldq, k.dtype, kRows, k.strides.sequence, d, p.scale, scores, ld)
                prepareScores(
                    item, span: span, rows: rowCount, keyStart: j0, width: width, visibility: needsVisibility)
                cpu.softmax_update(scores, ld, rowCount, width, rowMax, rowSum, r.o, r.ldo, dv)
                cpu.accumulate(rowCount, width, scores, ld, v.dtype, vRows, v.strides.sequence, dv, r.o, r.ldo)
            }
            j0 = j1
        }
        cpu.finish(rowCount, r.o, r.ldo, dv, rowMax, rowSum, lse.map { $0 + firstRow })
        guard !r.oInPlace else { return }
        for hh in 0..<item.headCount {
            let out = o.row(item.batch, item.head + hh, item.queryStart)
            cpu.store_rows(o.dtype, r.o + hh * span * dv, dv, span, dv, out, o.strides.sequence)
        }
    }

    /// The largest leading dimension SGEMM takes (a 32-bit int): rows farther apart are gathered
    /// into tiles (found by FuzzValidation: a huge V stride with Nk = 1 trapped in `Int32(ldv)`).
    static let sgemmLimit = Int(Int32.max)

    /// How an item computes S = Q Kᵀ and O += P V for each key block.
    private enum BlockProducts {
        /// The CPU variant's register-tiled kernels: K packed into this [D][keyBlock] tile (unless
        /// shared), the item's queries packed once.
        case tiled(keys: UnsafeMutablePointer<Float>, queries: UnsafePointer<Float>)
        /// Two `cblas_sgemm` calls.
        case sgemm
        /// Few rows: the streaming kernels (K and V read once, as stored).
        case streaming
    }

    /// Items with at most this many query rows use the streaming products (K and V read once)
    /// instead of SGEMM, which would pack whole K/V blocks for a handful of rows.
    static let streamingRows = 8

    /// Softcap, then (when `visibility`) the causal/window bounds of each row and the mask, on the
    /// first `rows` rows of `tile` (by default the score tile).
    func prepareScores(
        _ item: WorkItem, span: Int, rows: Int, keyStart j0: Int, width: Int, visibility: Bool,
        tile: UnsafeMutablePointer<Float>? = nil
    ) {
        let scores = tile ?? self.scores
        if let cap = p.options.softcap { cpu.softcap(scores, ld, rows, width, cap) }
        guard visibility else { return }
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
