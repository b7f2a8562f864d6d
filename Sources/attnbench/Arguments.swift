import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation

extension BackendChoice: ExpressibleByArgument {
    /// "auto", "naive", "blas", "opencl" or "opencl:N".
    public init?(argument: String) {
        guard let choice = try? BackendChoice(parsing: argument) else { return nil }
        self = choice
    }
}

extension BLASTiling: ExpressibleByArgument {
    /// "RxK", e.g. "128x512".
    public init?(argument: String) {
        let parts = argument.lowercased().split(separator: "x")
        guard parts.count == 2, let rows = Int(parts[0]), let keys = Int(parts[1]), rows > 0, keys > 0 else {
            return nil
        }
        self.init(queryRows: rows, keyBlock: keys)
    }
}

extension AttentionWindow: ExpressibleByArgument {
    /// "L,R", each an integer >= -1 (-1 = unbounded).
    public init?(argument: String) {
        let parts = argument.split(separator: ",", omittingEmptySubsequences: false)
        guard parts.count == 2,
            let left = Int(parts[0].trimmingCharacters(in: .whitespaces)),
            let right = Int(parts[1].trimmingCharacters(in: .whitespaces))
        else { return nil }
        self.init(left: left, right: right)
    }
}

/// The values of a list option. Lists are written as separate words (`--shapes prefill-2k causal-2k`,
/// `--backend blas opencl`); commas between items are accepted too (`--backend blas,opencl`). A custom
/// shape keeps its own commas: `--shapes x:b=1,hq=8,nq=100,d=64,causal,decode-4k` is two shapes.
func listValues(_ words: [String]) -> [String] {
    var items: [String] = []
    for word in words {
        var insideCustomShape = false
        for piece in word.split(separator: ",").map(String.init) {
            let continuesShape = insideCustomShape && !piece.contains(":") && (piece.contains("=") || piece == "causal")
            if continuesShape, let last = items.popLast() {
                items.append(last + "," + piece)
            } else {
                items.append(piece)
                insideCustomShape = piece.contains(":")
            }
        }
    }
    return items
}

extension TensorLayout: ExpressibleByArgument {}
extension StorageType: ExpressibleByArgument {}
extension BLASProducts: ExpressibleByArgument {}
extension OperandLayout: ExpressibleByArgument {}
