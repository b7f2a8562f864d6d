import AttentionKit
import Foundation
import NumPyIO

// Reading and writing the files attnbench works on.

func loadFloats(_ path: String, role: String) throws -> Tensor {
    let array = try NPYArray.read(contentsOf: path)
    guard let values = array.floats else {
        throw NPYError.wrongKind(file: path, expected: "floating-point \(role)", actual: array.fileDType.rawValue)
    }
    do {
        return try Tensor(shape: array.shape, storage: values, name: "\(role) (\(path))")
    } catch {
        throw CLIError("\(error)")
    }
}

func loadMask(_ path: String) throws -> AttentionMask {
    let array = try NPYArray.read(contentsOf: path)
    do {
        switch array.storage {
        case .bool(let values): return try AttentionMask(shape: array.shape, allowed: values)
        case .float32(let values): return try AttentionMask(shape: array.shape, additive: values)
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
