import AttentionCore
import AttentionOpenCL
import Foundation
import Testing

/// The FlashAttention-2-shaped GPU kernel (`Kernels/tiled.cl`) in the table configurations of
/// typical NVIDIA, AMD, Intel and small mobile GPUs, and in tiny and odd tiles, on every OpenCL
/// device here (PoCL in CI): the GPU code paths are verified before any GPU sees them.
@Suite(.enabled(if: openCLAvailable, noOpenCLReason))
struct GPUKernelParity {
    static let vendors = ["NVIDIA", "AMD", "Intel", "Mali"]

    /// Tiles far smaller than any GPU's: many tiles per row, partial tiles everywhere.
    static let smallConfigs: [OpenCLKernelConfig] = [
        OpenCLKernelConfig(
            vectorWidth: 4, rows: 2, workGroup: 4, useLocalMemory: false, decodeRows: 8, minKeysPerSplit: 16,
            tiles: GPUTiles(rows: 4, keys: 4, rowThreads: 2, workGroup: 4),
            decodeTiles: GPUTiles(rows: 4, keys: 8, rowThreads: 4, workGroup: 8)),
        // Three items per row, two rows each: nothing a power of two.
        OpenCLKernelConfig(
            vectorWidth: 4, rows: 2, workGroup: 4, useLocalMemory: false, decodeRows: 4, minKeysPerSplit: 32,
            tiles: GPUTiles(rows: 6, keys: 9, rowThreads: 3, workGroup: 9), decodeTiles: nil),
    ]

    /// Every case runs the tiled kernel (never silently the CPU-shaped one).
    func expectTiled(_ backend: OpenCLBackend, _ c: ParityCase) throws {
        let choice = backend.kernelChoice(for: try c.problem()).choice
        guard case .tiled = choice else {
            Issue.record("\(c): expected the tiled kernel, got \(choice)")
            return
        }
    }

    /// The sweep's cases up to 50 M multiply-adds (PoCL runs a GPU work-group's items one after
    /// another, so the largest cases would take minutes each), and every feature case.
    static func cases() -> [ParityCase] { Sweep.cases().filter { $0.work <= 50_000_000 } + Sweep.featureCases }

    /// NVIDIA's and the small GPU's configurations (the two tile families: 16 items per row in groups
    /// of 128, 8 in groups of 64) on every case; AMD's and Intel's (same families, other sizes) on every
    /// third case and the feature cases, to bound the programs PoCL compiles.
    @Test(arguments: vendors)
    func sweep(_ vendor: String) throws {
        let all = Self.cases()
        let cases =
            ["NVIDIA", "Mali"].contains(vendor)
            ? all : all.enumerated().filter { $0.offset % 3 == 0 }.map(\.element) + Sweep.featureCases
        for index in openCLDevices.indices {
            let backend = OpenCLBackend(device: index).gpuShaped(as: vendor)
            for c in cases {
                if max(c.d, c.dv) <= 256 { try expectTiled(backend, c) }
                try expectParity(backend, c)
            }
            let unsplit = OpenCLBackend(device: index, allowSplitKV: false).gpuShaped(as: vendor)
            for c in Sweep.featureCases { try expectParity(unsplit, c) }
        }
    }

    @Test(arguments: smallConfigs)
    func smallTiles(_ config: OpenCLKernelConfig) throws {
        let cases = Self.cases().enumerated().filter { $0.offset % 3 == 0 }.map(\.element)
        for index in openCLDevices.indices {
            for c in cases {
                let backend = OpenCLBackend(device: index, config: config)
                try expectTiled(backend, c)
                try expectParity(backend, c)
                try expectParity(OpenCLBackend(device: index, config: config, allowSplitKV: false), c)
            }
        }
    }

