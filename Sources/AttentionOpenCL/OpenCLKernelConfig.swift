import AttentionCore

/// Compile-time shape of the kernels on one device: from a table by device kind and head dimensions
/// (`default(for:headDim:valueDim:)`), or measured by `attnbench tune`.
public struct OpenCLKernelConfig: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Keys per step, the float vector width (VEC): 4, 8 or 16.
    public var vectorWidth: Int
    /// Query rows per work-item in the flash kernel (ROWS).
    public var rows: Int
    /// Work-items per work-group in the flash kernel.
    public var workGroup: Int
    /// Stage K/V tiles in local memory (GPUs); CPUs read through their caches.
    public var useLocalMemory: Bool
    /// Most query rows per K/V head (G·Nq) the split-KV decode kernel takes.
    public var decodeRows: Int
    /// Fewest keys a decode split gets.
    public var minKeysPerSplit: Int
    /// The FlashAttention-2-shaped kernel's tiles for prefill and general problems (`Kernels/tiled.cl`);
    /// nil runs the CPU-shaped kernels above (vectorWidth, rows, workGroup, useLocalMemory).
    public var tiles: GPUTiles?
    /// Its tiles for decode-shaped problems (at most `decodeRows` query rows per K/V head), whose
    /// keys are split across work-groups; nil uses `tiles`.
    public var decodeTiles: GPUTiles?

    public init(
        vectorWidth: Int, rows: Int, workGroup: Int, useLocalMemory: Bool, decodeRows: Int, minKeysPerSplit: Int,
        tiles: GPUTiles? = nil, decodeTiles: GPUTiles? = nil
    ) {
        self.vectorWidth = vectorWidth
        self.rows = rows
        self.workGroup = workGroup
        self.useLocalMemory = useLocalMemory
        self.decodeRows = decodeRows
        self.minKeysPerSplit = minKeysPerSplit
        self.tiles = tiles
        self.decodeTiles = decodeTiles
    }

    /// Profiles written before the tiled kernel existed have no tiles: they decode as CPU-shaped.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        self.init(
            vectorWidth: try c.decode(Int.self, forKey: .vectorWidth), rows: try c.decode(Int.self, forKey: .rows),
            workGroup: try c.decode(Int.self, forKey: .workGroup),
            useLocalMemory: try c.decode(Bool.self, forKey: .useLocalMemory),
            decodeRows: try c.decode(Int.self, forKey: .decodeRows),
            minKeysPerSplit: try c.decode(Int.self, forKey: .minKeysPerSplit),
            tiles: try c.decodeIfPresent(GPUTiles.self, forKey: .tiles),
            decodeTiles: try c.decodeIfPresent(GPUTiles.self, forKey: .decodeTiles))
    }

    public var description: String {
        if let tiles {
            return
                "tiled \(tiles), decode \(decodeTiles ?? tiles) <=\(decodeRows) rows, >=\(minKeysPerSplit) keys/split"
        }
        return "VEC=\(vectorWidth) ROWS=\(rows) WG=\(workGroup)\(useLocalMemory ? " local" : "") "
            + "decode<=\(decodeRows) rows, >=\(minKeysPerSplit) keys/split"
    }

    /// The table. CPUs (PoCL): 16-wide vectors, several rows per work-item for reuse, no local
    /// memory. GPUs: the tiled kernel with tiles from `GPUTiles.table` (vendor, local memory, work-group
    /// limit); where no tile fits the device's local memory, the CPU-shaped kernels with 4-wide
    /// vectors, 64 work-items per group, K/V tiles in local memory when they fit in half of it.
    public static func `default`(for device: OpenCLDeviceInfo, headDim d: Int, valueDim dv: Int) -> OpenCLKernelConfig {
        if device.isGPU { return gpu(GPUTiles.GPU(device), headDim: d, valueDim: dv) }
        return OpenCLKernelConfig(
            vectorWidth: 16, rows: 4, workGroup: max(1, min(4, device.maxWorkGroupSize)),
            useLocalMemory: false, decodeRows: 8, minKeysPerSplit: 256)
    }

    /// The GPU configuration for a GPU's facts (the table's tiles; CPU-shaped kernels with 4-wide
    /// vectors where no tile fits).
    public static func gpu(_ gpu: GPUTiles.GPU, headDim d: Int, valueDim dv: Int) -> OpenCLKernelConfig {
        let vec = 4
        let tileBytes = 4 * vec * (d + dv)
        return OpenCLKernelConfig(
            vectorWidth: vec, rows: 2, workGroup: max(1, min(64, gpu.maxWorkGroupSize)),
            useLocalMemory: tileBytes * 2 <= gpu.localMemoryBytes, decodeRows: 8, minKeysPerSplit: 128,
            tiles: GPUTiles.table(gpu, headDim: d, valueDim: dv),
            decodeTiles: GPUTiles.table(gpu, headDim: d, valueDim: dv, decodeRows: 8))
    }

    /// The float vector widths the kernels take (VEC).
    public static let vectorWidths = [4, 8, 16]

    /// The largest `flashKeyBlock` of any configuration: the widest vectors, read through the caches.
    static var largestFlashKeyBlock: Int {
        (vectorWidths.max() ?? 16) * OpenCLKernelConfig.keyVectors(useLocalMemory: false)
    }

    /// Score vectors per step of the flash kernel (KBV): 4 when K/V are read through the caches, so
    /// that the online softmax's reductions and O's rescaling, loads and stores come once per 4·VEC
    /// keys (PoCL prefill-2k: 80-85 ms with one vector per step); 1 when tiles are staged in local memory.
    var flashKeyVectors: Int { Self.keyVectors(useLocalMemory: useLocalMemory) }

    private static func keyVectors(useLocalMemory: Bool) -> Int { useLocalMemory ? 1 : 4 }

    /// Keys per step of the flash kernel: its re-laid K is padded to a multiple of this.
    var flashKeyBlock: Int { vectorWidth * flashKeyVectors }

    /// Build options of the flash program.
    var flashOptions: String {
        "-cl-std=CL1.2 -cl-mad-enable -w -DVEC=\(vectorWidth) -DROWS=\(rows) -DKBV=\(flashKeyVectors) "
            + "-DUSE_LOCAL=\(useLocalMemory ? 1 : 0) -DKV_SPACE=\(useLocalMemory ? "__local" : "__global")"
    }

    /// Build options of the decode program for `rows` query rows per K/V head (ROWS is the next
    /// power of two, so a handful of variants cover every problem). On CPU devices the kernel
    /// prefetches K/V rows ahead (`CPU_PREFETCH`: Clang's `__builtin_prefetch`, which PoCL compiles
    /// to prefetch instructions; OpenCL's own `prefetch` is a no-op there).
    func decodeOptions(rows: Int, cpuDevice: Bool) -> String {
        var compiled = 1
        while compiled < rows { compiled *= 2 }
        return "-cl-std=CL1.2 -cl-mad-enable -w -DVEC=\(vectorWidth) -DROWS=\(compiled) -DKV_SPACE=__global"
            + (cpuDevice ? " -DCPU_PREFETCH=1" : "")
    }
}

