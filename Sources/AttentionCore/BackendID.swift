/// Which backend: the one name for a backend used by the protocol, the profiles, the dispatcher,
/// the `ATTENTIONKIT_BACKEND` override and the command line. Written `naive`, `blas`, `opencl:N`
/// (`opencl` alone means device 0) and `multi:A+B+...` (one call split across the backends A, B, ...);
/// this file is the only place that formats or parses those names.
public enum BackendID: Hashable, Sendable, Codable, LosslessStringConvertible {
    /// The float64 reference.
    case naive
    /// OpenBLAS tiles and the CPU kernels.
    case blas
    /// OpenCL kernels on device `device` (an index into the machine's OpenCL devices).
    case opencl(device: Int)
    /// One call split across several backends (`MultiDeviceBackend`), in this order; never nested.
    case multi([BackendID])

    private static let openCLPrefix = "opencl:"
    private static let multiPrefix = "multi:"

    public var description: String {
        switch self {
        case .naive: return "naive"
        case .blas: return "blas"
        case .opencl(let device): return Self.openCLPrefix + String(device)
        case .multi(let members): return Self.multiPrefix + members.map(\.description).joined(separator: "+")
        }
    }

    /// The name without the device ("naive", "blas", "opencl").
    public var family: String {
        switch self {
        case .naive: return "naive"
        case .blas: return "blas"
        case .opencl: return "opencl"
        case .multi: return "multi"
        }
    }

    /// Parses `naive`, `blas`, `opencl`, `opencl:N` or `multi:A+B+...` (case-insensitive; at least two
    /// distinct members, none of them `multi`).
    public init(parsing text: String) throws(AttentionError) {
        let name = text.lowercased()
        if name.hasPrefix(Self.multiPrefix) {
            let parts = name.dropFirst(Self.multiPrefix.count).split(separator: "+", omittingEmptySubsequences: false)
            var members: [BackendID] = []
            for part in parts {
                guard !part.hasPrefix(Self.multiPrefix) else {
                    throw .unknownBackend(name: text, reason: "multi backends do not nest")
                }
                let member = try BackendID(parsing: String(part))
                guard !members.contains(member) else {
                    throw .unknownBackend(name: text, reason: "\(member) is listed twice")
                }
                members.append(member)
            }
            guard members.count >= 2 else {
                throw .unknownBackend(
                    name: text, reason: "multi needs at least two backends, as in multi:blas+opencl:0")
            }
            self = .multi(members)
            return
        }
        switch name {
        case "naive": self = .naive
        case "blas": self = .blas
        case "opencl": self = .opencl(device: 0)
        default:
            guard name.hasPrefix(Self.openCLPrefix) else {
                throw .unknownBackend(name: text, reason: "expected naive, blas, opencl, opencl:N or multi:A+B")
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
