import AttentionCore
import COpenCL
import Foundation

/// What an OpenCL device is, as its driver reports it.
public struct OpenCLDeviceInfo: Sendable, Equatable, Codable {
    /// Position in the process-wide device list (`--device N`).
    public var index: Int
    public var platformName: String
    public var platformVendor: String
    public var platformVersion: String
    public var name: String
    public var vendor: String
    /// "CPU", "GPU", "ACCELERATOR" (joined with "+" when several bits are set).
    public var type: String
    public var driverVersion: String
    public var deviceVersion: String
    public var openCLCVersion: String
    public var computeUnits: Int
    public var clockMHz: Int
    public var globalMemoryBytes: UInt64
    public var maxAllocationBytes: UInt64
    public var localMemoryBytes: UInt64
    public var maxWorkGroupSize: Int
    public var preferredFloatVectorWidth: Int
    public var nativeFloatVectorWidth: Int
    public var supportsFP16: Bool
    public var supportsSubgroups: Bool
    public var hostUnifiedMemory: Bool
    public var extensions: [String]

    public var isCPU: Bool { type.contains("CPU") }
    public var isGPU: Bool { type.contains("GPU") }
}

/// One OpenCL device with its lazily created context, queue, programs and kernels.
///
/// Thread-safe: execution on a device is serialised (OpenCL kernel arguments are not thread-safe
/// to set, and one in-order queue per device keeps results deterministic).
public final class OpenCLDevice: @unchecked Sendable {
    public let info: OpenCLDeviceInfo
    package let id: cl_device_id
    package let library: OpenCLLibrary
    /// Where built program binaries are kept (nil: not kept).
    package let programCache: URL?
    private let lock = NSLock()
    private var state: ExecutionState?
    private let notesLock = NSLock()
    private var notes: [String] = []

    init(id: cl_device_id, info: OpenCLDeviceInfo, library: OpenCLLibrary, programCache: URL?) {
        self.id = id
        self.info = info
        self.library = library
        self.programCache = programCache
    }

    /// What happened to this device's on-disk program cache that a caller may want to know: files
    /// ignored and why (corrupt, truncated, rejected by the driver), programs rebuilt. The last 32.
    public var programCacheNotes: [String] { notesLock.withLock { notes } }

    func note(_ text: String) {
        notesLock.withLock {
            notes.append(text)
            if notes.count > 32 { notes.removeFirst(notes.count - 32) }
        }
    }

    /// Runs `body` with exclusive use of the device's context, queue and caches.
    ///
    /// When `body` fails, the queue is drained before the error goes back (clFinish; if that fails
    /// too, a blocking read enqueued behind the call's commands), so that no command of the failed
    /// call still reads or writes the caller's memory afterwards.
    package func withExecution<R>(_ body: (ExecutionState) throws(OpenCLError) -> R) throws(OpenCLError) -> R {
        lock.lock()
        defer { lock.unlock() }
        let current: ExecutionState
        if let state {
            current = state
        } else {
            current = try ExecutionState(device: self)
            state = current
        }
        do {
            return try body(current)
        } catch {
            // clFinish, or when it fails itself, a blocking read behind everything already enqueued
            // (the queue is in order): either returns only once earlier commands are done.
            if library.api.Finish(current.queue.handle) != CL_SUCCESS {
                var word: UInt32 = 0
                _ = library.api.EnqueueReadBuffer(
                    current.queue.handle, current.placeholder.handle, cl_bool(CL_TRUE), 0, 4, &word, 0, nil, nil)
            }
            throw error
        }
    }
}

