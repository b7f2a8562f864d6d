import COpenCL

/// An OpenCL status code, with its symbolic name, the call that returned it and, for failed
/// program builds, the build log.
public struct OpenCLError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The `cl_int` status (negative).
    public let code: Int32
    /// The OpenCL call or step that failed ("clBuildProgram", "clEnqueueNDRangeKernel(flash_attention)").
    public let operation: String
    /// The compiler's log when a program build failed.
    public let buildLog: String?

    public init(code: Int32, operation: String, buildLog: String? = nil) {
        self.code = code
        self.operation = operation
        self.buildLog = buildLog
    }

    /// `CL_OUT_OF_RESOURCES` and friends; `CL_UNKNOWN_ERROR(n)` for codes not in the table.
    public var name: String { Self.names[code] ?? "CL_UNKNOWN_ERROR(\(code))" }

    public var description: String {
        var text = "\(operation) failed with \(name)"
        if let log = buildLog, !log.isEmpty { text += "; build log:\n\(log)" }
        return text
    }

    public static let deviceNotFound: Int32 = -1
    public static let outOfResources: Int32 = -5
    public static let outOfHostMemory: Int32 = -6
    public static let buildProgramFailure: Int32 = -11
    public static let platformNotFound: Int32 = -1001

    static let names: [Int32: String] = [
        0: "CL_SUCCESS", -1: "CL_DEVICE_NOT_FOUND", -2: "CL_DEVICE_NOT_AVAILABLE", -3: "CL_COMPILER_NOT_AVAILABLE",
        -4: "CL_MEM_OBJECT_ALLOCATION_FAILURE", -5: "CL_OUT_OF_RESOURCES", -6: "CL_OUT_OF_HOST_MEMORY",
        -7: "CL_PROFILING_INFO_NOT_AVAILABLE", -8: "CL_MEM_COPY_OVERLAP", -9: "CL_IMAGE_FORMAT_MISMATCH",
        -10: "CL_IMAGE_FORMAT_NOT_SUPPORTED", -11: "CL_BUILD_PROGRAM_FAILURE", -12: "CL_MAP_FAILURE",
        -13: "CL_MISALIGNED_SUB_BUFFER_OFFSET", -14: "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST",
        -15: "CL_COMPILE_PROGRAM_FAILURE", -16: "CL_LINKER_NOT_AVAILABLE", -17: "CL_LINK_PROGRAM_FAILURE",
        -18: "CL_DEVICE_PARTITION_FAILED", -19: "CL_KERNEL_ARG_INFO_NOT_AVAILABLE",
        -30: "CL_INVALID_VALUE", -31: "CL_INVALID_DEVICE_TYPE", -32: "CL_INVALID_PLATFORM", -33: "CL_INVALID_DEVICE",
        -34: "CL_INVALID_CONTEXT", -35: "CL_INVALID_QUEUE_PROPERTIES", -36: "CL_INVALID_COMMAND_QUEUE",
        -37: "CL_INVALID_HOST_PTR", -38: "CL_INVALID_MEM_OBJECT", -39: "CL_INVALID_IMAGE_FORMAT_DESCRIPTOR",
        -40: "CL_INVALID_IMAGE_SIZE", -41: "CL_INVALID_SAMPLER", -42: "CL_INVALID_BINARY",
        -43: "CL_INVALID_BUILD_OPTIONS",
        -44: "CL_INVALID_PROGRAM", -45: "CL_INVALID_PROGRAM_EXECUTABLE", -46: "CL_INVALID_KERNEL_NAME",
        -47: "CL_INVALID_KERNEL_DEFINITION", -48: "CL_INVALID_KERNEL", -49: "CL_INVALID_ARG_INDEX",
        -50: "CL_INVALID_ARG_VALUE", -51: "CL_INVALID_ARG_SIZE", -52: "CL_INVALID_KERNEL_ARGS",
        -53: "CL_INVALID_WORK_DIMENSION", -54: "CL_INVALID_WORK_GROUP_SIZE", -55: "CL_INVALID_WORK_ITEM_SIZE",
        -56: "CL_INVALID_GLOBAL_OFFSET", -57: "CL_INVALID_EVENT_WAIT_LIST", -58: "CL_INVALID_EVENT",
        -59: "CL_INVALID_OPERATION", -60: "CL_INVALID_GL_OBJECT", -61: "CL_INVALID_BUFFER_SIZE",
        -62: "CL_INVALID_MIP_LEVEL", -63: "CL_INVALID_GLOBAL_WORK_SIZE", -64: "CL_INVALID_PROPERTY",
        -1001: "CL_PLATFORM_NOT_FOUND_KHR",
    ]
}

/// Throws an `OpenCLError` unless `status` is `CL_SUCCESS`.
@inline(__always)
func check(_ status: cl_int, _ operation: @autoclosure () -> String) throws(OpenCLError) {
    if status != CL_SUCCESS { throw OpenCLError(code: status, operation: operation()) }
}
