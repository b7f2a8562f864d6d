import AttentionKit
import CAttentionKitABI

/// The struct behind `pointer`, once its leading `struct_size` says the caller's struct holds every
/// field this version reads (a larger one, from a later header, is fine).
func versioned<T>(_ pointer: UnsafePointer<T>, name: String, initializer: String) throws(CallError) -> T {
    let size = Int(UnsafeRawPointer(pointer).load(as: UInt32.self))
    guard size >= MemoryLayout<T>.size else {
        throw CallError(
            .invalidArgument,
            "\(name).struct_size is \(size), expected at least \(MemoryLayout<T>.size) (start from \(initializer))")
    }
    return pointer.pointee
}

/// A C tensor descriptor, checked and turned into the library's terms.
struct Operand {
    let name: String
    let shape: [Int]
    /// Element strides in the descriptor's own dimension order.
    let strides: [Int]
    let storage: StorageType
    let address: UnsafeMutableRawPointer?
    /// Elements from the first to the last one the descriptor names (0 when empty).
    let span: Int

    /// Reads `pointer` as a Q/K/V/O operand of rank `rank` (last dimension contiguous).
    init(_ pointer: UnsafePointer<attentionkit_tensor>?, name: String, rank: Int) throws(CallError) {
        guard let pointer else { throw CallError(.invalidArgument, "\(name) is NULL") }
        let tensor = pointer.pointee
        guard tensor.rank == Int32(rank) else {
            throw CallError(.invalidShape, "\(name) must have rank \(rank), got rank \(tensor.rank)")
        }
        let (shape, strides) = Self.dimensions(tensor, rank: rank)
        switch tensor.dtype {
        case Int32(ATTENTIONKIT_FLOAT32.rawValue): storage = .f32
        case Int32(ATTENTIONKIT_FLOAT16.rawValue): storage = .f16
        case Int32(ATTENTIONKIT_BFLOAT16.rawValue): storage = .bf16
        case Int32(ATTENTIONKIT_BOOL.rawValue):
            throw CallError(.invalidDType, "\(name): dtype BOOL is for masks only (use FLOAT32, FLOAT16 or BFLOAT16)")
        default:
            throw CallError(.invalidArgument, "\(name): unknown dtype \(tensor.dtype)")
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw CallError(.invalidShape, "\(name): negative dimension in shape \(shape)")
        }
        guard strides.allSatisfy({ $0 >= 0 }) else {
            throw CallError(.invalidShape, "\(name): strides must be >= 0, got \(strides)")
        }
        guard strides[rank - 1] == 1 || shape[rank - 1] <= 1 || shape.contains(0) else {
            throw CallError(
                .invalidShape, "\(name): the last dimension must be contiguous (stride 1), got strides \(strides)")
        }
        self.name = name
        self.shape = shape
        self.strides = strides
        self.address = tensor.data
        self.span = try Self.span(shape: shape, strides: strides, name: name)
        guard address != nil || span == 0 else { throw CallError(.invalidArgument, "\(name).data is NULL") }
    }

    /// The first `rank` entries of the descriptor's shape and strides.
    static func dimensions(_ tensor: attentionkit_tensor, rank: Int) -> (shape: [Int], strides: [Int]) {
        let shape = withUnsafeBytes(of: tensor.shape) { Array($0.bindMemory(to: Int64.self).prefix(rank)) }
        let strides = withUnsafeBytes(of: tensor.strides) { Array($0.bindMemory(to: Int64.self).prefix(rank)) }
        return (shape.map { Int($0) }, strides.map { Int($0) })
    }

    /// 1 + the largest offset the shape and strides reach, refusing overflow.
    static func span(shape: [Int], strides: [Int], name: String) throws(CallError) -> Int {
        guard !shape.contains(0) else { return 0 }
        var last = 0
        for (n, s) in zip(shape, strides) {
            let (product, o1) = (n - 1).multipliedReportingOverflow(by: s)
            let (sum, o2) = last.addingReportingOverflow(product)
            guard !o1, !o2 else {
                throw CallError(.invalidShape, "\(name): shape \(shape) with strides \(strides) overflows")
            }
            last = sum
        }
        return last + 1
    }