    /// Decode: the GQA group's heads share a work-group, keys are split across groups, and the exact
    /// merge gives the unsplit result; the merge order is fixed, so two runs agree bit for bit.
    @Test func decodeSplitsKeysPacksHeadsAndMergesDeterministically() throws {
        let c = ParityCase(
            batch: 2, heads: (8, 2), nq: 1, nk: 3001, d: 128, dv: 96,
            options: .init(causal: true, window: .init(left: 2500, right: -1)))
        for index in openCLDevices.indices {
            let backend = OpenCLBackend(device: index).gpuShaped(as: "NVIDIA")
            guard case .tiled(let launch) = backend.kernelChoice(for: try c.problem()).choice else {
                Issue.record("expected the tiled kernel on \(c)")
                continue
            }
            #expect(launch.headsPerUnit == 4)
            #expect(launch.splits > 1)
            let first = try expectParity(backend, c)
            let second = try expectParity(backend, c)
            #expect(first.output.storage.map(\.bitPattern) == second.output.storage.map(\.bitPattern))
            #expect(first.logSumExp.storage.map(\.bitPattern) == second.logSumExp.storage.map(\.bitPattern))
            let unsplit = try expectParity(OpenCLBackend(device: index, allowSplitKV: false).gpuShaped(as: "NVIDIA"), c)
            for (a, b) in zip(first.output.storage, unsplit.output.storage) { #expect(abs(a - b) <= 1e-5) }
        }
    }

    @Test func paddedBuffersAndStridedOutputsStayInBounds() throws {
        let cases = [
            ParityCase(batch: 2, heads: (4, 2), nq: 37, nk: 70, d: 24, dv: 40, options: .init(causal: true)),
            ParityCase(batch: 1, heads: (8, 1), nq: 1, nk: 900, d: 64, dv: 64),
        ]
        for index in openCLDevices.indices {
            for vendor in Self.vendors {
                for c in cases { try expectPaddedRunMatches(OpenCLBackend(device: index).gpuShaped(as: vendor), c) }
            }
        }
    }

    @Test func aMissingGPUKernelProgramIsAnError() throws {
        let c = ParityCase(heads: (2, 2), nq: 33, nk: 40, d: 16, dv: 16)
        for index in openCLDevices.indices {
            let backend = OpenCLBackend(
                device: index, config: nil, tunedConfigs: [], allowSplitKV: true,
                programs: { _ in nil }
            ).gpuShaped(as: "AMD")
            let (q, k, v) = try c.inputs()
            let expected = AttentionError.backendFailure(
                backend: BackendID.opencl(device: index).description,
                message: "kernel program 'tiled.cl' is missing from this build")
            #expect(throws: expected) { try backend.attention(query: q, key: k, value: v) }
        }
    }
}

/// The GPU table: tiles that fit each vendor's local memory and work-group limit, sub-groups only
/// where the extension is listed, and the CPU-shaped fallback where no tile fits.
@Suite struct GPUTileTable {
    static let gpus: [(vendor: String, local: Int, group: Int)] = [
        ("NVIDIA Corporation", 48 << 10, 1024), ("Advanced Micro Devices, Inc.", 64 << 10, 256),
        ("Intel(R) Corporation", 64 << 10, 512), ("ARM", 32 << 10, 384), ("QUALCOMM", 32 << 10, 256),
        ("Apple", 32 << 10, 256),
    ]

    @Test func tilesFitEveryTypicalGPU() throws {
        for gpu in Self.gpus {
            let facts = GPUTiles.GPU(
                vendor: gpu.vendor, localMemoryBytes: gpu.local, maxWorkGroupSize: gpu.group, computeUnits: 16,
                extensions: [])
            for (d, dv) in [(64, 64), (128, 128), (256, 256), (80, 48), (96, 3)] {
                for decodeRows in [nil, 8] {
                    let tiles = try #require(
                        GPUTiles.table(facts, headDim: d, valueDim: dv, decodeRows: decodeRows),
                        "\(gpu.vendor) D\(d) Dv\(dv)")
                    #expect(tiles.problem == nil, "\(gpu.vendor): \(tiles)")
                    #expect(tiles.localBytes(headDim: d, valueDim: dv) <= gpu.local, "\(gpu.vendor) D\(d): \(tiles)")
                    #expect(tiles.workGroup <= gpu.group)
                    if let decodeRows { #expect(tiles.rows >= decodeRows) }
                    #expect(!tiles.subgroups)
                }
            }
        }
        // Larger heads get fewer rows per group on the same GPU.
        let nvidia = GPUTiles.GPU(
            vendor: "NVIDIA", localMemoryBytes: 48 << 10, maxWorkGroupSize: 1024, computeUnits: 132, extensions: [])
        let d64 = try #require(GPUTiles.table(nvidia, headDim: 64, valueDim: 64))
        let d256 = try #require(GPUTiles.table(nvidia, headDim: 256, valueDim: 256))
        #expect(d64.rows > d256.rows)
    }

