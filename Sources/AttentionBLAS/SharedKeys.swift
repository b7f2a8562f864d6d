import AttentionCore
import AttentionMachine
import CAttentionCPU

/// Every K/V head's keys packed once per call for the register-tiled products: Kᵀ, widened to
/// fp32, one `[D][ld]` matrix per (batch, K/V head), `ld = round16(Nk) + 16` floats (the columns
/// past Nk are zero, so a product starting at any key may read whole 16-key vectors). Values
/// stored as fp16/bf16 are widened once too (`[Nk][Dv]` fp32 rows per head), so that P·V's
/// micro-kernel, which reads each V row once per six query rows, converts nothing.
///
/// Without it every work item packs the key blocks it reads, so a K/V head's keys are packed once
/// per query block and per query head of its group: 16 times for prefill-2k's 128-row items. With
/// it they are packed once, by all threads, before the items run. It is used when keys would be
/// packed at least twice and the packed copy stays within `limitBytes`; its size counts in
/// `BLASBackend.workspaceBytes(for:)`.
struct SharedKeys: @unchecked Sendable {
    let base: UnsafeMutablePointer<Float>
    /// Floats between two rows of one head's Kᵀ.
    let ld: Int
    let headDim: Int
    let keyValueHeads: Int
    /// Widened values (fp16/bf16 V only), and their row length and key count.
    let values: UnsafeMutablePointer<Float>?
    let valueDim: Int
    let keyLength: Int

    /// Keys packed per work unit of the packing pass.
    static let chunk = 512
    /// The largest packed copy made (beyond it, items pack their own key blocks).
    static let limitBytes = 48 << 20

    /// Floats per row of a head's Kᵀ: whole 16-key vectors plus one of zeros.
    static func rowLength(keys: Int) -> Int { (keys + 15) / 16 * 16 + 16 }

    /// The packed copy's size for `problem` run with `tiling` and the tiled products, or nil when
    /// it is not made (keys packed fewer than two times, few-row items, or over the limit).
    static func bytes(_ problem: AttentionProblem, tiling: BLASTiling) -> Int? {
        let nq = problem.queryLength
        // Per-head items of `queryRows` rows (see `WorkItem.plan`) that use the tiled products.
        guard nq >= tiling.queryRows / 2, min(nq, tiling.queryRows) > TileKernel.streamingRows else { return nil }
        let queryBlocks = (nq + tiling.queryRows - 1) / tiling.queryRows
        guard problem.groupSize * queryBlocks >= 2, problem.keyLength > 0 else { return nil }
        let ld = rowLength(keys: problem.keyLength)
        let heads = problem.batch * problem.keyValueHeads
        var bytes = 4 * heads * problem.headDim * ld
        if problem.storage.keyValue != .f32 { bytes += 4 * heads * problem.keyLength * problem.valueDim }
        return bytes <= limitBytes ? bytes : nil
    }

    /// Packs every head's keys, on `workers` threads.
    init(_ problem: AttentionProblem, _ buffers: AttentionBuffers, _ kernels: CPUKernels, workers: Int) {
        let (d, nk) = (problem.headDim, problem.keyLength)
        ld = Self.rowLength(keys: nk)
        headDim = d
        keyValueHeads = problem.keyValueHeads
        (valueDim, keyLength) = (problem.valueDim, nk)
        let heads = problem.batch * problem.keyValueHeads
        base = .allocate(capacity: heads * d * ld)
        values = problem.storage.keyValue == .f32 ? nil : .allocate(capacity: heads * nk * problem.valueDim)
        let chunks = (nk + Self.chunk - 1) / Self.chunk
        let units = heads * chunks
        let next = WorkCounter()
        let (packed, ld, hkv, chunk) = (self, self.ld, problem.keyValueHeads, Self.chunk)
        WorkerPool.shared.run(workers: min(workers, units)) { _ in
            let cpu = kernels.table.pointee
            let key = Operand(buffers.key, shape: problem.keyShape)
            let value = Operand(buffers.value, shape: problem.valueShape)
            while true {
                let unit = next.value.add(1, ordering: .relaxed).oldValue
                guard unit < units else { break }
                let (head, c) = (unit / chunks, unit % chunks)
                let (b, g) = (head / hkv, head % hkv)
                let j0 = c * chunk
                let width = min(chunk, nk - j0)
                let matrix = packed.base + head * d * ld
                cpu.pack_keys(key.dtype, key.row(b, g, j0), key.strides.sequence, width, d, matrix + j0, ld)
                if let values = packed.values {
                    let dv = packed.valueDim
                    cpu.load_rows(
                        value.dtype, value.row(b, g, j0), value.strides.sequence, width, dv,
                        values + (head * nk + j0) * dv, dv)
                }
                guard c == chunks - 1 else { continue }
                // The columns past the last whole 16 keys: zero (pack_keys zeroed up to round16(Nk)).
                let padding = (nk + 15) / 16 * 16
                for row in 0..<d { (matrix + row * ld + padding).update(repeating: 0, count: ld - padding) }
            }
        }
    }

    /// Kᵀ of K/V head `group` of batch entry `batch`, from key `start` on (rows `ld` apart).
    func keys(batch: Int, group: Int, start: Int) -> UnsafePointer<Float> {
        UnsafePointer(base + (batch * keyValueHeads + group) * headDim * ld + start)
    }

    /// The widened V rows of K/V head `group` of batch entry `batch` from key `start` on (rows Dv
    /// apart), when V is fp16/bf16.
    func values(batch: Int, group: Int, start: Int) -> UnsafeRawPointer? {
        values.map { UnsafeRawPointer($0 + ((batch * keyValueHeads + group) * keyLength + start) * valueDim) }
    }

    func deallocate() {
        base.deallocate()
        values?.deallocate()
    }
}
