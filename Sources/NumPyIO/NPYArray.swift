import Foundation

/// An array read from or written to a NumPy `.npy` file: shape plus either fp32 values or booleans.
///
/// Reading accepts format versions 1.0, 2.0 and 3.0, C order, little-endian `<f4`, and converts
/// `<f8` and `<f2` to fp32; `|b1` (and `|u1`, read as booleans) for masks. Everything else, and any
/// file whose header disagrees with its size, is refused with an `NPYError` naming the file; the
/// data size is checked against the file's actual size before any allocation.
public struct NPYArray: Sendable, Equatable {
    public enum Storage: Sendable, Equatable {
        case float32([Float])
        /// IEEE binary16 bits, as a `<f2` file holds them (never widened unless asked).
        case float16([UInt16])
        case bool([Bool])
        /// `<i4` and `<i8` values (sequence offsets, lengths, page tables).
        case int64([Int64])
    }

    /// The element type as stored in the file.
    public enum FileDType: String, Sendable {
        case float16 = "<f2"
        case float32 = "<f4"
        case float64 = "<f8"
        case bool = "|b1"
        case uint8 = "|u1"
        case int32 = "<i4"
        case int64 = "<i8"

        /// Bytes per element.
        public var itemSize: Int {
            switch self {
            case .float16: return 2
            case .float32: return 4
            case .float64: return 8
            case .bool, .uint8: return 1
            case .int32: return 4
            case .int64: return 8
            }
        }
    }

    public let shape: [Int]
    public let storage: Storage
    /// The dtype the file had (values are held as fp32 or Bool regardless).
    public let fileDType: FileDType

    public init(shape: [Int], floats: [Float]) {
        precondition(shape.reduce(1, *) == floats.count, "shape \(shape) does not match \(floats.count) values")
        self.shape = shape
        self.storage = .float32(floats)
        self.fileDType = .float32
    }

    /// An array of fp16 values given by their bits (written as `<f2`).
    public init(shape: [Int], halfBits: [UInt16]) {
        precondition(shape.reduce(1, *) == halfBits.count, "shape \(shape) does not match \(halfBits.count) values")
        self.shape = shape
        self.storage = .float16(halfBits)
        self.fileDType = .float16
    }

    /// An array of integers (written as `<i8`).
    public init(shape: [Int], integers: [Int64]) {
        precondition(shape.reduce(1, *) == integers.count, "shape \(shape) does not match \(integers.count) values")
        self.shape = shape
        self.storage = .int64(integers)
        self.fileDType = .int64
    }

    /// The values of an integer array (`<i4` widened); nil for other arrays.
    public var integers: [Int64]? {
        if case .int64(let values) = storage { return values }
        return nil
    }

    public init(shape: [Int], bools: [Bool]) {
        precondition(shape.reduce(1, *) == bools.count, "shape \(shape) does not match \(bools.count) values")
        self.shape = shape
        self.storage = .bool(bools)
        self.fileDType = .bool
    }

    private init(shape: [Int], storage: Storage, fileDType: FileDType) {
        self.shape = shape
        self.storage = storage
        self.fileDType = fileDType
    }

    /// The values as fp32 (fp16 files widened exactly); nil for boolean arrays.
    public var floats: [Float]? {
        switch storage {
        case .float32(let values): return values
        case .float16(let bits): return bits.map(Float.init(halfBits:))
        case .bool, .int64: return nil
        }
    }

    /// The fp16 bits of a `<f2` file, as stored; nil for other dtypes.
    public var halfBits: [UInt16]? {
        if case .float16(let bits) = storage { return bits }
        return nil
    }

    public var bools: [Bool]? {
        if case .bool(let values) = storage { return values }
        return nil
    }

    // MARK: Reading

