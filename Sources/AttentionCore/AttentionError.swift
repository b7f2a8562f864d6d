/// Everything that can be wrong with an attention call, named precisely enough to fix it.
///
/// Every public entry point of AttentionKit throws this type (typed throws), so callers can switch
/// over the cases; `description` is a one-line English message suitable for a command-line tool.
public enum AttentionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// A tensor does not have the rank the contract requires (Q, K, V: 4; a mask: 2 to 4).
    case invalidRank(tensor: String, expected: String, actual: [Int])
    /// A dimension of size zero (every dimension must be at least 1).
    case zeroSizedDimension(tensor: String, shape: [Int])
    /// A negative dimension, or a shape whose element count overflows `Int`.
    case invalidShape(tensor: String, shape: [Int])
    /// The storage holds a different number of elements than the shape says.
    case storageSizeMismatch(tensor: String, shape: [Int], expectedCount: Int, actualCount: Int)
    /// Two tensors disagree on a dimension they must share (batch, head dimension, key length...).
    case shapeMismatch(String)
    /// Hq is not a multiple of Hkv (grouped-query attention needs whole groups).
    case headsNotDivisible(queryHeads: Int, keyValueHeads: Int)
    /// The mask cannot be broadcast to [B, Hq, Nq, Nk].
    case maskNotBroadcastable(maskShape: [Int], target: [Int])
    /// A window bound below -1 (-1 means unbounded).
    case invalidWindow(left: Int, right: Int)
    /// The scale is NaN or infinite.
    case invalidScale(Float)
    /// The softcap is not a finite number greater than zero.
    case invalidSoftcap(Float)
    /// A caller-provided output buffer has the wrong number of elements.
    case outputSizeMismatch(buffer: String, expectedCount: Int, actualCount: Int)
    /// The backend cannot run this problem; `reason` says why.
    case unsupported(backend: String, reason: String)
    /// The backend failed at run time (device error, out of memory...).
    case backendFailure(backend: String, message: String)
    /// A setting (an environment variable, a backend or instruction-set name) has a value this
    /// machine cannot honour; `reason` says why.
    case invalidConfiguration(setting: String, value: String, reason: String)
    /// A tensor's storage type differs from the one the problem declares (`AttentionProblem.storage`).
    case storageTypeMismatch(tensor: String, expected: String, actual: String)
    /// Strides that are negative, overflow, or reach past the tensor's buffer.
    case invalidStrides(tensor: String, strides: [Int], reason: String)
    /// The output would overlap itself or an input.
    case overlappingOutput(String)
    /// A backend name that is not `naive`, `blas`, `opencl` or `opencl:N`.
    case unknownBackend(name: String, reason: String)
    /// A file AttentionKit keeps (the tuned profile) could not be read or written.
    case fileError(path: String, reason: String)
    /// Sequence offsets (`cuSeqlensQ`, `cuSeqlensK`) that are not S + 1 non-decreasing values from 0
    /// within the packed tensor; `index` is the first offending entry.
    case invalidSequenceOffsets(name: String, index: Int, reason: String)
    /// A cache length below 0 or beyond what the cache (capacity or block table) holds.
    case invalidCacheLength(sequence: Int, length: Int, limit: Int)
    /// A page table entry that names no page of the pool, or an unusable page size.
    case invalidPageTable(reason: String)
    /// An option this form of batch cannot honour (a mask for a batch of sequences).
    case unsupportedOption(String)
    /// The K/V cache's page pool cannot hold what was asked; nothing was changed.
    case cacheFull(neededPages: Int, freePages: Int)
    /// A K/V cache call named a sequence the cache does not hold.
    case unknownSequence(Int)

    public var description: String {
        switch self {
        case .invalidRank(let tensor, let expected, let actual):
            return "\(tensor) must have rank \(expected), got shape \(actual) (rank \(actual.count))"
        case .zeroSizedDimension(let tensor, let shape):
            return "\(tensor) has a zero-sized dimension: shape \(shape); every dimension must be >= 1"
        case .invalidShape(let tensor, let shape):
            return "\(tensor) has an invalid shape \(shape) (negative dimension or too many elements)"
        case .storageSizeMismatch(let tensor, let shape, let expected, let actual):
            return "\(tensor) has shape \(shape), which needs \(expected) elements, but its storage holds \(actual)"
        case .shapeMismatch(let message):
            return "shape mismatch: \(message)"
        case .headsNotDivisible(let hq, let hkv):
            return "query heads (\(hq)) must be a multiple of key/value heads (\(hkv))"
        case .maskNotBroadcastable(let maskShape, let target):
            return "mask of shape \(maskShape) cannot be broadcast to \(target) "
                + "(expected [B|1, Hq|1, Nq, Nk], leading dimensions may be omitted)"
        case .invalidWindow(let left, let right):
            return "window (\(left), \(right)) is invalid: each side must be >= 0, or -1 for unbounded"
        case .invalidScale(let scale):
            return "scale must be a finite number, got \(scale)"
        case .invalidSoftcap(let cap):
            return "softcap must be a finite number > 0, got \(cap)"
        case .outputSizeMismatch(let buffer, let expected, let actual):
            return "output buffer \(buffer) must hold \(expected) elements, got \(actual)"
        case .unsupported(let backend, let reason):
            return "backend \(backend) cannot run this problem: \(reason)"
        case .backendFailure(let backend, let message):
            return "backend \(backend) failed: \(message)"
        case .invalidConfiguration(let setting, let value, let reason):
            return "\(setting)=\(value) cannot be used: \(reason)"
        case .storageTypeMismatch(let tensor, let expected, let actual):
            return "\(tensor) is stored as \(actual), but the problem declares \(expected)"
        case .invalidStrides(let tensor, let strides, let reason):
            return "\(tensor) strides (batch, head, sequence) = \(strides) are invalid: \(reason)"
        case .overlappingOutput(let message):
            return "overlapping output: \(message)"
        case .unknownBackend(let name, let reason):
            return "unknown backend '\(name)': \(reason)"
        case .fileError(let path, let reason):
            return "\(path): \(reason)"
        case .invalidSequenceOffsets(let name, let index, let reason):
            return "\(name)[\(index)] is invalid: \(reason)"
        case .invalidCacheLength(let sequence, let length, let limit):
            return "cache length \(length) of sequence \(sequence) is outside [0, \(limit)]"
        case .invalidPageTable(let reason):
            return "invalid page table: \(reason)"
        case .unsupportedOption(let message):
            return "unsupported option: \(message)"
        case .cacheFull(let needed, let free):
            return "the K/V cache is full: \(needed) more pages needed, \(free) free (nothing was changed)"
        case .unknownSequence(let id):
            return "the K/V cache holds no sequence \(id)"
        }
    }
}
