import AttentionCore
import AttentionKit
import AttentionOpenCL
import Testing

/// The device-resident cache: the same operations on an `OpenCLKVCache` and a host `KVCache` (pages
/// crossed, forks copied on write, sequences removed, a full pool refused) give the same attention,
/// decode-like steps on the device and prefill-like ones through the host path.
@Suite struct OpenCLKVCacheTests {
    static let devices = OpenCLRuntime.availableDevices.indices.map { $0 }

    /// Both caches, driven alike.
    struct Pair {
        let host: KVCache
        let device: OpenCLKVCache

        func append(_ id: Int, _ n: Int, seed: UInt64) throws {
            let k = try Tensor.random(shape: [n, host.keyValueHeads, host.headDim], seed: seed, in: -2...2)
            let v = try Tensor.random(shape: [n, host.keyValueHeads, host.valueDim], seed: seed &+ 7, in: -1...1)
            try host.append(sequence: id, keys: k, values: v)
            try device.append(sequence: id, keys: k, values: v)
        }

        /// One step over `ids` on both; the device result must be the host OpenCL result within fp32 rounding.
        func check(_ ids: [Int], nq: Int, causal: Bool, seed: UInt64, _ label: String) throws {
            let query = try Tensor.random(shape: [ids.count, 4, nq, host.headDim], seed: seed, in: -2...2)
            let options = AttentionOptions(causal: causal)
            let expected = try host.attention(query: query, sequences: ids, options: options, backend: device.backend)
            let got = try device.attention(query: query, sequences: ids, options: options)
            #expect(got.output.shape == expected.output.shape)
            let worst = zip(got.output.storage, expected.output.storage).map { abs($0 - $1) }.max() ?? 0
            #expect(worst <= 1e-5, "\(label): |device - host| up to \(worst)")
            for (a, b) in zip(got.logSumExp.storage, expected.logSumExp.storage) {
                #expect(a == b || abs(a - b) <= 1e-5, "\(label): LSE \(a) vs \(b)")
            }
        }
    }

    /// Each device with its own configuration, and shaped as an NVIDIA GPU (the tiled kernel's paged form).
    static let backends: [(String, Int)] = devices.flatMap { [("default", $0), ("NVIDIA", $0)] }

    @Test(arguments: backends, [StorageType.f32, .f16, .bf16])
    func sameAsTheHostCache(_ shaped: (String, Int), _ storage: StorageType) throws {
        let backend =
            shaped.0 == "default"
            ? OpenCLBackend(device: shaped.1) : OpenCLBackend(device: shaped.1).gpuShaped(as: shaped.0)
        let pair = Pair(
            host: try KVCache(
                keyValueHeads: 2, headDim: 16, valueDim: 8, pageSize: 4, pageCapacity: 40, storage: storage),
            device: try OpenCLKVCache(
                backend: backend, keyValueHeads: 2, headDim: 16, valueDim: 8, pageSize: 4, pageCapacity: 40,
                storage: storage))
        let a = pair.host.addSequence()
        let b = pair.host.addSequence()
        let c = pair.host.addSequence()
        #expect([a, b, c] == (0..<3).map { _ in pair.device.addSequence() })
        try pair.append(a, 9, seed: 1)  // crosses pages
        try pair.append(b, 1, seed: 2)
        try pair.append(c, 0, seed: 3)  // stays empty
        try pair.check([a, b, c], nq: 1, causal: true, seed: 10, "first step")
        // Fork a in the middle of a page, then both append into the shared page (copy-on-write).
        let forkHost = try pair.host.fork(sequence: a)
        let forkDevice = try pair.device.fork(sequence: a)
        #expect(forkHost == forkDevice)
        try pair.append(a, 3, seed: 4)
        try pair.append(forkHost, 6, seed: 5)
        try pair.append(c, 5, seed: 6)
        for step in 0..<6 {
            for id in [a, b, c, forkHost] { try pair.append(id, 1, seed: UInt64(20 + step * 4 + id)) }
            try pair.check([a, b, c, forkHost], nq: 1, causal: true, seed: UInt64(30 + step), "decode step \(step)")
        }
        try pair.check([forkHost, a], nq: 3, causal: true, seed: 40, "three queries")
        try pair.check([b, a], nq: 1, causal: false, seed: 41, "not causal")
        // Prefill-like through the host path.
        try pair.check([a, c], nq: 20, causal: false, seed: 42, "prefill-like")
        #expect(try pair.host.remove(sequence: a) == pair.device.remove(sequence: a))
        #expect(pair.host.freePages == pair.device.freePages)
        try pair.check([forkHost, b], nq: 1, causal: true, seed: 43, "after remove")
        // A full pool: refused, nothing changes.
        let free = pair.device.freePages
        let length = try pair.device.length(of: b)
        #expect(throws: AttentionError.self) {
            try pair.device.append(
                sequence: b, keys: try Tensor(shape: [free * 4 + 8, 2, 16]),
                values: try Tensor(shape: [free * 4 + 8, 2, 8]))
        }
        let lengthAfter = try pair.device.length(of: b)
        #expect(pair.device.freePages == free && lengthAfter == length)
        try pair.check([forkHost, b], nq: 1, causal: true, seed: 44, "after a refused append")
        #expect(throws: AttentionError.self) {
            try pair.device.append(
                sequence: 99, keys: try Tensor(shape: [1, 2, 16]), values: try Tensor(shape: [1, 2, 8]))
        }
        #expect(throws: AttentionError.self) {
            _ = try pair.device.attention(query: try Tensor(shape: [1, 4, 1, 16]), sequences: [99])
        }
        #expect(throws: AttentionError.self) {
            try pair.device.append(
                sequence: b, keys: try Tensor(shape: [1, 3, 16]), values: try Tensor(shape: [1, 2, 8]))
        }
    }

    @Test func withoutADeviceItSaysWhy() throws {
        #expect(throws: AttentionError.self) {
            try OpenCLKVCache(backend: OpenCLBackend(device: 99), keyValueHeads: 1, headDim: 8, pageCapacity: 4)
        }
        #expect(throws: AttentionError.self) {
            try OpenCLKVCache(
                backend: OpenCLBackend(device: 0), keyValueHeads: 1, headDim: 8, pageSize: 3, pageCapacity: 4)
        }
    }
}
