import AttentionCore
import AttentionMachine
import CAttentionCPU

/// The CPU kernel variant a backend calls: a table of C functions (`CAttentionCPU`) compiled for
/// one instruction set. The table is static and immutable, so a value can be shared across threads.
public struct CPUKernels: @unchecked Sendable {
    public let isa: CPUISA
    let table: UnsafePointer<ak_cpu_kernels>

    /// The variant for `isa`; throws when this machine cannot run it, naming the reason.
    public init(isa: CPUISA) throws(AttentionError) {
        guard let table = ak_cpu_kernels_for(isa.code) else {
            throw .invalidConfiguration(
                setting: "CPU instruction set", value: isa.rawValue,
                reason: isa.unsupportedReason ?? "not compiled into this build")
        }
        self.isa = isa
        self.table = table
    }

    /// The variant `configuration` selects (see `CPUISA.resolve`).
    public static func resolve(_ configuration: AttentionConfiguration) -> Result<CPUKernels, AttentionError> {
        CPUISA.resolve(configuration).flatMap { isa in Result { () throws(AttentionError) in try CPUKernels(isa: isa) }
        }
    }

    // MARK: Array helpers (tests)

    /// e^x with the kernels' approximation.
    public func exp(_ x: [Float]) -> [Float] { map(x, table.pointee.exp) }

    /// tanh(x) with the kernels' approximation.
    public func tanh(_ x: [Float]) -> [Float] { map(x, table.pointee.tanh) }

    /// One online-softmax step over a single row of scores from a fresh state: the weights
    /// e^(s - max) the step writes over the row, the running sum and the maximum.
    public func softmaxStep(_ scores: [Float]) -> (weights: [Float], sum: Float, max: Float) {
        let width = scores.count
        let ld = (width + 15) / 16 * 16
        var row = scores + [Float](repeating: 0, count: ld - width)
        var (rowMax, rowSum) = (-Float.infinity, Float(0))
        var out = [Float](repeating: 0, count: 16)
        row.withUnsafeMutableBufferPointer { tile in
            out.withUnsafeMutableBufferPointer { o in
                if let t = tile.baseAddress, let o = o.baseAddress {
                    table.pointee.softmax_update(t, ld, 1, width, &rowMax, &rowSum, o, 16, 16)
                }
            }
        }
        return (Array(row.prefix(width)), rowSum, rowMax)
    }

    /// `x` rounded to the 16-bit `type` by the kernels' store path (F16C/AVX-512 where present).
    public func encode(_ x: [Float], as type: StorageType) -> [UInt16] {
        var bits = [UInt16](repeating: 0, count: x.count)
        let code = type.kernelCode
        x.withUnsafeBufferPointer { src in
            bits.withUnsafeMutableBytes { dst in
                if let from = src.baseAddress, let to = dst.baseAddress {
                    table.pointee.store_rows(code, from, 0, 1, x.count, to, 0)
                }
            }
        }
        return bits
    }

    /// 16-bit `type` values widened to fp32 by the kernels' load path.
    public func decode(_ bits: [UInt16], as type: StorageType) -> [Float] {
        var x = [Float](repeating: 0, count: bits.count)
        let code = type.kernelCode
        bits.withUnsafeBytes { src in
            x.withUnsafeMutableBufferPointer { dst in
                if let from = src.baseAddress, let to = dst.baseAddress {
                    table.pointee.load_rows(code, from, 0, 1, bits.count, to, 0)
                }
            }
        }
        return x
    }

    private func map(
        _ x: [Float], _ f: @convention(c) (UnsafePointer<Float>, UnsafeMutablePointer<Float>, Int) -> Void
    ) -> [Float] {
        var y = [Float](repeating: 0, count: x.count)
        x.withUnsafeBufferPointer { src in
            y.withUnsafeMutableBufferPointer { dst in
                if let from = src.baseAddress, let to = dst.baseAddress { f(from, to, x.count) }
            }
        }
        return y
    }
}

extension StorageType {
    /// The C kernels' name for the storage type (AK_DTYPE_*).
    var kernelCode: Int32 {
        switch self {
        case .f32: return Int32(AK_DTYPE_F32)
        case .f16: return Int32(AK_DTYPE_F16)
        case .bf16: return Int32(AK_DTYPE_BF16)
        }
    }
}