/// Context, queue and built programs of one device. Used only under the device's lock.
package final class ExecutionState {
    package let context: CLContext
    package let queue: CLQueue
    /// A small buffer bound to optional pointer arguments that a call does not use.
    package let placeholder: CLBuffer
    private unowned let device: OpenCLDevice
    private var programs: [String: CLProgram] = [:]
    private var kernels: [String: CLKernel] = [:]

    init(device: OpenCLDevice) throws(OpenCLError) {
        self.device = device
        let api = device.library.api
        var status: cl_int = 0
        var id: cl_device_id? = device.id
        guard let ctx = api.CreateContext(nil, 1, &id, nil, nil, &status), status == CL_SUCCESS else {
            throw OpenCLError(code: status, operation: "clCreateContext")
        }
        context = CLContext(ctx, library: device.library)
        guard let q = api.CreateCommandQueue(ctx, device.id, 0, &status), status == CL_SUCCESS else {
            throw OpenCLError(code: status, operation: "clCreateCommandQueue")
        }
        queue = CLQueue(q, library: device.library)
        guard let mem = api.CreateBuffer(ctx, cl_mem_flags(CL_MEM_READ_WRITE), 64, nil, &status), status == CL_SUCCESS
        else {
            throw OpenCLError(code: status, operation: "clCreateBuffer(placeholder)")
        }
        placeholder = CLBuffer(mem, byteCount: 64, library: device.library)
    }

    /// The kernel `name` of the program built from `source` with `options`, building (or loading
    /// the cached binary) on first use.
    package func kernel(_ name: String, source: String, options: String) throws(OpenCLError) -> CLKernel {
        let key = "\(options)|\(fnv1a(source))"
        if let kernel = kernels["\(key)#\(name)"] { return kernel }
        let program = try self.program(source: source, options: options, key: key)
        var status: cl_int = 0
        guard let handle = device.library.api.CreateKernel(program.handle, name, &status), status == CL_SUCCESS else {
            throw OpenCLError(code: status, operation: "clCreateKernel(\(name))")
        }
        let kernel = CLKernel(handle, name: name, library: device.library)
        kernels["\(key)#\(name)"] = kernel
        return kernel
    }

    private func program(source: String, options: String, key: String) throws(OpenCLError) -> CLProgram {
        if let program = programs[key] { return program }
        let api = device.library.api
        let cacheFile = device.programCache.map { ProgramDiskCache.file(in: $0, for: device.info, key: key) }
        if let cacheFile {
            switch ProgramDiskCache.read(cacheFile) {
            case .missing:
                break
            case .unusable(let reason):
                device.note("\(cacheFile.path) ignored (\(reason)); rebuilt from source")
            case .binary(let binary):
                do {
                    let program = try buildFromBinary(binary, options: options)
                    programs[key] = program
                    return program
                } catch {
                    device.note("\(cacheFile.path) ignored (the driver refused it: \(error)); rebuilt from source")
                }
            }
        }
        var status: cl_int = 0
        let handle: cl_program? = source.withCString { text in
            var pointer: UnsafePointer<CChar>? = text
            var length = strlen(text)
            return api.CreateProgramWithSource(context.handle, 1, &pointer, &length, &status)
        }
        guard let handle, status == CL_SUCCESS else {
            throw OpenCLError(code: status, operation: "clCreateProgramWithSource")
        }
        let program = CLProgram(handle, library: device.library)
        try build(program, options: options)
        programs[key] = program
        if let cacheFile, let binary = binary(of: program), let failure = ProgramDiskCache.write(binary, to: cacheFile)
        {
            device.note("\(cacheFile.path) not written (\(failure)); the next process builds again")
        }
        return program
    }

    private func buildFromBinary(_ binary: [UInt8], options: String) throws(OpenCLError) -> CLProgram {
        let api = device.library.api
        var status: cl_int = 0
        var binaryStatus: cl_int = 0
        var id: cl_device_id? = device.id
        var length = binary.count
        let handle: cl_program? = binary.withUnsafeBufferPointer { bytes in
            var pointer: UnsafePointer<UInt8>? = bytes.baseAddress
            return api.CreateProgramWithBinary(context.handle, 1, &id, &length, &pointer, &binaryStatus, &status)
        }
        guard let handle, status == CL_SUCCESS, binaryStatus == CL_SUCCESS else {
            throw OpenCLError(
                code: status != CL_SUCCESS ? status : binaryStatus, operation: "clCreateProgramWithBinary")
        }
        let program = CLProgram(handle, library: device.library)
        try build(program, options: options)
        return program
    }

    private func build(_ program: CLProgram, options: String) throws(OpenCLError) {
        let api = device.library.api
        var id: cl_device_id? = device.id
        let status = api.BuildProgram(program.handle, 1, &id, options, nil, nil)
        guard status == CL_SUCCESS else {
            var size = 0
            _ = api.GetProgramBuildInfo(
                program.handle, device.id, cl_program_build_info(CL_PROGRAM_BUILD_LOG), 0, nil, &size)
            var log = [CChar](repeating: 0, count: max(size, 1))
            _ = api.GetProgramBuildInfo(
                program.handle, device.id, cl_program_build_info(CL_PROGRAM_BUILD_LOG), log.count, &log, nil)
            throw OpenCLError(code: status, operation: "clBuildProgram(\(options))", buildLog: String(cChars: log))
        }
    }

    private func binary(of program: CLProgram) -> [UInt8]? {
        let api = device.library.api
        var size = 0
        guard
            api.GetProgramInfo(
                program.handle, cl_program_info(CL_PROGRAM_BINARY_SIZES), MemoryLayout<Int>.size, &size, nil)
                == CL_SUCCESS,
            size > 0
        else { return nil }
        var bytes = [UInt8](repeating: 0, count: size)
        let status = bytes.withUnsafeMutableBufferPointer { buffer -> cl_int in
            var pointer: UnsafeMutablePointer<UInt8>? = buffer.baseAddress
            return api.GetProgramInfo(
                program.handle, cl_program_info(CL_PROGRAM_BINARIES), MemoryLayout<UnsafeMutablePointer<UInt8>?>.size,
                &pointer, nil)
        }
        return status == CL_SUCCESS ? bytes : nil
    }

    // MARK: Buffers

    /// A new device buffer. With `host` and `useHostMemory`, the device works on the host memory in
    /// place (CPU devices); with `host` alone the contents are copied in.
    package func buffer(bytes: Int, flags: Int32, host: UnsafeRawPointer? = nil, useHostMemory: Bool = false)
        throws(OpenCLError) -> CLBuffer
    {
        var status: cl_int = 0
        var memFlags = cl_mem_flags(flags)
        if host != nil { memFlags |= cl_mem_flags(useHostMemory ? CL_MEM_USE_HOST_PTR : CL_MEM_COPY_HOST_PTR) }
        guard
            let mem = device.library.api.CreateBuffer(
                context.handle, memFlags, max(bytes, 4), UnsafeMutableRawPointer(mutating: host), &status),
            status == CL_SUCCESS
        else {
            throw OpenCLError(code: status, operation: "clCreateBuffer(\(bytes) bytes)")
        }
        return CLBuffer(mem, byteCount: bytes, library: device.library)
    }

    package func read(_ buffer: CLBuffer, offset: Int = 0, into host: UnsafeMutableRawPointer, bytes: Int)
        throws(OpenCLError)
    {
        try check(
            device.library.api.EnqueueReadBuffer(
                queue.handle, buffer.handle, cl_bool(CL_TRUE), offset, bytes, host, 0, nil, nil),
            "clEnqueueReadBuffer")
    }

    /// Copies `bytes` from host memory into `buffer` at byte `offset` (blocking).
    package func write(_ buffer: CLBuffer, offset: Int, from host: UnsafeRawPointer, bytes: Int) throws(OpenCLError) {
        try check(
            device.library.api.EnqueueWriteBuffer(
                queue.handle, buffer.handle, cl_bool(CL_TRUE), offset, bytes, host, 0, nil, nil),
            "clEnqueueWriteBuffer")
    }

    /// Makes a `CL_MEM_USE_HOST_PTR` buffer's contents visible in host memory (map + unmap).
    package func synchronizeHostMemory(_ buffer: CLBuffer) throws(OpenCLError) {
        var status: cl_int = 0
        let api = device.library.api
        guard
            let mapped = api.EnqueueMapBuffer(
                queue.handle, buffer.handle, cl_bool(CL_TRUE), cl_map_flags(CL_MAP_READ), 0,
                max(buffer.byteCount, 4), 0, nil, nil, &status), status == CL_SUCCESS
        else {
            throw OpenCLError(code: status, operation: "clEnqueueMapBuffer")
        }
        try check(
            api.EnqueueUnmapMemObject(queue.handle, buffer.handle, mapped, 0, nil, nil), "clEnqueueUnmapMemObject")
    }

    /// Enqueues `kernel` over `global` work-items in groups of `local` (nil: the driver chooses).
    package func enqueue(_ kernel: CLKernel, global: [Int], local: [Int]?) throws(OpenCLError) {
        var globalSize = global
        var localSize = local ?? []
        let status = localSize.withUnsafeMutableBufferPointer { localBuffer in
            device.library.api.EnqueueNDRangeKernel(
                queue.handle, kernel.handle, cl_uint(globalSize.count), nil, &globalSize,
                local == nil ? nil : localBuffer.baseAddress, 0, nil, nil)
        }
        try check(
            status, "clEnqueueNDRangeKernel(\(kernel.name), global \(global), local \(local.map { "\($0)" } ?? "auto"))"
        )
    }

    package func finish() throws(OpenCLError) {
        try check(device.library.api.Finish(queue.handle), "clFinish")
    }
}

