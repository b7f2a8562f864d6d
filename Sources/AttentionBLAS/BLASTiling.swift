import AttentionCore
import AttentionMachine

/// Block sizes of the BLAS backend, in one table.
///
/// A work item is a block of `queryRows` query rows (one head, or several whole heads of one GQA
/// group when Nq is short); it walks the keys `keyBlock` at a time. Per worker thread the backend
/// needs `queryRows × roundUp(keyBlock, 16)` floats for the score tile plus 2 floats per row;
/// K and V tiles are read in place. The defaults keep the score tile at or under 256 KiB and one
/// K+V tile well inside a 1 MiB L2, measured best on prefill-2k / causal-2k (D = 64) on Zen.
public struct BLASTiling: Sendable, Equatable, Codable, CustomStringConvertible {
    public var queryRows: Int
    public var keyBlock: Int

    public init(queryRows: Int, keyBlock: Int) {
        self.queryRows = max(1, queryRows)
        self.keyBlock = max(16, (keyBlock + 15) / 16 * 16)
    }

    public var description: String { "\(queryRows)x\(keyBlock)" }

    /// Extra bytes one worker thread allocates.
    public var scratchBytesPerThread: Int { 4 * (queryRows * keyBlock + 2 * queryRows) }

    /// The default tiling for a head dimension pair and rows per item, on a CPU whose per-core L2
    /// holds `l2Bytes` (the key block is capped so that one K tile plus one V tile fill at most half).
    public static func `default`(
        headDim d: Int, valueDim dv: Int, queryLength nq: Int, l2Bytes: Int = CPUInfo.l2CacheBytes
    ) -> BLASTiling {
        let width = max(d, dv)
        // (max head dim, query rows, key block) — first row whose bound holds wins.
        let table: [(maxDim: Int, rows: Int, keys: Int)] = [
            (64, 128, 512),
            (128, 128, 256),
            (256, 64, 256),
            (Int.max, 32, 128),
        ]
        let entry = table.first { width <= $0.maxDim } ?? (Int.max, 32, 128)
        let cacheCap = max(64, l2Bytes / 2 / (4 * (d + dv)))
        // Decode and short queries: few rows, so take longer key blocks to amortise per-call overhead
        // (the score tile stays small).
        let keys = nq * 4 <= entry.rows ? 2048 : entry.keys
        return BLASTiling(queryRows: entry.rows, keyBlock: min(keys, cacheCap))
    }
}