    /// The view the library reads, with the library's (batch, head, sequence) strides taken from the
    /// descriptor's dimensions at those positions.
    func view(batch: Int?, head: Int, sequence: Int) -> TensorView {
        let strides = Strides(
            batch: batch.map { self.strides[$0] } ?? 0, head: self.strides[head], sequence: self.strides[sequence])
        return TensorView(
            address: address ?? UnsafeMutableRawPointer(bitPattern: 16)!, storage: storage, strides: strides,
            capacity: span)
    }

    /// A [B, H, N, D] operand's view.
    var bhsd: TensorView { view(batch: 0, head: 1, sequence: 2) }
}

/// The storage types of Q, K/V and O, refusing K and V of different types.
func storageTypes(query: Operand, key: Operand, value: Operand, output: Operand) throws(CallError) -> StorageTypes {
    guard key.storage == value.storage else {
        throw CallError(
            .invalidDType, "key is \(key.storage) but value is \(value.storage): K and V must share a storage type")
    }
    return StorageTypes(query: query.storage, keyValue: key.storage, output: output.storage)
}

/// The options a C caller passed (NULL: the defaults). A mask is checked against `target`
/// ([B, Hq, Nq, Nk]) before anything is gathered, so a descriptor's shape never sizes an allocation
/// on its own; with no target (batches of sequences) masks are refused.
func attentionOptions(
    _ pointer: UnsafePointer<attentionkit_options>?, target: [Int]?
) throws(CallError) -> AttentionOptions {
    guard let pointer else { return AttentionOptions() }
    let c = try versioned(pointer, name: "options", initializer: "ATTENTIONKIT_OPTIONS_INIT")
    var options = AttentionOptions(causal: c.causal != 0)
    if c.window_left != -1 || c.window_right != -1 {
        options.window = AttentionWindow(left: Int(c.window_left), right: Int(c.window_right))
    }
    if c.scale != 0 { options.scale = c.scale }
    if c.softcap != 0 { options.softcap = c.softcap }
    if let mask = c.mask {
        guard let target else {
            throw CallError(
                .invalidOption,
                AttentionError.unsupportedOption("masks are not accepted for a batch of sequences").description)
        }
        options.mask = try attentionMask(mask.pointee, target: target)
    }
    return options
}

/// The most mask elements a call gathers (2^31: 2 GiB of booleans).
let maskElementLimit = 1 << 31

