import AttentionCore
import AttentionOpenCL
import COpenCL
import Foundation
import Synchronization

/// A paged K/V cache whose pages live in an OpenCL device's memory: the device-resident sibling of
/// `KVCache`, with the same pages (`[pageCapacity, pageSize, Hkv, D]` pools in fp32, fp16 or bf16),
/// the same page bookkeeping (`PagePool`: free list, copy-on-write forks) and the same methods.
///
/// - `append` rounds the new tokens to the cache's type on the host and writes them into their pages
///   (one write per run of consecutive slots); a shared, partly filled page is copied on the device
///   first. Only the new tokens cross the bus.
/// - `attention` runs a decode-like step (Nq ≤ 16) for many sequences in one launch of the split-KV
///   kernel built for pages, reading the pools where they are: Q goes to the device and O and the LSE
///   come back, never K or V. Prefill-like steps (Nq > 16) read the pools back and run on the host
///   path of the same backend (correct, but they pay the copy; use `KVCache` for them).
/// - Errors leave the cache unchanged: a full pool (`cacheFull`) and a device failure alike.
///
/// Thread safety: as `KVCache`, every method takes the cache's lock.
public final class OpenCLKVCache: @unchecked Sendable {
    public typealias SequenceID = Int

    public let backend: OpenCLBackend
    public let keyValueHeads: Int
    public let headDim: Int
    public let valueDim: Int
    public let pageSize: Int
    public let pageCapacity: Int
    public let storage: StorageType

    private let device: OpenCLDevice
    private let keys: CLBuffer
    private let values: CLBuffer
    private let state: Mutex<PagePool>

    /// Allocates both pools on `backend`'s device (typed errors: no device, a pool larger than the
    /// device's memory or its largest allocation, a failed allocation).
    public init(
        backend: OpenCLBackend, keyValueHeads: Int, headDim: Int, valueDim: Int? = nil, pageSize: Int = 16,
        pageCapacity: Int, storage: StorageType = .f16
    ) throws(AttentionError) {
        let dv = valueDim ?? headDim
        try PagePool.validate(
            keyValueHeads: keyValueHeads, headDim: headDim, valueDim: dv, pageSize: pageSize, pageCapacity: pageCapacity
        )
        guard let device = backend.device else {
            throw .unsupported(backend: backend.name, reason: "no OpenCL device for a device-resident KV cache")
        }
        let tokens = pageCapacity * pageSize * keyValueHeads
        let keyBytes = tokens * headDim * storage.byteSize
        let valueBytes = tokens * dv * storage.byteSize
        let info = device.info
        guard UInt64(keyBytes + valueBytes) <= info.globalMemoryBytes,
            UInt64(max(keyBytes, valueBytes)) <= info.maxAllocationBytes
        else {
            throw .unsupported(
                backend: backend.name,
                reason:
                    "a \(pageCapacity)-page cache needs \(keyBytes + valueBytes) bytes (largest pool \(max(keyBytes, valueBytes))); "
                    + "\(info.name) has \(info.globalMemoryBytes), at most \(info.maxAllocationBytes) per allocation")
        }
        do {
            (keys, values) = try device.withExecution { (state) throws(OpenCLError) in
                (
                    try state.buffer(bytes: keyBytes, flags: Int32(CL_MEM_READ_WRITE)),
                    try state.buffer(bytes: valueBytes, flags: Int32(CL_MEM_READ_WRITE))
                )
            }
        } catch {
            throw .backendFailure(backend: backend.name, message: error.description)
        }
        self.backend = backend
        self.device = device
        self.keyValueHeads = keyValueHeads
        self.headDim = headDim
        self.valueDim = dv
        self.pageSize = pageSize
        self.pageCapacity = pageCapacity
        self.storage = storage
        state = Mutex(PagePool(pageSize: pageSize, capacity: pageCapacity))
    }

    // MARK: Sequences

    public func addSequence() -> SequenceID { state.withLock { $0.add() } }

