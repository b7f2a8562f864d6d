/// How the elements of an operand are stored. Arithmetic is fp32 whatever the storage (the
/// reference: fp64); conversions to fp16 and bf16 round to nearest, ties to even.
public enum StorageType: String, Sendable, Codable, CaseIterable, CustomStringConvertible {
    /// IEEE binary32.
    case f32
    /// IEEE binary16 (half): 5 exponent bits, 10 mantissa bits, largest finite 65504.
    case f16
    /// bfloat16: the upper half of a binary32 (8 exponent bits, 7 mantissa bits).
    case bf16

    public var description: String { rawValue }

    /// Bytes per element.
    public var byteSize: Int { self == .f32 ? 4 : 2 }

    /// Relative size of one rounding to this type (|x| * `unitRoundoff` bounds |round(x) - x|):
    /// 2^-11 for fp16, 2^-8 for bf16, 0 for fp32 (the contract's allowance for fp16/bf16 outputs).
    public var unitRoundoff: Double {
        switch self {
        case .f32: return 0
        case .f16: return 0x1p-11
        case .bf16: return 0x1p-8
        }
    }

    /// `x` rounded to this type (to nearest, ties to even) and widened back to fp32.
    public func rounded(_ x: Float) -> Float {
        switch self {
        case .f32: return x
        case .f16: return Self.decodeHalf(Self.encodeHalf(x))
        case .bf16: return Self.decodeBFloat(Self.encodeBFloat(x))
        }
    }

    /// The bits of `x` in this 16-bit type (fp16 or bf16; for fp32 the upper half of nothing: 0).
    public func encode(_ x: Float) -> UInt16 {
        switch self {
        case .f32: return 0
        case .f16: return Self.encodeHalf(x)
        case .bf16: return Self.encodeBFloat(x)
        }
    }

    /// fp32 -> fp16 bits, round to nearest even (NumPy's `astype(np.float16)` bit for bit): overflow
    /// gives ±Inf; a NaN keeps its sign and the top 10 payload bits (a payload that would vanish
    /// becomes 1, so NaN stays NaN).
    public static func encodeHalf(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        let sign = UInt16(truncatingIfNeeded: (bits >> 16) & 0x8000)
        let exponent = Int((bits >> 23) & 0xFF)
        let mantissa = bits & 0x7F_FFFF
        if exponent == 0xFF {
            if mantissa == 0 { return sign | 0x7C00 }
            let payload = UInt16(truncatingIfNeeded: mantissa >> 13)
            return sign | 0x7C00 | (payload == 0 ? 1 : payload)
        }
        let e = exponent - 127 + 15
        if e >= 0x1F { return sign | 0x7C00 }
        if e <= 0 {
            // Subnormal half (or zero): shift the whole significand into place, rounding once.
            if e < -10 { return sign }
            return sign | UInt16(truncatingIfNeeded: roundShift(mantissa | 0x80_0000, by: UInt32(14 - e)))
        }
        // Normal: keep 10 mantissa bits; a carry out of the mantissa bumps the exponent (up to Inf).
        let combined = UInt32(e) << 10 | (mantissa >> 13)
        let remainder = mantissa & 0x1FFF
        let up = remainder > 0x1000 || (remainder == 0x1000 && combined & 1 == 1)
        return sign | UInt16(truncatingIfNeeded: up ? combined + 1 : combined)
    }

    /// `value >> shift` rounded to nearest, ties to even.
    private static func roundShift(_ value: UInt32, by shift: UInt32) -> UInt32 {
        let kept = value >> shift
        let half = UInt32(1) << (shift - 1)
        let remainder = value & ((UInt32(1) << shift) - 1)
        return remainder > half || (remainder == half && kept & 1 == 1) ? kept + 1 : kept
    }

    /// fp16 bits -> fp32 (exact).
    public static func decodeHalf(_ h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = Int((h >> 10) & 0x1F)
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0x1F { return Float(bitPattern: sign | 0x7F80_0000 | mantissa << 13) }
        if exponent == 0 {
            let magnitude = Float(mantissa) * 0x1p-24
            return sign == 0 ? magnitude : -magnitude
        }
        return Float(bitPattern: sign | UInt32(exponent - 15 + 127) << 23 | mantissa << 13)
    }

    /// fp32 -> bf16 bits, round to nearest even; NaN stays a quiet NaN with its sign.
    public static func encodeBFloat(_ x: Float) -> UInt16 {
        let bits = x.bitPattern
        if x.isNaN { return UInt16(truncatingIfNeeded: bits >> 16) | 0x0040 }
        let rounded = bits &+ 0x7FFF &+ ((bits >> 16) & 1)
        return UInt16(truncatingIfNeeded: rounded >> 16)
    }

    /// bf16 bits -> fp32 (exact).
    public static func decodeBFloat(_ b: UInt16) -> Float { Float(bitPattern: UInt32(b) << 16) }
}

/// The storage types of one call: Q, K and V (K and V share one), and O. LSE is always fp32.
public struct StorageTypes: Sendable, Equatable, Hashable, Codable, CustomStringConvertible {
    public var query: StorageType
    public var keyValue: StorageType
    public var output: StorageType

    public init(query: StorageType = .f32, keyValue: StorageType = .f32, output: StorageType = .f32) {
        self.query = query
        self.keyValue = keyValue
        self.output = output
    }

    /// fp32 everywhere.
    public static let f32 = StorageTypes()

    public var description: String {
        query == keyValue && keyValue == output ? query.rawValue : "q \(query), kv \(keyValue), o \(output)"
    }
}