/// A mask descriptor gathered into the library's mask (masks are small next to K/V: Nq x Nk at
/// most per batch and head). Leading dimensions of stride 0 are broadcast, so an expanded PyTorch
/// mask is read once.
func attentionMask(_ tensor: attentionkit_tensor, target: [Int]) throws(CallError) -> AttentionMask {
    let boolean = tensor.dtype == Int32(ATTENTIONKIT_BOOL.rawValue)
    guard (0...3).contains(tensor.dtype) else {
        throw CallError(.invalidArgument, "mask: unknown dtype \(tensor.dtype)")
    }
    guard boolean || tensor.dtype == Int32(ATTENTIONKIT_FLOAT32.rawValue) else {
        throw CallError(.invalidDType, "mask: dtype must be BOOL or FLOAT32, got \(tensor.dtype)")
    }
    let rank = Int(tensor.rank)
    guard (2...4).contains(rank) else { throw CallError(.invalidShape, "mask must have rank 2 to 4, got \(rank)") }
    var (shape, strides) = Operand.dimensions(tensor, rank: rank)
    guard shape.allSatisfy({ $0 > 0 }) else { throw CallError(.invalidShape, "mask: empty or negative shape \(shape)") }
    guard strides.allSatisfy({ $0 >= 0 }) else {
        throw CallError(.invalidShape, "mask: strides must be >= 0, got \(strides)")
    }
    for d in 0..<(rank - 2) where strides[d] == 0 { shape[d] = 1 }
    let aligned = Array(target.suffix(rank))
    guard
        zip(shape, aligned).enumerated().allSatisfy({
            $0.element.0 == $0.element.1 || ($0.element.0 == 1 && $0.offset < rank - 2)
        })
    else {
        throw CallError(
            .invalidShape, AttentionError.maskNotBroadcastable(maskShape: shape, target: target).description)
    }
    _ = try Operand.span(shape: shape, strides: strides, name: "mask")  // refuses overflowing strides
    // The gathered copy is sized by the shape alone (strides of 0 broadcast): bound it.
    let count = shape.reduce(into: 1) { total, n in
        total = total.multipliedReportingOverflow(by: n).overflow ? .max : total * n
    }
    guard count <= maskElementLimit else {
        throw CallError(
            .invalidShape,
            "mask of shape \(shape) has \(count == .max ? "too many" : "\(count)") elements;"
                + " at most \(maskElementLimit) are accepted")
    }
    guard let data = tensor.data else { throw CallError(.invalidArgument, "mask.data is NULL") }
    // Row-major walk over the (collapsed) shape.
    let padded = [Int](repeating: 1, count: 4 - rank) + shape
    let paddedStrides = [Int](repeating: 0, count: 4 - rank) + strides
    func gather<T, R>(_ type: T.Type, _ convert: (T) -> R) -> [R] {
        let base = data.assumingMemoryBound(to: T.self)
        var out: [R] = []
        out.reserveCapacity(padded.reduce(1, *))
        for a in 0..<padded[0] {
            for b in 0..<padded[1] {
                for i in 0..<padded[2] {
                    let row = a * paddedStrides[0] + b * paddedStrides[1] + i * paddedStrides[2]
                    for j in 0..<padded[3] { out.append(convert(base[row + j * paddedStrides[3]])) }
                }
            }
        }
        return out
    }
    do throws(AttentionError) {
        if boolean { return try AttentionMask(shape: shape, allowed: gather(UInt8.self) { $0 != 0 }) }
        return try AttentionMask(shape: shape, additive: gather(Float.self) { $0 })
    } catch {
        throw CallError(error)
    }
}

/// The serving form a C caller described; `pageSize` is the pools' second dimension (paged only).
func sequenceLayout(_ c: attentionkit_sequences, pageSize: Int) throws(CallError) -> SequenceLayout {
    guard c.count >= 0, c.count <= Int64(Int32.max) else {
        throw CallError(.invalidShape, "sequences.count must be 0 to \(Int32.max), got \(c.count)")
    }
    let count = Int(c.count)
    func ints(_ pointer: UnsafePointer<Int32>?, _ n: Int, _ name: String) throws(CallError) -> [Int32] {
        guard n > 0 else { return [] }
        guard let pointer else { throw CallError(.invalidArgument, "sequences.\(name) is NULL") }
        return Array(UnsafeBufferPointer(start: pointer, count: n))
    }
    switch c.form {
    case Int32(ATTENTIONKIT_VARLEN.rawValue):
        return .packed(
            queryOffsets: try ints(c.query_offsets, count + 1, "query_offsets"),
            keyOffsets: try ints(c.key_offsets, count + 1, "key_offsets"))
    case Int32(ATTENTIONKIT_CACHE_LENGTHS.rawValue):
        return .cacheLengths(try ints(c.lengths, count, "lengths"))
    case Int32(ATTENTIONKIT_PAGED.rawValue):
        guard c.max_pages > 0, c.max_pages <= Int64(Int32.max) else {
            throw CallError(.invalidShape, "sequences.max_pages must be 1 to \(Int32.max), got \(c.max_pages)")
        }
        let (columns, overflow) = count.multipliedReportingOverflow(by: Int(c.max_pages))
        guard !overflow else { throw CallError(.invalidShape, "sequences.count x max_pages overflows") }
        let lengths = try ints(c.lengths, count, "lengths")
        let table = try ints(c.block_table, columns, "block_table")
        return .paged(
            lengths: lengths, table: PageTable(pageSize: pageSize, maxPages: Int(c.max_pages), blockTable: table))
    default:
        throw CallError(
            .invalidArgument, "sequences.form must be VARLEN (1), CACHE_LENGTHS (2) or PAGED (3), got \(c.form)")
    }
}
