/// Why a `.npy` file could not be read or written. Every case names the file.
public enum NPYError: Error, Equatable, Sendable, CustomStringConvertible {
    case cannotOpen(file: String, reason: String)
    case cannotWrite(file: String, reason: String)
    case notNPY(file: String)
    case unsupportedVersion(file: String, major: UInt8, minor: UInt8)
    case truncated(file: String, detail: String)
    case malformedHeader(file: String, detail: String)
    case unsupportedDType(file: String, dtype: String)
    case fortranOrder(file: String)
    case sizeMismatch(file: String, shape: [Int], expectedBytes: Int, actualBytes: Int)
    case tooLarge(file: String, shape: [Int])
    case wrongKind(file: String, expected: String, actual: String)

    public var file: String {
        switch self {
        case .cannotOpen(let f, _), .cannotWrite(let f, _), .notNPY(let f), .unsupportedVersion(let f, _, _),
            .truncated(let f, _), .malformedHeader(let f, _), .unsupportedDType(let f, _), .fortranOrder(let f),
            .sizeMismatch(let f, _, _, _), .tooLarge(let f, _), .wrongKind(let f, _, _):
            return f
        }
    }

    public var description: String {
        switch self {
        case .cannotOpen(let f, let reason): return "\(f): cannot read: \(reason)"
        case .cannotWrite(let f, let reason): return "\(f): cannot write: \(reason)"
        case .notNPY(let f): return "\(f): not a NumPy .npy file (missing \\x93NUMPY magic)"
        case .unsupportedVersion(let f, let major, let minor):
            return "\(f): unsupported .npy format version \(major).\(minor) (supported: 1.0, 2.0, 3.0)"
        case .truncated(let f, let detail): return "\(f): file is truncated: \(detail)"
        case .malformedHeader(let f, let detail): return "\(f): malformed .npy header: \(detail)"
        case .unsupportedDType(let f, let dtype):
            return "\(f): unsupported dtype '\(dtype)' (supported: little-endian <f4, <f8, <f2, and |b1 for masks)"
        case .fortranOrder(let f):
            return "\(f): Fortran-ordered arrays are not supported; save with np.ascontiguousarray"
        case .sizeMismatch(let f, let shape, let expected, let actual):
            return "\(f): header says shape \(shape) (\(expected) data bytes) but the file holds \(actual) data bytes"
        case .tooLarge(let f, let shape): return "\(f): shape \(shape) is too large to address"
        case .wrongKind(let f, let expected, let actual): return "\(f): expected \(expected) data, found \(actual)"
        }
    }
}
