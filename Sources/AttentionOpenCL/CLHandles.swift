import COpenCL

// Every OpenCL object is owned by a final class that releases it in deinit. They are
// `@unchecked Sendable`: the handles themselves are thread-safe in OpenCL except `cl_kernel`
// argument setting, which callers serialise per device (see `OpenCLDevice.withExecution`).

package final class CLContext: @unchecked Sendable {
    package let handle: cl_context
    let library: OpenCLLibrary
    init(_ handle: cl_context, library: OpenCLLibrary) {
        self.handle = handle
        self.library = library
    }
    deinit { _ = library.api.ReleaseContext(handle) }
}

package final class CLQueue: @unchecked Sendable {
    package let handle: cl_command_queue
    let library: OpenCLLibrary
    init(_ handle: cl_command_queue, library: OpenCLLibrary) {
        self.handle = handle
        self.library = library
    }
    deinit { _ = library.api.ReleaseCommandQueue(handle) }
}

/// A device buffer of `byteCount` bytes.
package final class CLBuffer: @unchecked Sendable {
    package let handle: cl_mem
    package let byteCount: Int
    let library: OpenCLLibrary
    init(_ handle: cl_mem, byteCount: Int, library: OpenCLLibrary) {
        self.handle = handle
        self.byteCount = byteCount
        self.library = library
    }
    deinit { _ = library.api.ReleaseMemObject(handle) }
}

package final class CLProgram: @unchecked Sendable {
    package let handle: cl_program
    let library: OpenCLLibrary
    init(_ handle: cl_program, library: OpenCLLibrary) {
        self.handle = handle
        self.library = library
    }
    deinit { _ = library.api.ReleaseProgram(handle) }
}

package final class CLKernel: @unchecked Sendable {
    package let handle: cl_kernel
    package let name: String
    let library: OpenCLLibrary
    init(_ handle: cl_kernel, name: String, library: OpenCLLibrary) {
        self.handle = handle
        self.name = name
        self.library = library
    }
    deinit { _ = library.api.ReleaseKernel(handle) }

    /// Sets argument `index` to a buffer.
    func set(_ index: Int, _ buffer: CLBuffer) throws(OpenCLError) {
        var mem: cl_mem? = buffer.handle
        try check(
            library.api.SetKernelArg(handle, cl_uint(index), MemoryLayout<cl_mem>.size, &mem),
            "clSetKernelArg(\(name), \(index))")
    }

    /// Sets argument `index` to a plain value (Int32, Float, AKParams).
    func set<T: BitwiseCopyable>(_ index: Int, value: T) throws(OpenCLError) {
        let status = withUnsafeBytes(of: value) { raw in
            library.api.SetKernelArg(handle, cl_uint(index), raw.count, raw.baseAddress)
        }
        try check(status, "clSetKernelArg(\(name), \(index))")
    }

    /// Sets argument `index` to `bytes` of local memory.
    func setLocal(_ index: Int, bytes: Int) throws(OpenCLError) {
        try check(
            library.api.SetKernelArg(handle, cl_uint(index), bytes, nil), "clSetKernelArg(\(name), \(index), local)")
    }
}
