import AttentionCore
import COpenCL

extension OpenCLBackend {
    /// How the tiled kernel runs a problem: decode-shaped problems (at most `decodeRows` query rows
    /// per K/V head) take the decode tiles; a GQA group's heads share a work-group when one head's
    /// queries do not fill its rows; keys are split across work-groups (then merged exactly) when
    /// the row blocks alone leave compute units idle.
    func tiledChoice(
        _ p: AttentionProblem, _ cfg: OpenCLKernelConfig, _ prefillTiles: GPUTiles, computeUnits: Int
    ) -> (choice: OpenCLKernelChoice, reason: String) {
        let group = p.groupSize
        let decodeShaped = group * p.queryLength <= cfg.decodeRows
        let tiles = decodeShaped ? (cfg.decodeTiles ?? prefillTiles) : prefillTiles
        let heads = group > 1 && p.queryLength < tiles.rows ? group : 1
        let units = p.batch * p.queryHeads / heads
        let rowBlocks = (heads * p.queryLength + tiles.rows - 1) / tiles.rows
        let groups = units * rowBlocks
        let target = 4 * max(1, computeUnits)
        var splits = 1
        if allowSplitKV, groups < target, p.keyLength >= 2 * cfg.minKeysPerSplit {
            splits = max(1, min((target + groups - 1) / max(groups, 1), p.keyLength / cfg.minKeysPerSplit))
        }
        let perSplit = max(
            tiles.keys, ((p.keyLength + splits - 1) / splits + tiles.keys - 1) / tiles.keys * tiles.keys)
        let used = max(1, (p.keyLength + perSplit - 1) / perSplit)
        let launch = TiledLaunch(
            tiles: tiles, headsPerUnit: heads, splits: used, keysPerSplit: used > 1 ? perSplit : max(p.keyLength, 1))
        var reason =
            "\(groups) work-groups of \(tiles.rows) rows"
            + (heads > 1 ? " (the \(heads) heads of a GQA group share K/V tiles)" : "")
            + (decodeShaped ? ", decode tiles" : "")
        if used > 1 { reason += "; keys split \(used) ways to fill \(computeUnits) compute units" }
        return (.tiled(launch), reason)
    }

    /// Why the device cannot run these tiles on this problem (nil when it can).
    func tiledProblem(_ tiles: GPUTiles, _ p: AttentionProblem, _ device: OpenCLDeviceInfo) -> String? {
        if let problem = tiles.problem { return "tiles \(tiles): \(problem)" }
        if tiles.workGroup > device.maxWorkGroupSize {
            return "tiles of \(tiles.workGroup) items exceed \(device.name)'s \(device.maxWorkGroupSize) per group"
        }
        let bytes = tiles.localBytes(headDim: p.headDim, valueDim: p.valueDim)
        if UInt64(bytes) > device.localMemoryBytes {
            return "tiles \(tiles) need \(bytes) bytes of local memory at D \(p.headDim), Dv \(p.valueDim); "
                + "\(device.name) has \(device.localMemoryBytes)"
        }
        if tiles.subgroups, let missing = GPUTiles.subgroupExtensions.first(where: { !device.extensions.contains($0) })
        {
            return "tiles use sub-group reductions; \(device.name) lacks \(missing)"
        }
        return nil
    }

    /// The tiled kernel over row blocks x units x key splits, then the exact merge of the splits.
    func launchTiled(
        _ p: AttentionProblem, _ params: AKParams, _ launch: Launch, _ b: CallBuffers, _ t: TiledLaunch,
        keyValueType: StorageType, state: ExecutionState, batch: BatchArguments? = nil
    ) throws(OpenCLError) {
        let tiles = t.tiles
        let totalRows = p.batch * p.queryHeads * p.queryLength
        let units = p.batch * p.queryHeads / t.headsPerUnit
        let rowBlocks = (t.headsPerUnit * p.queryLength + tiles.rows - 1) / tiles.rows
        guard totalRows > 0, units > 0, rowBlocks > 0 else { return }
        let split = t.splits > 1
        let readWrite = Int32(CL_MEM_READ_WRITE)
        let out = split ? try state.buffer(bytes: 4 * t.splits * totalRows * p.valueDim, flags: readWrite) : b.o
        let lse = split ? try state.buffer(bytes: 4 * t.splits * totalRows, flags: readWrite) : b.lse
        // K and V are read as stored: one program per storage type (and batch form).
        let options =
            tiles.options(valueDim: p.valueDim) + " -DKV_TYPE=\(keyValueType.kernelCode) -DSPLIT=\(split ? 1 : 0)"
            + (batch.map { " -DBATCH_FORM=\($0.form)" } ?? "")
        let kernel = try state.kernel("flash_tiled", source: launch.source, options: options)
        for (i, buffer) in [b.q, b.k, b.v, b.additiveMask, b.booleanMask, out, lse].enumerated() {
            try kernel.set(i, buffer)
        }
        try kernel.set(7, value: params)
        try kernel.set(8, value: Int32(t.headsPerUnit))
        try kernel.set(9, value: Int32(clamping: t.keysPerSplit))
        let (d, dv) = (p.headDim, p.valueDim)
        try kernel.setLocal(10, bytes: 4 * d * tiles.rows)
        try kernel.setLocal(11, bytes: 4 * max(d * (tiles.keys + 1), tiles.keys * dv))
        try kernel.setLocal(12, bytes: 4 * tiles.rows * tiles.keys)
        try kernel.setLocal(13, bytes: 4 * tiles.rows * tiles.rowThreads)
        if let batch {
            try kernel.set(14, batch.lengths)
            try kernel.set(15, batch.blockTable)
            try kernel.set(16, value: Int32(batch.pageSize))
            try kernel.set(17, value: Int32(batch.maxPages))
        }
        try state.enqueue(
            kernel, global: [rowBlocks * tiles.workGroup, units, t.splits], local: [tiles.workGroup, 1, 1])
        if split {
            try enqueueMerge(
                out, lse, into: b, rows: totalRows, valueDim: dv, splits: t.splits, source: launch.mergeSource,
                options: launch.config.decodeOptions(rows: 1, cpuDevice: device?.info.isCPU ?? false), state: state)
        }
    }
}
