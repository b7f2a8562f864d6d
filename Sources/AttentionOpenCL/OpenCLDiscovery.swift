import COpenCL
import Foundation

/// Finding OpenCL devices.
public enum OpenCLRuntime {
    /// Every device of every platform, in platform order, or why there are none.
    /// Uses the process-wide library (see `OpenCLLibrary.shared`) and is computed once.
    public static let devices: Result<[OpenCLDevice], OpenCLUnavailable> = {
        switch OpenCLLibrary.shared {
        case .success(let library): return discover(library, programCache: ProgramDiskCache.directory)
        case .failure(let reason): return .failure(reason)
        }
    }()

    /// The devices, or an empty list (with no reason).
    public static var availableDevices: [OpenCLDevice] { (try? devices.get()) ?? [] }

    /// Discovers devices through the OpenCL library at `libraryPath` (tests, other vendors' loaders);
    /// their built programs are kept in this process's cache folder.
    public static func discover(libraryPath: String?) -> Result<[OpenCLDevice], OpenCLUnavailable> {
        discover(libraryPath: libraryPath, programCache: ProgramDiskCache.directory)
    }

    /// The same, with the folder their built programs are kept in (nil: not kept).
    public static func discover(libraryPath: String?, programCache: URL?) -> Result<[OpenCLDevice], OpenCLUnavailable> {
        OpenCLLibrary.load(path: libraryPath).flatMap { discover($0, programCache: programCache) }
    }

    static func discover(_ library: OpenCLLibrary, programCache: URL?)
        -> Result<[OpenCLDevice], OpenCLUnavailable>
    {
        let api = library.api
        var platformCount: cl_uint = 0
        let status = api.GetPlatformIDs(0, nil, &platformCount)
        if status == CL_PLATFORM_NOT_FOUND_KHR || (status == CL_SUCCESS && platformCount == 0) {
            return .failure(
                OpenCLUnavailable(
                    reason:
                        "no OpenCL platform: the ICD loader found no vendor driver (clGetPlatformIDs: "
                        + "CL_PLATFORM_NOT_FOUND_KHR); install one, e.g. pocl-opencl-icd"
                ))
        }
        guard status == CL_SUCCESS else {
            return .failure(
                OpenCLUnavailable(
                    reason: "clGetPlatformIDs failed with \(OpenCLError(code: status, operation: "").name)"))
        }
        var platforms = [cl_platform_id?](repeating: nil, count: Int(platformCount))
        guard api.GetPlatformIDs(platformCount, &platforms, nil) == CL_SUCCESS else {
            return .failure(OpenCLUnavailable(reason: "clGetPlatformIDs failed to list \(platformCount) platforms"))
        }
        var devices: [OpenCLDevice] = []
        for case let platform? in platforms {
            var count: cl_uint = 0
            guard api.GetDeviceIDs(platform, cl_device_type(CL_DEVICE_TYPE_ALL), 0, nil, &count) == CL_SUCCESS,
                count > 0
            else { continue }
            var ids = [cl_device_id?](repeating: nil, count: Int(count))
            guard api.GetDeviceIDs(platform, cl_device_type(CL_DEVICE_TYPE_ALL), count, &ids, nil) == CL_SUCCESS else {
                continue
            }
            for case let id? in ids {
                let info = describe(id, platform: platform, index: devices.count, api: api)
                devices.append(OpenCLDevice(id: id, info: info, library: library, programCache: programCache))
            }
        }
        guard !devices.isEmpty else {
            return .failure(OpenCLUnavailable(reason: "OpenCL platforms found (\(platformCount)) but no devices"))
        }
        return .success(devices)
    }

    private static func describe(_ id: cl_device_id, platform: cl_platform_id, index: Int, api: AKCLFunctions)
        -> OpenCLDeviceInfo
    {
        func platformString(_ param: Int32) -> String {
            var size = 0
            guard api.GetPlatformInfo(platform, cl_platform_info(param), 0, nil, &size) == CL_SUCCESS, size > 0 else {
                return ""
            }
            var bytes = [CChar](repeating: 0, count: size)
            _ = api.GetPlatformInfo(platform, cl_platform_info(param), size, &bytes, nil)
            return String(cChars: bytes).trimmingCharacters(in: .whitespaces)
        }
        func string(_ param: Int32) -> String {
            var size = 0
            guard api.GetDeviceInfo(id, cl_device_info(param), 0, nil, &size) == CL_SUCCESS, size > 0 else { return "" }
            var bytes = [CChar](repeating: 0, count: size)
            _ = api.GetDeviceInfo(id, cl_device_info(param), size, &bytes, nil)
            return String(cChars: bytes).trimmingCharacters(in: .whitespaces)
        }
        func value<T: FixedWidthInteger>(_ param: Int32, as: T.Type) -> T {
            var result: T = 0
            _ = api.GetDeviceInfo(id, cl_device_info(param), MemoryLayout<T>.size, &result, nil)
            return result
        }
        let type = value(CL_DEVICE_TYPE, as: cl_device_type.self)
        var typeNames: [String] = []
        if type & cl_device_type(CL_DEVICE_TYPE_CPU) != 0 { typeNames.append("CPU") }
        if type & cl_device_type(CL_DEVICE_TYPE_GPU) != 0 { typeNames.append("GPU") }
        if type & cl_device_type(CL_DEVICE_TYPE_ACCELERATOR) != 0 { typeNames.append("ACCELERATOR") }
        if typeNames.isEmpty { typeNames.append("OTHER") }
        let extensions = string(CL_DEVICE_EXTENSIONS).split(separator: " ").map(String.init)
        return OpenCLDeviceInfo(
            index: index,
            platformName: platformString(CL_PLATFORM_NAME), platformVendor: platformString(CL_PLATFORM_VENDOR),
            platformVersion: platformString(CL_PLATFORM_VERSION),
            name: string(CL_DEVICE_NAME), vendor: string(CL_DEVICE_VENDOR), type: typeNames.joined(separator: "+"),
            driverVersion: string(CL_DRIVER_VERSION), deviceVersion: string(CL_DEVICE_VERSION),
            openCLCVersion: string(CL_DEVICE_OPENCL_C_VERSION),
            computeUnits: Int(value(CL_DEVICE_MAX_COMPUTE_UNITS, as: cl_uint.self)),
            clockMHz: Int(value(CL_DEVICE_MAX_CLOCK_FREQUENCY, as: cl_uint.self)),
            globalMemoryBytes: value(CL_DEVICE_GLOBAL_MEM_SIZE, as: cl_ulong.self),
            maxAllocationBytes: value(CL_DEVICE_MAX_MEM_ALLOC_SIZE, as: cl_ulong.self),
            localMemoryBytes: value(CL_DEVICE_LOCAL_MEM_SIZE, as: cl_ulong.self),
            maxWorkGroupSize: Int(value(CL_DEVICE_MAX_WORK_GROUP_SIZE, as: Int.self)),
            preferredFloatVectorWidth: Int(value(CL_DEVICE_PREFERRED_VECTOR_WIDTH_FLOAT, as: cl_uint.self)),
            nativeFloatVectorWidth: Int(value(CL_DEVICE_NATIVE_VECTOR_WIDTH_FLOAT, as: cl_uint.self)),
            supportsFP16: extensions.contains("cl_khr_fp16"),
            supportsSubgroups: extensions.contains("cl_khr_subgroups") || extensions.contains("cl_intel_subgroups"),
            hostUnifiedMemory: value(CL_DEVICE_HOST_UNIFIED_MEMORY, as: cl_bool.self) != 0,
            extensions: extensions)
    }
}