/// Which kernel runs a problem, and why.
public enum OpenCLKernelChoice: Sendable, Equatable, CustomStringConvertible {
    /// The tiled flash kernel over a device-transposed K.
    case flash
    /// Flash-decoding: `splits` work-items per K/V head, each over `keysPerSplit` keys, then an exact merge.
    case splitKV(splits: Int, keysPerSplit: Int)
    /// The FlashAttention-2-shaped kernel (GPUs).
    case tiled(TiledLaunch)

    /// Work-groups (or items) across each row's keys, whose partial results are merged: 1 when none are.
    public var keySplits: Int {
        switch self {
        case .flash: return 1
        case .splitKV(let splits, _): return splits
        case .tiled(let launch): return launch.splits
        }
    }

    public var description: String {
        switch self {
        case .flash: return "flash"
        case .splitKV(let splits, let keys): return "split-KV decode (\(splits) splits x \(keys) keys)"
        case .tiled(let launch): return launch.description
        }
    }
}

/// One launch of the tiled kernel: its tiles, how rows are grouped, how keys are split.
public struct TiledLaunch: Sendable, Equatable, CustomStringConvertible {
    public var tiles: GPUTiles
    /// Heads whose rows share a work-group's K/V tiles: 1, or the GQA group size for short queries.
    public var headsPerUnit: Int
    /// Work-groups across the keys of each row block (1: no split, no merge).
    public var splits: Int
    public var keysPerSplit: Int