/// 64-bit FNV-1a, for cache keys (stable across processes, unlike `Hasher`).
func fnv1a(_ text: String) -> String { String(fnv1a64(Array(text.utf8)), radix: 16) }

/// Built program binaries on disk, so a second process does not pay the build.
///
/// Location: `$ATTENTIONKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/attentionkit`, else
/// `~/.cache/attentionkit`, under `opencl/`. `ATTENTIONKIT_OPENCL_DISK_CACHE=0` turns it off.
/// One file per device, driver and program: an 8-byte magic, the payload's length and FNV-1a hash
/// (little-endian UInt64s), then the driver's binary. A file that is short, foreign, truncated or
/// altered is never handed to the driver; it and a binary the driver refuses are ignored with the
/// reason (`OpenCLDevice.programCacheNotes`), and the program is rebuilt and the file replaced.
package enum ProgramDiskCache {
    static let magic = Array("AKCLBIN1".utf8)

    package static var directory: URL? {
        let configuration = AttentionConfiguration.process
        guard configuration.openCLDiskCache else { return nil }
        return configuration.cacheDirectory?.appendingPathComponent("opencl")
    }

    static func file(in directory: URL, for info: OpenCLDeviceInfo, key: String) -> URL {
        let identity = [
            info.platformName, info.platformVersion, info.name, info.driverVersion, info.deviceVersion, key,
        ]
        return directory.appendingPathComponent(fnv1a(identity.joined(separator: "\u{1}")) + ".bin")
    }

    package enum Entry: Equatable {
        case missing
        case unusable(String)
        case binary([UInt8])
    }

    package static func read(_ file: URL) -> Entry {
        var isFolder: ObjCBool = false
        guard FileManager.default.fileExists(atPath: file.path, isDirectory: &isFolder) else { return .missing }
        guard !isFolder.boolValue else { return .unusable("a folder, not a file") }
        // Checked before reading: Foundation's Data(contentsOf:) leaks a buffer on an empty file.
        let size = (try? FileManager.default.attributesOfItem(atPath: file.path)[.size] as? Int) ?? nil
        guard size != 0 else { return .unusable("not a program cache file: 0 bytes without the AKCLBIN1 header") }
        guard let data = try? Data(contentsOf: file) else { return .unusable("unreadable") }
        let bytes = [UInt8](data)
        guard bytes.count >= 24, Array(bytes[0..<8]) == magic else {
            return .unusable("not a program cache file: \(bytes.count) bytes without the AKCLBIN1 header")
        }
        let length = UInt64(littleEndianBytes: bytes[8..<16])
        let hash = UInt64(littleEndianBytes: bytes[16..<24])
        guard length == UInt64(bytes.count - 24) else {
            return .unusable("truncated: header says \(length) bytes of binary, file has \(bytes.count - 24)")
        }
        let payload = Array(bytes[24...])
        guard !payload.isEmpty else { return .unusable("empty binary") }
        guard fnv1a64(payload) == hash else { return .unusable("checksum mismatch") }
        return .binary(payload)
    }

    /// Writes `payload` with its header (atomically); the reason when it could not.
    static func write(_ payload: [UInt8], to file: URL) -> String? {
        var bytes = magic
        bytes.reserveCapacity(24 + payload.count)
        for value in [UInt64(payload.count), fnv1a64(payload)] {
            withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
        }
        bytes.append(contentsOf: payload)
        do {
            try FileManager.default.createDirectory(
                at: file.deletingLastPathComponent(), withIntermediateDirectories: true)
            try Data(bytes).write(to: file, options: .atomic)
            return nil
        } catch {
            // The disk cache is an optimisation: an unwritable cache folder only costs build time.
            return error.localizedDescription
        }
    }
}

/// 64-bit FNV-1a of bytes.
func fnv1a64(_ bytes: [UInt8]) -> UInt64 {
    var hash: UInt64 = 0xcbf2_9ce4_8422_2325
    for byte in bytes {
        hash ^= UInt64(byte)
        hash = hash &* 0x100_0000_01b3
    }
    return hash
}

extension UInt64 {
    init(littleEndianBytes bytes: ArraySlice<UInt8>) {
        var value: UInt64 = 0
        for (shift, byte) in bytes.enumerated() { value |= UInt64(byte) << (8 * UInt64(shift)) }
        self = value
    }
}