    public func length(of sequence: SequenceID) throws(AttentionError) -> Int {
        try state.withLock { (s) throws(AttentionError) in try s.length(of: sequence) }
    }

    public var freePages: Int { state.withLock { $0.free.count } }

    /// Appends `keys` [n, Hkv, D] and `values` [n, Hkv, Dv] (fp32, rounded to the cache's storage)
    /// after the sequence's last token. Throws `cacheFull` (and changes nothing) when the pool lacks
    /// the pages; a device error also leaves the cache as it was.
    public func append(sequence: SequenceID, keys newKeys: Tensor, values newValues: Tensor) throws(AttentionError) {
        let n = try PagePool.tokenCount(
            keys: newKeys, values: newValues, keyValueHeads: keyValueHeads, headDim: headDim, valueDim: valueDim)
        let keyBytes = encode(newKeys.storage)
        let valueBytes = encode(newValues.storage)
        try state.withLock { (s) throws(AttentionError) in
            // Bookkeeping on a copy, kept only when the device work succeeded.
            var next = s
            let (copy, start, pages) = try next.append(sequence: sequence, count: n)
            let rowK = keyValueHeads * headDim * storage.byteSize
            let rowV = keyValueHeads * valueDim * storage.byteSize
            do throws(OpenCLError) {
                try device.withExecution { (state) throws(OpenCLError) in
                    if let copy {
                        try copyPage(keys, rowBytes: rowK, from: copy.from, to: copy.to, state: state)
                        try copyPage(values, rowBytes: rowV, from: copy.from, to: copy.to, state: state)
                    }
                    // Runs of consecutive slots (tokens within one page) in one write each.
                    var t = 0
                    while t < n {
                        let first = next.slot(of: start + t, pages: pages)
                        var count = 1
                        while t + count < n, next.slot(of: start + t + count, pages: pages) == first + count {
                            count += 1
                        }
                        try write(keyBytes, rows: t..<t + count, rowBytes: rowK, to: keys, slot: first, state: state)
                        try write(
                            valueBytes, rows: t..<t + count, rowBytes: rowV, to: values, slot: first, state: state)
                        t += count
                    }
                }
            } catch {
                throw .backendFailure(backend: backend.name, message: error.description)
            }
            s = next
        }
    }

    @discardableResult
    public func remove(sequence: SequenceID) throws(AttentionError) -> [Int32] {
        try state.withLock { (s) throws(AttentionError) in try s.remove(sequence: sequence) }
    }

    public func fork(sequence: SequenceID) throws(AttentionError) -> SequenceID {
        try state.withLock { (s) throws(AttentionError) in try s.fork(sequence: sequence) }
    }

    // MARK: Attention

