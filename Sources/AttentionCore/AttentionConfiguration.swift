import Foundation

/// Everything AttentionKit takes from its environment, read in one place.
///
/// `AttentionConfiguration.process` is read once, from the process environment, the first time
/// anything needs it; libraries and tests that want other settings build their own value with
/// `init(environment:)` and pass it explicitly (to `Dispatcher(configuration:profile:)`,
/// `MachineProfile.load(configuration:)`, `CPUKernels.resolve(_:)`). The variables:
///
/// - `ATTENTIONKIT_BACKEND`: `naive`, `blas`, `opencl`, `opencl:N` force that backend for `.auto`
///   (`auto` or empty: no override).
/// - `ATTENTIONKIT_CPU_ISA`: `baseline`, `avx2`, `avx512`, `neon` force a CPU kernel variant.
/// - `ATTENTIONKIT_OPENCL_LIBRARY`: the OpenCL ICD loader to open instead of `libOpenCL.so.1`.
/// - `ATTENTIONKIT_CACHE_DIR`: where built OpenCL programs and the tuned profile live (else
///   `$XDG_CACHE_HOME/attentionkit`, else `~/.cache/attentionkit`).
/// - `ATTENTIONKIT_OPENCL_DISK_CACHE`: `0` turns the on-disk cache of OpenCL program binaries off.
///
/// A value that cannot be parsed is kept as the error, raised by whoever uses the setting.
public struct AttentionConfiguration: Sendable, Equatable {
    public static let backendVariable = "ATTENTIONKIT_BACKEND"
    public static let cpuISAVariable = "ATTENTIONKIT_CPU_ISA"
    public static let openCLLibraryVariable = "ATTENTIONKIT_OPENCL_LIBRARY"
    public static let cacheDirectoryVariable = "ATTENTIONKIT_CACHE_DIR"
    public static let openCLDiskCacheVariable = "ATTENTIONKIT_OPENCL_DISK_CACHE"

    /// The backend every `.auto` selection is forced to, if any.
    public var backendOverride: Result<BackendID?, AttentionError>
    /// The CPU kernel variant to use instead of the widest supported one, if any.
    public var cpuISA: Result<CPUISA?, AttentionError>
    /// The OpenCL loader to open (nil: `libOpenCL.so.1` through the system search).
    public var openCLLibraryPath: String?
    /// Where files are kept between processes (nil: nowhere could be determined).
    public var cacheDirectory: URL?
    /// Whether built OpenCL programs are kept on disk.
    public var openCLDiskCache: Bool

    public init(
        backendOverride: BackendID? = nil, cpuISA: CPUISA? = nil, openCLLibraryPath: String? = nil,
        cacheDirectory: URL? = nil, openCLDiskCache: Bool = true
    ) {
        self.backendOverride = .success(backendOverride)
        self.cpuISA = .success(cpuISA)
        self.openCLLibraryPath = openCLLibraryPath
        self.cacheDirectory = cacheDirectory
        self.openCLDiskCache = openCLDiskCache
    }

    /// The settings `environment` describes (see the table above).
    public init(environment: [String: String]) {
        self.init()
        if let value = environment[Self.backendVariable], !value.isEmpty, value.lowercased() != "auto" {
            do throws(AttentionError) {
                backendOverride = .success(try BackendID(parsing: value))
            } catch {
                backendOverride = .failure(
                    .invalidConfiguration(setting: Self.backendVariable, value: value, reason: error.description))
            }
        }
        if let value = environment[Self.cpuISAVariable], !value.isEmpty {
            if let isa = CPUISA(rawValue: value.lowercased()) {
                cpuISA = .success(isa)
            } else {
                let names = CPUISA.allCases.map(\.rawValue).joined(separator: ", ")
                cpuISA = .failure(
                    .invalidConfiguration(
                        setting: Self.cpuISAVariable, value: value, reason: "unknown instruction set (one of \(names))")
                )
            }
        }
        if let path = environment[Self.openCLLibraryVariable], !path.isEmpty { openCLLibraryPath = path }
        openCLDiskCache = environment[Self.openCLDiskCacheVariable] != "0"
        if let dir = environment[Self.cacheDirectoryVariable], !dir.isEmpty {
            cacheDirectory = URL(fileURLWithPath: dir)
        } else if let xdg = environment["XDG_CACHE_HOME"], !xdg.isEmpty {
            cacheDirectory = URL(fileURLWithPath: xdg).appendingPathComponent("attentionkit")
        } else if let home = environment["HOME"], !home.isEmpty {
            cacheDirectory = URL(fileURLWithPath: home).appendingPathComponent(".cache/attentionkit")
        }
    }

    /// This process's settings, from its environment when first used.
    public static let process = AttentionConfiguration(environment: ProcessInfo.processInfo.environment)
}
