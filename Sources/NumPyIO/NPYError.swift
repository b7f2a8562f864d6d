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
        case let .cannotOpen(f, _), let .cannotWrite(f, _), let .notNPY(f), let .unsupportedVersion(f, _, _),
             let .truncated(f, _), let .malformedHeader(f, _), let .unsupportedDType(f, _), let .fortranOrder(f),
             let .sizeMismatch(f, _, _, _), let .tooLarge(f, _), let .wrongKind(f, _, _):
            return f
        }
    }

    public var description: String {
        switch self {
        case let .cannotOpen(f, reason): return "\(f): cannot read: \(reason)"
        case let .cannotWrite(f, reason): return "\(f): cannot write: \(reason)"
        case let .notNPY(f): return "\(f): not a NumPy .npy file (missing \\x93NUMPY magic)"
        case let .unsupportedVersion(f, major, minor): return "\(f): unsupported .npy format version \(major).\(minor) (supported: 1.0, 2.0, 3.0)"
        case let .truncated(f, detail): return "\(f): file is truncated: \(detail)"
        case let .malformedHeader(f, detail): return "\(f): malformed .npy header: \(detail)"
        case let .unsupportedDType(f, dtype):
            return "\(f): unsupported dtype '\(dtype)' (supported: little-endian <f4, <f8, <f2, and |b1 for masks)"
        case let .fortranOrder(f): return "\(f): Fortran-ordered arrays are not supported; save with np.ascontiguousarray"
        case let .sizeMismatch(f, shape, expected, actual):
            return "\(f): header says shape \(shape) (\(expected) data bytes) but the file holds \(actual) data bytes"
        case let .tooLarge(f, shape): return "\(f): shape \(shape) is too large to address"
        case let .wrongKind(f, expected, actual): return "\(f): expected \(expected) data, found \(actual)"
        }
    }
}
