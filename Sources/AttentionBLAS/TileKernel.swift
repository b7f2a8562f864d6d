import AttentionCore
import CBLAS
import Foundation

/// The mask's storage, borrowed for one call (read-only, shared by the worker threads).
enum MaskPointer: @unchecked Sendable {
    case none
    case boolean(UnsafePointer<Bool>)
    case additive(UnsafePointer<Float>)
}

/// One worker thread's view of a call: borrowed inputs and outputs plus its own score tile.
struct TileKernel {
    let p: AttentionProblem
    let tiling: BLASTiling
    let q: UnsafePointer<Float>
    let k: UnsafePointer<Float>
    let v: UnsafePointer<Float>
    let out: UnsafeMutablePointer<Float>
    let lse: UnsafeMutablePointer<Float>?
    let mask: MaskPointer
    /// Row stride of the score tile: the key block rounded up to whole SIMD16 vectors.
    let ld: Int
    let scores: UnsafeMutablePointer<Float>
    let rowMax: UnsafeMutablePointer<Float>
    let rowSum: UnsafeMutablePointer<Float>

    init(problem: AttentionProblem, tiling: BLASTiling, maxRows rows: Int, buffers: AttentionBuffers, mask: MaskPointer) {
        p = problem
        self.tiling = tiling
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
                streamScores(rows: rows, width: width, q: qBlock, k: k + (kvFirstRow + j0) * d)
            } else {
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(width), Int32(d),
                    p.scale, qBlock, Int32(d), k + (kvFirstRow + j0) * d, Int32(d), 0, scores, Int32(ld))
            }
            let paddedWidth = (width + 15) & ~15
            if let cap = p.options.softcap { applySoftcap(cap, rows: rows, width: paddedWidth) }
            for r in 0..<rows {
                let row = scores + r * ld
                for c in width..<paddedWidth { row[c] = -.infinity }
            }
            if hasMask || j0 < last.lo || j1 - 1 > first.hi {
                applyVisibility(item, span: span, rows: rows, keyStart: j0, width: width)
            }
            updateSoftmax(rows: rows, width: paddedWidth, outBlock: oBlock)
            if streaming {
                streamAccumulate(rows: rows, width: width, v: v + (kvFirstRow + j0) * dv, out: oBlock)
            } else {
                cblas_sgemm(
                    CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), Int32(dv), Int32(width),
                    1, scores, Int32(ld), v + (kvFirstRow + j0) * dv, Int32(dv), 1, oBlock, Int32(dv))
            }
            j0 = j1
        }
        finish(rows: rows, outBlock: oBlock, lseBlock: lse.map { $0 + firstRow })
    }

    // MARK: Few-row (decode) products

    /// Items with at most this many query rows use the streaming products.
    static let streamingRows = 8

    /// S[r][j] = scale * (q_r . k_j) for j < width: one pass over the K rows.
    private func streamScores(rows: Int, width: Int, q: UnsafePointer<Float>, k: UnsafePointer<Float>) {
        let d = p.headDim
        let vectorEnd = d & ~15
        for j in 0..<width {
            let kRow = k + j * d
            let kRaw = UnsafeRawPointer(kRow)
            for r in 0..<rows {
                let qRow = q + r * d
                let qRaw = UnsafeRawPointer(qRow)
                var acc = SIMD16<Float>()
                var c = 0
                while c < vectorEnd {
                    acc = acc.addingProduct(qRaw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self),
                                            kRaw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self))
                    c += 16
                }
                var dot = horizontalSum(acc)
                while c < d { dot += qRow[c] * kRow[c]; c += 1 }
                scores[r * ld + j] = dot * p.scale
            }
        }
    }

    /// O[r] += sum over j < width of P[r][j] * v_j, four keys at a time so that each output
    /// vector is loaded and stored once per four keys.
    private func streamAccumulate(rows: Int, width: Int, v: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>) {
        let dv = p.valueDim
        let vectorEnd = dv & ~15
        var j = 0
        while j + 4 <= width {
            let (v0, v1, v2, v3) = (v + j * dv, v + (j + 1) * dv, v + (j + 2) * dv, v + (j + 3) * dv)
            let (r0, r1, r2, r3) = (UnsafeRawPointer(v0), UnsafeRawPointer(v1), UnsafeRawPointer(v2), UnsafeRawPointer(v3))
            for r in 0..<rows {
                let pRow = scores + r * ld + j
                let (p0, p1, p2, p3) = (pRow[0], pRow[1], pRow[2], pRow[3])
                let oRow = out + r * dv
                let oRaw = UnsafeMutableRawPointer(oRow)
                var c = 0
                while c < vectorEnd {
                    let offset = c * 4
                    var o = oRaw.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
                    o = o.addingProduct(SIMD16(repeating: p0), r0.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self))
                    o = o.addingProduct(SIMD16(repeating: p1), r1.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self))
                    o = o.addingProduct(SIMD16(repeating: p2), r2.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self))
                    o = o.addingProduct(SIMD16(repeating: p3), r3.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self))
                    oRaw.storeBytes(of: o, toByteOffset: offset, as: SIMD16<Float>.self)
                    c += 16
                }
                while c < dv {
                    oRow[c] += p0 * v0[c] + p1 * v1[c] + p2 * v2[c] + p3 * v3[c]
                    c += 1
                }
            }
            j += 4
        }
        while j < width {
            let vRow = v + j * dv
            let vRaw = UnsafeRawPointer(vRow)
            for r in 0..<rows {
                let weight = scores[r * ld + j]
                let oRow = out + r * dv
                let oRaw = UnsafeMutableRawPointer(oRow)
                var c = 0
                while c < vectorEnd {
                    let offset = c * 4
                    let o = oRaw.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self)
                        .addingProduct(SIMD16(repeating: weight), vRaw.loadUnaligned(fromByteOffset: offset, as: SIMD16<Float>.self))
                    oRaw.storeBytes(of: o, toByteOffset: offset, as: SIMD16<Float>.self)
                    c += 16
                }
                while c < dv { oRow[c] += weight * vRow[c]; c += 1 }
            }
            j += 1
        }
    }

    // MARK: Score transforms

    private func applySoftcap(_ cap: Float, rows: Int, width: Int) {
        let inverse = 1 / cap
        for r in 0..<rows {
            let row = UnsafeMutableRawPointer(scores + r * ld)
            for c in stride(from: 0, to: width, by: 16) {
                let s = row.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
                row.storeBytes(of: cap * fastTanh(s * inverse), toByteOffset: c * 4, as: SIMD16<Float>.self)
            }
        }
    }

    /// Sets invisible scores to -inf (causal/window bounds of each row) and applies the mask.
    private func applyVisibility(_ item: WorkItem, span: Int, rows: Int, keyStart j0: Int, width: Int) {
        let lanes = SIMD16<Int32>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        let minusInf = SIMD16<Float>(repeating: -.infinity)
        for r in 0..<rows {
            let i = item.queryStart + r % span
            let head = item.head + r / span
            let (lo, hi) = p.visibleKeys(forQuery: i)
            let row = scores + r * ld
            let raw = UnsafeMutableRawPointer(row)
            // Bounds as offsets into this block; Int32 is safe since |offsets| <= Nk + window.
            let loOff = SIMD16<Int32>(repeating: Int32(clamping: lo - j0))
            let hiOff = SIMD16<Int32>(repeating: Int32(clamping: hi - j0))
            var c = 0
            while c < width {
                let idx = lanes &+ Int32(c)
                var s = raw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
                s.replace(with: minusInf, where: (idx .< loOff) .| (idx .> hiOff))
                raw.storeBytes(of: s, toByteOffset: c * 4, as: SIMD16<Float>.self)
                c += 16
            }
            guard let layout = p.maskLayout else { continue }
            let maskRow = layout.offset(batch: item.batch, head: head, row: i) + j0
            switch mask {
            case .none:
                break
            case let .additive(add):
                let src = add + maskRow
                var c = 0
                while c + 16 <= width {
                    let m = UnsafeRawPointer(src).loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
                    let s = raw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
                    raw.storeBytes(of: s + m, toByteOffset: c * 4, as: SIMD16<Float>.self)
                    c += 16
                }
                while c < width { row[c] += src[c]; c += 1 }
            case let .boolean(allowed):
                let src = UnsafeRawPointer(allowed + maskRow)
                var c = 0
                while c + 16 <= width {
                    let m = src.loadUnaligned(fromByteOffset: c, as: SIMD16<UInt8>.self)
                    var s = raw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
                    s.replace(with: minusInf, where: SIMD16<Int32>(truncatingIfNeeded: m) .== 0)
                    raw.storeBytes(of: s, toByteOffset: c * 4, as: SIMD16<Float>.self)
                    c += 16
                }
                while c < width {
                    if src.load(fromByteOffset: c, as: UInt8.self) == 0 { row[c] = -.infinity }
                    c += 1
                }
            }
        }
    }

    // MARK: Online softmax

    /// For each row: new running max, rescale of O and the running sum, P = exp(S - m) in place.
    private func updateSoftmax(rows: Int, width: Int, outBlock: UnsafeMutablePointer<Float>) {
        let dv = p.valueDim
        for r in 0..<rows {
            let row = UnsafeMutableRawPointer(scores + r * ld)
            var vmax = SIMD16<Float>(repeating: -.infinity)
            for c in stride(from: 0, to: width, by: 16) {
                vmax = laneMax(vmax, row.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self))
            }
            let old = rowMax[r]
            let blockMax = horizontalMax(vmax)
            let new = blockMax > old ? blockMax : old
            if new == -.infinity {
                // Nothing visible yet. A NaN score hidden behind -inf maxima must still poison the row.
                let s = scores + r * ld
                if (0..<width).contains(where: { s[$0].isNaN }) { rowSum[r] = .nan }
                (scores + r * ld).update(repeating: 0, count: width)
                continue
            }
            if old != new && old != -.infinity {
                let alpha = exp(old - new)
                rowSum[r] *= alpha
                scaleRow(outBlock + r * dv, count: dv, by: alpha)
            }
            rowMax[r] = new
            let m = SIMD16<Float>(repeating: new)
            var sum = SIMD16<Float>()
            for c in stride(from: 0, to: width, by: 16) {
                let e = fastExp(row.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self) - m)
                sum += e
                row.storeBytes(of: e, toByteOffset: c * 4, as: SIMD16<Float>.self)
            }
            rowSum[r] += horizontalSum(sum)
        }
    }

    private func finish(rows: Int, outBlock: UnsafeMutablePointer<Float>, lseBlock: UnsafeMutablePointer<Float>?) {
        let dv = p.valueDim
        for r in 0..<rows {
            let m = rowMax[r]
            let l = rowSum[r]
            let o = outBlock + r * dv
            if m == -.infinity && !l.isNaN {
                // No visible key: exactly zero output and -inf log-sum-exp.
                o.update(repeating: 0, count: dv)
                lseBlock?[r] = -.infinity
            } else if m == -.infinity {
                o.update(repeating: .nan, count: dv)
                lseBlock?[r] = .nan
            } else {
                scaleRow(o, count: dv, by: 1 / l)
                lseBlock?[r] = m + log(l)
            }
        }
    }

    @inline(__always)
    private func scaleRow(_ row: UnsafeMutablePointer<Float>, count: Int, by factor: Float) {
        let raw = UnsafeMutableRawPointer(row)
        var c = 0
        while c + 16 <= count {
            let x = raw.loadUnaligned(fromByteOffset: c * 4, as: SIMD16<Float>.self)
            raw.storeBytes(of: x * factor, toByteOffset: c * 4, as: SIMD16<Float>.self)
            c += 16
        }
        while c < count { row[c] *= factor; c += 1 }
    }
}
