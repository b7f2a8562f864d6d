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

    public init(
        vectorWidth: Int, rows: Int, workGroup: Int, useLocalMemory: Bool, decodeRows: Int, minKeysPerSplit: Int
    ) {
        self.vectorWidth = vectorWidth
        self.rows = rows
        self.workGroup = workGroup
        self.useLocalMemory = useLocalMemory
        self.decodeRows = decodeRows
        self.minKeysPerSplit = minKeysPerSplit
    }

    public var description: String {
        "VEC=\(vectorWidth) ROWS=\(rows) WG=\(workGroup)\(useLocalMemory ? " local" : "") "
            + "decode<=\(decodeRows) rows, >=\(minKeysPerSplit) keys/split"
    }

    /// The table. CPUs (PoCL): 16-wide vectors, several rows per work-item for reuse, no local
    /// memory. GPUs: 4-wide vectors, 64 work-items per group, K/V tiles in local memory when
    /// they fit in half of it.
    public static func `default`(for device: OpenCLDeviceInfo, headDim d: Int, valueDim dv: Int) -> OpenCLKernelConfig {
        if device.isGPU {
            let vec = 4
            let tileBytes = 4 * vec * (d + dv)
            let group = max(1, min(64, device.maxWorkGroupSize))
            return OpenCLKernelConfig(
                vectorWidth: vec, rows: 2, workGroup: group,
                useLocalMemory: UInt64(tileBytes) * 2 <= device.localMemoryBytes,
                decodeRows: 8, minKeysPerSplit: 128)
        }
        return OpenCLKernelConfig(
            vectorWidth: 16, rows: 4, workGroup: max(1, min(4, device.maxWorkGroupSize)),
            useLocalMemory: false, decodeRows: 8, minKeysPerSplit: 256)
    }

    /// Build options of the flash program.
    var flashOptions: String {
        "-cl-std=CL1.2 -cl-mad-enable -w -DVEC=\(vectorWidth) -DROWS=\(rows) "
            + "-DUSE_LOCAL=\(useLocalMemory ? 1 : 0) -DKV_SPACE=\(useLocalMemory ? "__local" : "__global")"
    }

    /// Build options of the decode program for `rows` query rows per K/V head (ROWS is the next
    /// power of two, so a handful of variants cover every problem).
    func decodeOptions(rows: Int) -> String {
        var compiled = 1
        while compiled < rows { compiled *= 2 }
        return "-cl-std=CL1.2 -cl-mad-enable -w -DVEC=\(vectorWidth) -DROWS=\(compiled) -DKV_SPACE=__global"
    }
}

/// Which kernel runs a problem, and why.
public enum OpenCLKernelChoice: Sendable, Equatable, CustomStringConvertible {
    /// The tiled flash kernel over a device-transposed K.
    case flash
    /// Flash-decoding: `splits` work-items per K/V head, each over `keysPerSplit` keys, then an exact merge.
    case splitKV(splits: Int, keysPerSplit: Int)

    public var description: String {
        switch self {
        case .flash: return "flash"
        case .splitKV(let splits, let keys): return "split-KV decode (\(splits) splits x \(keys) keys)"
        }
    }
}
