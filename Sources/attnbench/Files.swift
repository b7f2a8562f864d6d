import AttentionKit
import Foundation
import NumPyIO

// Reading and writing the files attnbench works on.

/// An operand file as a logical [B, H, N, D] fp32 tensor (a `bshd` file [B, N, H, D] is reordered),
/// and whether the file held fp16.
func loadOperand(_ path: String, role: String, layout: TensorLayout) throws -> (Tensor, isHalf: Bool) {
    let array = try NPYArray.read(contentsOf: path)
    guard let values = array.floats else {
        throw NPYError.wrongKind(file: path, expected: "floating-point \(role)", actual: array.fileDType.rawValue)
    }
    let isHalf = array.halfBits != nil
    guard layout == .bshd else {
        do {
            return (try Tensor(shape: array.shape, storage: values, name: "\(role) (\(path))"), isHalf)
        } catch {
            throw CLIError("\(error)")
        }
    }
    guard array.shape.count == 4 else {
        throw CLIError("\(role) (\(path)): a bshd file must be 4-D [B, N, H, D], got shape \(array.shape)")
    }
    let s = array.shape
    let logical = [s[0], s[2], s[1], s[3]]
    return (try Tensor(shape: logical, storage: permuteHeadsAndPositions(values, s), name: "\(role) (\(path))"), isHalf)
}

/// Swaps dimensions 1 and 2 of a dense 4-D array of shape `shape` (bhsd <-> bshd).
func permuteHeadsAndPositions(_ values: [Float], _ shape: [Int]) -> [Float] {
    let (b, x, y, d) = (shape[0], shape[1], shape[2], shape[3])
    var out = [Float](repeating: 0, count: values.count)
    for i in 0..<b {
        for j in 0..<x {
            for k in 0..<y {
                let from = ((i * x + j) * y + k) * d
                let to = ((i * y + k) * x + j) * d
                for c in 0..<d { out[to + c] = values[from + c] }
            }
        }
    }
    return out
}

func loadMask(_ path: String) throws -> AttentionMask {
    let array = try NPYArray.read(contentsOf: path)
    do {
        switch array.storage {
        case .bool(let values): return try AttentionMask(shape: array.shape, allowed: values)
        case .float32(let values): return try AttentionMask(shape: array.shape, additive: values)
        case .float16: return try AttentionMask(shape: array.shape, additive: array.floats ?? [])
        case .int64: throw CLIError("\(path): a mask must be bool or float, not integer")
        }
    } catch {
        throw CLIError("\(path): \(error)")
    }
}

func write(_ tensor: Tensor, to path: String) throws {
    try NPYArray(shape: tensor.shape, floats: tensor.storage).write(to: path)
}

extension NPYArray {
    /// The fp32 values, or an error naming the file when the array holds booleans.
    func floatsOrThrow(_ path: String) throws -> (shape: [Int], values: [Float])? {
        guard let values = floats else {
            throw NPYError.wrongKind(file: path, expected: "floating-point", actual: fileDType.rawValue)
        }
        return (shape, values)
    }
}