    public var description: String {
        "tiled flash (\(tiles)\(headsPerUnit > 1 ? ", \(headsPerUnit) heads per group" : "")"
            + (splits > 1 ? ", keys split \(splits) x \(keysPerSplit))" : ")")
    }
}

/// Tile shape of the FlashAttention-2-shaped kernel (`Kernels/tiled.cl`): a work-group of
/// `workGroup` items owns `rows` query rows and walks keys `keys` at a time; `rowThreads` items share
/// each row (its scores and value columns), so each item holds rows / (workGroup / rowThreads) rows.
public struct GPUTiles: Sendable, Hashable, Codable, CustomStringConvertible {
    /// Query rows per work-group (BR).
    public var rows: Int
    /// Keys per tile (BC).
    public var keys: Int
    /// Work-items across one row (TX).
    public var rowThreads: Int
    /// Work-items per work-group (WG).
    public var workGroup: Int
    /// Row reductions by `cl_intel_subgroups` shuffles (a sub-group of exactly `rowThreads` items,
    /// pinned by `cl_intel_required_subgroup_size`) instead of local memory; only where the device
    /// lists both extensions (`GPUTiles.subgroupExtensions`).
    public var subgroups: Bool

    public init(rows: Int, keys: Int, rowThreads: Int, workGroup: Int, subgroups: Bool = false) {
        (self.rows, self.keys, self.rowThreads, self.workGroup, self.subgroups) =
            (rows, keys, rowThreads, workGroup, subgroups)
    }

    public var description: String {
        "Br \(rows) x Bc \(keys), \(workGroup) items, \(rowThreads) per row\(subgroups ? ", sub-groups" : "")"
    }

    /// Why the shape cannot run (nil when it can): every count positive, the items split evenly into
    /// rows and keys.
    public var problem: String? {
        guard rows > 0, keys > 0, rowThreads > 0, workGroup > 0 else { return "tile sizes must be positive" }
        guard workGroup % rowThreads == 0 else { return "\(workGroup) items do not split into rows of \(rowThreads)" }
        let rowGroups = workGroup / rowThreads
        guard rows % rowGroups == 0 else { return "\(rows) rows do not split over \(rowGroups) row groups" }
        guard keys % rowThreads == 0 else { return "\(keys) keys do not split over \(rowThreads) items" }
        return nil
    }

    /// Local memory of one work-group: the scaled Q tile, the K^T/V tile, P and the row reductions.
    public func localBytes(headDim d: Int, valueDim dv: Int) -> Int {
        4 * (d * rows + max(d * (keys + 1), keys * dv) + rows * keys + rows * rowThreads)
    }

    /// Value columns the accumulators hold: rowThreads times a power of two, >= Dv and >= 64 (so that
    /// all small Dv share one program).
    func valueCapacity(_ dv: Int) -> Int {
        var cap = rowThreads
        while cap < max(dv, 64) { cap *= 2 }
        return cap
    }

    /// Build options of the tiled program.
    func options(valueDim dv: Int) -> String {
        "-cl-std=CL1.2 -cl-mad-enable -w -DBR=\(rows) -DBC=\(keys) -DTX=\(rowThreads) -DWG=\(workGroup) "
            + "-DDVCAP=\(valueCapacity(dv)) -DSUBGROUPS=\(subgroups ? 1 : 0)"
    }

    /// The extensions the sub-group reductions need: the shuffles, and the attribute that pins the
    /// sub-group size to one row's items.
    public static let subgroupExtensions = ["cl_intel_subgroups", "cl_intel_required_subgroup_size"]

    /// The facts of a GPU the table reads.
    public struct GPU: Sendable, Equatable {
        public var vendor: String
        public var localMemoryBytes: Int
        public var maxWorkGroupSize: Int
        public var computeUnits: Int
        public var extensions: [String]

        public init(
            vendor: String, localMemoryBytes: Int, maxWorkGroupSize: Int, computeUnits: Int, extensions: [String]
        ) {
            (self.vendor, self.localMemoryBytes, self.maxWorkGroupSize, self.computeUnits, self.extensions) =
                (vendor, localMemoryBytes, maxWorkGroupSize, computeUnits, extensions)
        }