    /// One attention step for many sequences in one call: `query` [S, Hq, Nq, D] (fp32), row s
    /// attending to every token of `sequences[s]` (causal aligned to each sequence's own end), on this
    /// cache's device with the pages read in place.
    public func attention(
        query: Tensor, sequences: [SequenceID], options: AttentionOptions = .init()
    ) throws(AttentionError) -> AttentionResult {
        try state.withLock { (s) throws(AttentionError) in
            let batch = try s.batch(
                query: query.shape, sequences: sequences, keyValueHeads: keyValueHeads, headDim: headDim,
                valueDim: valueDim, options: options, storage: storage)
            if case .unsupported(let reason) = backend.support(for: batch) {
                throw .unsupported(backend: backend.name, reason: reason)
            }
            var output = try Tensor(shape: batch.outputShape, name: "output")
            var lse = try Tensor(shape: Array(batch.outputShape.dropLast()), name: "logSumExp")
            if batch.regime == .decodeLike {
                try output.withUnsafeMutableBufferPointer { (out) throws(AttentionError) in
                    try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) in
                        try query.storage.withUnsafeBufferPointer { (q) throws(AttentionError) in
                            // K and V are the device pools; the host views stand in and are not read.
                            let buffers = AttentionBuffers(
                                query: TensorView(q), key: TensorView(q), value: TensorView(q),
                                output: TensorView(out), logSumExp: l)
                            try backend.run(batch: batch, buffers, residentKeys: keys, residentValues: values)
                        }
                    }
                }
            } else {
                // Prefill-like: the pools come back to the host for the backend's host batch path.
                var hostKeys = [UInt8](repeating: 0, count: keys.byteCount)
                var hostValues = [UInt8](repeating: 0, count: values.byteCount)
                do throws(OpenCLError) {
                    try device.withExecution { (state) throws(OpenCLError) in
                        try hostKeys.withUnsafeMutableBufferPointer { (k) throws(OpenCLError) in
                            try state.read(keys, into: UnsafeMutableRawPointer(k.baseAddress!), bytes: k.count)
                        }
                        try hostValues.withUnsafeMutableBufferPointer { (v) throws(OpenCLError) in
                            try state.read(values, into: UnsafeMutableRawPointer(v.baseAddress!), bytes: v.count)
                        }
                    }
                } catch {
                    throw .backendFailure(backend: backend.name, message: error.description)
                }
                let elementsK = keys.byteCount / storage.byteSize
                let elementsV = values.byteCount / storage.byteSize
                try output.withUnsafeMutableBufferPointer { (out) throws(AttentionError) in
                    try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) in
                        try query.storage.withUnsafeBufferPointer { (q) throws(AttentionError) in
                            try hostKeys.withUnsafeBufferPointer { (k) throws(AttentionError) in
                                try hostValues.withUnsafeBufferPointer { (v) throws(AttentionError) in
                                    try backend.forward(
                                        batch,
                                        AttentionBuffers(
                                            query: TensorView(q),
                                            key: TensorView(
                                                reading: k.baseAddress!, storage: storage, strides: nil,
                                                capacity: elementsK),
                                            value: TensorView(
                                                reading: v.baseAddress!, storage: storage, strides: nil,
                                                capacity: elementsV),
                                            output: TensorView(out), logSumExp: l))
                                }
                            }
                        }
                    }
                }
            }
            return AttentionResult(output: output, logSumExp: lse)
        }
    }

    // MARK: Device storage

    /// The values in the cache's storage type, as bytes.
    private func encode(_ values: [Float]) -> [UInt8] {
        switch storage {
        case .f32: return values.withUnsafeBytes { Array($0) }
        case .f16, .bf16: return values.map(storage.encode).withUnsafeBytes { Array($0) }
        }
    }

    private func write(
        _ bytes: [UInt8], rows: Range<Int>, rowBytes: Int, to pool: CLBuffer, slot: Int, state: ExecutionState
    ) throws(OpenCLError) {
        try withBytes(of: bytes) { (raw) throws(OpenCLError) in
            try state.write(
                pool, offset: slot * rowBytes, from: raw.baseAddress! + rows.lowerBound * rowBytes,
                bytes: rows.count * rowBytes)
        }
    }

    /// A page's tokens copied to another page, through the host (copy-on-write is rare: the first
    /// append into a page a fork shares).
    private func copyPage(_ pool: CLBuffer, rowBytes: Int, from: Int, to: Int, state: ExecutionState)
        throws(OpenCLError)
    {
        let bytes = pageSize * rowBytes
        let page = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
        defer { page.deallocate() }
        try state.read(pool, offset: from * bytes, into: page, bytes: bytes)
        try state.write(pool, offset: to * bytes, from: page, bytes: bytes)
    }
}

/// `Array.withUnsafeBytes` with a typed error.
private func withBytes<R>(of array: [UInt8], _ body: (UnsafeRawBufferPointer) throws(OpenCLError) -> R)
    throws(OpenCLError) -> R
{
    try array.withUnsafeBufferPointer { (buffer) throws(OpenCLError) in try body(UnsafeRawBufferPointer(buffer)) }
}