    /// Reads a file. `path` is used in every error message.
    public static func read(contentsOf path: String) throws(NPYError) -> NPYArray {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path), options: .mappedIfSafe)
        } catch {
            throw .cannotOpen(file: path, reason: (error as NSError).localizedDescription)
        }
        return try parse(data, file: path)
    }

    /// Parses the bytes of a `.npy` file; `file` names it in errors.
    public static func parse(_ data: Data, file: String) throws(NPYError) -> NPYArray {
        let (major, headerStart, headerLength) = try preamble(data, file: file)
        let headerBytes = data.subdata(in: data.startIndex + headerStart..<data.startIndex + headerStart + headerLength)
        // Version 3.0 allows UTF-8 in the header; 1.0 and 2.0 are latin-1, which is ASCII for valid headers.
        guard let header = String(data: headerBytes, encoding: major == 3 ? .utf8 : .isoLatin1) else {
            throw .malformedHeader(file: file, detail: "header is not text")
        }
        let fields = try NPYHeader.parse(header, file: file)
        guard !fields.fortranOrder else { throw .fortranOrder(file: file) }
        guard let dtype = FileDType(rawValue: normalise(fields.descr)) else {
            throw .unsupportedDType(file: file, dtype: fields.descr)
        }
        let count = try checkPayload(
            data, file: file, shape: fields.shape, itemSize: dtype.itemSize,
            payloadStart: headerStart + headerLength)
        let storage = decode(data, from: headerStart + headerLength, count: count, dtype: dtype)
        return NPYArray(shape: fields.shape, storage: storage, fileDType: dtype)
    }

    /// The magic string, version and header length: (major version, header start, header length).
    private static func preamble(_ data: Data, file: String) throws(NPYError) -> (UInt8, Int, Int) {
        let bytes = [UInt8](data.prefix(12))
        let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59]  // \x93NUMPY
        guard bytes.count >= 6, Array(bytes[0..<6]) == magic else {
            if bytes.count < 6 && magic.starts(with: bytes) && !bytes.isEmpty {
                throw .truncated(file: file, detail: "only \(bytes.count) bytes")
            }
            throw .notNPY(file: file)
        }
        guard bytes.count >= 10 else { throw .truncated(file: file, detail: "header length missing") }
        let (major, minor) = (bytes[6], bytes[7])
        let headerLength: Int
        let headerStart: Int
        switch major {
        case 1:
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8
            headerStart = 10
        case 2, 3:
            guard bytes.count >= 12 else { throw .truncated(file: file, detail: "header length missing") }
            headerLength = Int(bytes[8]) | Int(bytes[9]) << 8 | Int(bytes[10]) << 16 | Int(bytes[11]) << 24
            headerStart = 12
        default:
            throw .unsupportedVersion(file: file, major: major, minor: minor)
        }
        guard minor == 0 else { throw .unsupportedVersion(file: file, major: major, minor: minor) }
        guard data.count >= headerStart + headerLength else {
            throw .truncated(
                file: file,
                detail: "header claims \(headerLength) bytes, file has \(data.count - headerStart) after the preamble")
        }
        return (major, headerStart, headerLength)
    }

    /// The element count of `shape`, once the data after the header is exactly its size.
    private static func checkPayload(
        _ data: Data, file: String, shape: [Int], itemSize: Int, payloadStart: Int
    ) throws(NPYError) -> Int {
        var count = 1
        for dim in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: dim)
            guard !overflow else { throw .tooLarge(file: file, shape: shape) }
            count = product
        }
        let (expectedBytes, overflow) = count.multipliedReportingOverflow(by: itemSize)
        guard !overflow else { throw .tooLarge(file: file, shape: shape) }
        let payload = data.count - payloadStart
        guard payload == expectedBytes else {
            if payload < expectedBytes {
                throw .truncated(
                    file: file, detail: "shape \(shape) needs \(expectedBytes) data bytes, only \(payload) present")
            }
            throw .sizeMismatch(file: file, shape: shape, expectedBytes: expectedBytes, actualBytes: payload)
        }
        return count
    }

    /// The `count` little-endian elements at byte `offset`, converted to fp32 (or booleans).
    private static func decode(_ data: Data, from offset: Int, count: Int, dtype: FileDType) -> Storage {
        data.withUnsafeBytes { (raw: UnsafeRawBufferPointer) -> Storage in
            let bytes = UnsafeRawBufferPointer(rebasing: raw[offset...])
            func word<T: FixedWidthInteger>(_ index: Int, _: T.Type) -> T {
                T(littleEndian: bytes.loadUnaligned(fromByteOffset: index * MemoryLayout<T>.size, as: T.self))
            }
            switch dtype {
            case .float32:
                return .float32((0..<count).map { Float(bitPattern: word($0, UInt32.self)) })
            case .float64:
                return .float32((0..<count).map { Float(Double(bitPattern: word($0, UInt64.self))) })
            case .float16:
                return .float16((0..<count).map { word($0, UInt16.self) })
            case .bool, .uint8:
                return .bool((0..<count).map { bytes[$0] != 0 })
            case .int32:
                return .int64((0..<count).map { Int64(Int32(bitPattern: word($0, UInt32.self))) })
            case .int64:
                return .int64((0..<count).map { Int64(bitPattern: word($0, UInt64.self)) })
            }
        }
    }

    /// `'<f4'`, `'float32'`-style spellings NumPy writes on little-endian machines.
    private static func normalise(_ descr: String) -> String {
        switch descr {
        case "|b1", "<b1", "b1", "?": return "|b1"
        case "|u1", "<u1", "u1": return "|u1"
        case "<i4", "i4": return "<i4"
        case "<i8", "i8": return "<i8"
        default: return descr
        }
    }

    // MARK: Writing

    /// The bytes of a version 1.0 file (`<f4`, `<f2` or `|b1`), header padded to 64 bytes as NumPy does.
    public func encoded() -> Data {
        let descr: String
        switch storage {
        case .float32: descr = "<f4"
        case .float16: descr = "<f2"
        case .bool: descr = "|b1"
        case .int64: descr = "<i8"
        }
        let shapeText = shape.count == 1 ? "(\(shape[0]),)" : "(" + shape.map(String.init).joined(separator: ", ") + ")"
        var header = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeText), }"
        let preamble = 10
        let padding = (64 - (preamble + header.utf8.count + 1) % 64) % 64
        header += String(repeating: " ", count: padding) + "\n"
        var data = Data([0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, 1, 0])
        let length = UInt16(header.utf8.count)
        data.append(UInt8(length & 0xFF))
        data.append(UInt8(length >> 8))
        data.append(contentsOf: Array(header.utf8))
        switch storage {
        case .float32(let values):
            values.withUnsafeBufferPointer { buffer in
                var le = [UInt32](repeating: 0, count: buffer.count)
                for i in 0..<buffer.count { le[i] = buffer[i].bitPattern.littleEndian }
                le.withUnsafeBytes { data.append(contentsOf: $0) }
            }
        case .float16(let bits):
            for b in bits { data.append(contentsOf: [UInt8(b & 0xFF), UInt8(b >> 8)]) }
        case .bool(let values):
            data.append(contentsOf: values.map { $0 ? UInt8(1) : 0 })
        case .int64(let values):
            for v in values { withUnsafeBytes(of: v.littleEndian) { data.append(contentsOf: $0) } }
        }
        return data
    }

    /// Writes a version 1.0 file atomically.
    public func write(to path: String) throws(NPYError) {
        do {
            try encoded().write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw .cannotWrite(file: path, reason: (error as NSError).localizedDescription)
        }
    }
}

extension Float {
    /// IEEE half-precision bits to Float, without depending on platform `Float16` support.
    init(halfBits h: UInt16) {
        let sign = UInt32(h >> 15) << 31
        let exponent = Int((h >> 10) & 0x1F)
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0x1F {
            self = Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        } else if exponent == 0 {
            // Subnormal (or zero): mantissa · 2^-24.
            let magnitude = Float(mantissa) * Float(sign: .plus, exponent: -24, significand: 1)
            self = sign != 0 ? -magnitude : magnitude
        } else {
            self = Float(bitPattern: sign | UInt32(exponent - 15 + 127) << 23 | (mantissa << 13))
        }
    }
}