        /// A typical GPU of `vendor` as the table sees it (NVIDIA: 48 KiB of local memory, 1024 items
        /// per group; AMD 64 KiB, 256; Intel 64 KiB, 512; others 32 KiB, 256), within `device`'s own
        /// limits, and without vendor extensions: runs that GPU's tiles on any device (PoCL), which is
        /// how every GPU configuration is verified without a GPU.
        public static func typical(_ vendor: String, on device: OpenCLDeviceInfo) -> GPU {
            let name = vendor.lowercased()
            let (local, group): (Int, Int) =
                name.contains("nvidia")
                ? (48 << 10, 1024)
                : name.contains("amd") ? (64 << 10, 256) : name.contains("intel") ? (64 << 10, 512) : (32 << 10, 256)
            return GPU(
                vendor: vendor, localMemoryBytes: min(local, Int(clamping: device.localMemoryBytes)),
                maxWorkGroupSize: min(group, device.maxWorkGroupSize), computeUnits: device.computeUnits,
                extensions: [])
        }

        public init(_ device: OpenCLDeviceInfo) {
            self.init(
                vendor: device.vendor + " " + device.platformVendor,
                localMemoryBytes: Int(clamping: device.localMemoryBytes), maxWorkGroupSize: device.maxWorkGroupSize,
                computeUnits: device.computeUnits, extensions: device.extensions)
        }
    }

    /// The table: work-group shape by vendor (NVIDIA warps of 32: 128 items, 16 per row; AMD waves of
    /// 64: 256 items; Intel: 128 items, 16 per row as one sub-group when `subgroupExtensions` are there;
    /// others (Apple, ARM Mali, Qualcomm Adreno, ...): 64 items, 8 per row), then the largest rows x
    /// keys tile that fits the device's local memory and its work-group limit. Decode tiles
    /// (`decodeRows` set) hold that many rows (the GQA group of one query) with more items per row and
    /// longer key tiles. nil when nothing fits (the caller falls back to the CPU-shaped kernels).
    public static func table(_ gpu: GPU, headDim d: Int, valueDim dv: Int, decodeRows: Int? = nil) -> GPUTiles? {
        let vendor = gpu.vendor.lowercased()
        let intelSubgroups = vendor.contains("intel") && subgroupExtensions.allSatisfy(gpu.extensions.contains)
        var (group, perRow): (Int, Int)
        if vendor.contains("nvidia") {
            (group, perRow) = (128, 16)
        } else if vendor.contains("amd") || vendor.contains("advanced micro devices") {
            (group, perRow) = (256, 16)
        } else if vendor.contains("intel") {
            (group, perRow) = (128, 16)
        } else {
            (group, perRow) = (64, 8)
        }
        if let decodeRows {
            // Few rows (a GQA group of one query is 4-8): each of 4 row groups gets many items (a
            // warp per row on NVIDIA), keys come in longer tiles.
            let rowGroups = max(1, min(decodeRows, 4))
            perRow = max(perRow, group / rowGroups)
            group = rowGroups * perRow
        }
        while group > gpu.maxWorkGroupSize, group > perRow { group /= 2 }
        while perRow > group { perRow /= 2 }
        guard group <= gpu.maxWorkGroupSize, perRow >= 1 else { return nil }
        // Largest first; when nothing fits, fewer items per row (shorter key tiles) and so on.
        while perRow >= 1 {
            let rowGroups = group / perRow
            let rowChoices =
                decodeRows.map { rows in [(max(rowGroups, rows) + rowGroups - 1) / rowGroups * rowGroups] }
                ?? [64, 32, 16, 8, 4, 2, 1]
            let keyChoices = decodeRows == nil ? [32, 16, 8] : [64, 32, 16]
            for rows in rowChoices where rows >= rowGroups && rows % rowGroups == 0 {
                for keys in keyChoices where keys % perRow == 0 || perRow % keys == 0 {
                    let tiles = GPUTiles(
                        rows: rows, keys: max(keys, perRow), rowThreads: perRow, workGroup: group,
                        subgroups: intelSubgroups && (perRow == 8 || perRow == 16))
                    if tiles.problem == nil, tiles.localBytes(headDim: d, valueDim: dv) <= gpu.localMemoryBytes {
                        return tiles
                    }
                }
            }
            if decodeRows == nil || perRow == 1 { break }
            (group, perRow) = (group / 2, perRow / 2)
        }
        return nil
    }
}
