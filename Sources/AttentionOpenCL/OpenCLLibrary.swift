import AttentionCore
import COpenCL

/// The OpenCL entry points, loaded at run time from the ICD loader (`libOpenCL.so.1`).
///
/// Nothing links libOpenCL, so a binary starts on machines without OpenCL; there the backend is
/// simply unavailable with the reason. `ATTENTIONKIT_OPENCL_LIBRARY=/path/libOpenCL.so` loads another
/// library.
package final class OpenCLLibrary: @unchecked Sendable {
    /// Read-only after init.
    package let api: AKCLFunctions
    package let path: String

    private init(api: AKCLFunctions, path: String) {
        self.api = api
        self.path = path
    }

    /// Loads the library at `path` (nil: the default search). Every call opens it again.
    package static func load(path: String?) -> Result<OpenCLLibrary, OpenCLUnavailable> {
        var api = AKCLFunctions()
        var message = [CChar](repeating: 0, count: 512)
        let status = message.withUnsafeMutableBufferPointer { buffer in
            akcl_load(path, &api, buffer.baseAddress, buffer.count)
        }
        guard status == 0 else {
            let reason = String(cChars: message)
            return .failure(OpenCLUnavailable(reason: reason))
        }
        return .success(OpenCLLibrary(api: api, path: path ?? "libOpenCL.so.1"))
    }

    /// The process-wide library (default path, or `ATTENTIONKIT_OPENCL_LIBRARY` through
    /// `AttentionConfiguration.process`), loaded once.
    package static let shared: Result<OpenCLLibrary, OpenCLUnavailable> =
        load(path: AttentionConfiguration.process.openCLLibraryPath)
}

/// Why OpenCL cannot be used on this machine (no loader library, no platform, no device...).
public struct OpenCLUnavailable: Error, Equatable, Sendable, CustomStringConvertible {
    public let reason: String
    public init(reason: String) { self.reason = reason }
    public var description: String { reason }
}