    @Test func subgroupsOnlyWithTheExtension() throws {
        func intel(_ extensions: [String]) throws -> GPUTiles {
            try #require(
                GPUTiles.table(
                    .init(
                        vendor: "Intel(R) Corporation", localMemoryBytes: 64 << 10, maxWorkGroupSize: 512,
                        computeUnits: 96, extensions: extensions), headDim: 128, valueDim: 128))
        }
        #expect(try intel(["cl_khr_fp16", "cl_intel_subgroups", "cl_intel_required_subgroup_size"]).subgroups)
        // The shuffles without the attribute that pins the sub-group size: the portable reductions.
        #expect(try !intel(["cl_khr_fp16", "cl_intel_subgroups"]).subgroups)
        #expect(try !intel(["cl_khr_fp16"]).subgroups)
        // Another vendor listing the extension keeps the portable reductions.
        let amd = try #require(
            GPUTiles.table(
                .init(
                    vendor: "AMD", localMemoryBytes: 64 << 10, maxWorkGroupSize: 256, computeUnits: 60,
                    extensions: GPUTiles.subgroupExtensions), headDim: 128, valueDim: 128))
        #expect(!amd.subgroups)
    }

    @Test func noTileFitsTinyLocalMemory() {
        let tiny = GPUTiles.GPU(
            vendor: "Vivante", localMemoryBytes: 1 << 10, maxWorkGroupSize: 128, computeUnits: 1, extensions: [])
        #expect(GPUTiles.table(tiny, headDim: 512, valueDim: 512) == nil)
        let config = OpenCLKernelConfig.gpu(tiny, headDim: 512, valueDim: 512)
        #expect(config.tiles == nil)
        #expect(!config.useLocalMemory)
    }

    @Test func malformedTilesAreNamed() {
        #expect(
            GPUTiles(rows: 4, keys: 4, rowThreads: 3, workGroup: 8).problem == "8 items do not split into rows of 3")
        #expect(
            GPUTiles(rows: 5, keys: 4, rowThreads: 2, workGroup: 8).problem == "5 rows do not split over 4 row groups")
        #expect(GPUTiles(rows: 4, keys: 5, rowThreads: 2, workGroup: 8).problem == "5 keys do not split over 2 items")
        #expect(GPUTiles(rows: 0, keys: 4, rowThreads: 2, workGroup: 8).problem == "tile sizes must be positive")
    }

    /// Profiles written before the GPU kernel (no tiles) still load, as CPU-shaped configurations;
    /// tiles survive a round trip.
    @Test func profilesWithAndWithoutTiles() throws {
        let old =
            #"{"vectorWidth":4,"rows":2,"workGroup":64,"useLocalMemory":true,"decodeRows":8,"minKeysPerSplit":128}"#
        let decoded = try JSONDecoder().decode(OpenCLKernelConfig.self, from: Data(old.utf8))
        #expect(decoded.tiles == nil && decoded.decodeTiles == nil && decoded.workGroup == 64)
        var config = decoded
        config.tiles = GPUTiles(rows: 32, keys: 32, rowThreads: 16, workGroup: 128, subgroups: true)
        config.decodeTiles = GPUTiles(rows: 8, keys: 64, rowThreads: 32, workGroup: 128)
        let again = try JSONDecoder().decode(OpenCLKernelConfig.self, from: JSONEncoder().encode(config))
        #expect(again == config)
    }
}
