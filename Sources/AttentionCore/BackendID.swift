/// Which backend: the one name for a backend used by the protocol, the profiles, the dispatcher,
/// the `ATTENTIONKIT_BACKEND` override and the command line. Written `naive`, `blas`, `opencl:N`
/// (`opencl` alone means device 0); this file is the only place that formats or parses those names.
public enum BackendID: Hashable, Sendable, Codable, LosslessStringConvertible {
    /// The float64 reference.
    case naive
    /// OpenBLAS tiles and the CPU kernels.
    case blas
    /// OpenCL kernels on device `device` (an index into the machine's OpenCL devices).
    case opencl(device: Int)

    private static let openCLPrefix = "opencl:"

    public var description: String {
        switch self {
        case .naive: return "naive"
        case .blas: return "blas"
        case .opencl(let device): return Self.openCLPrefix + String(device)
        }
    }

    /// The name without the device ("naive", "blas", "opencl").
    public var family: String {
        switch self {
        case .naive: return "naive"
        case .blas: return "blas"
        case .opencl: return "opencl"
        }
    }

    /// Parses `naive`, `blas`, `opencl` or `opencl:N` (case-insensitive).
    public init(parsing text: String) throws(AttentionError) {
        let name = text.lowercased()
        switch name {
        case "naive": self = .naive
        case "blas": self = .blas
        case "opencl": self = .opencl(device: 0)
        default:
            guard name.hasPrefix(Self.openCLPrefix) else {
                throw .unknownBackend(name: text, reason: "expected naive, blas, opencl or opencl:N")
            }
            guard let device = Int(name.dropFirst(Self.openCLPrefix.count)), device >= 0 else {
                throw .unknownBackend(name: text, reason: "the OpenCL device must be a number >= 0, as in opencl:1")
            }
            self = .opencl(device: device)
        }
    }

    public init?(_ description: String) {
        guard let id = try? BackendID(parsing: description) else { return nil }
        self = id
    }

    public init(from decoder: any Decoder) throws {
        let text = try decoder.singleValueContainer().decode(String.self)
        do {
            self = try BackendID(parsing: text)
        } catch {
            throw DecodingError.dataCorrupted(
                .init(codingPath: decoder.codingPath, debugDescription: error.description))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(description)
    }
}
