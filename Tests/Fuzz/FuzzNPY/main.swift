// libFuzzer target: the `.npy` reader. Any input must parse or throw an NPYError, never crash; what
// parses must survive an encode / parse round trip with its shape and values. Built by scripts/fuzz.
import Foundation
import FuzzSupport
import NumPyIO

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzNPY(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let bytes = Data(bytes: data, count: size)
    guard let array = try? NPYArray.parse(bytes, file: "fuzz.npy") else { return 0 }
    // The file's own type is not kept (`<i4` is widened, `<f8` narrowed): shape and values must be.
    guard let again = try? NPYArray.parse(array.encoded(), file: "round-trip.npy"), again.shape == array.shape,
        sameBits(again.storage, array.storage)
    else {
        fatalError("an array read from fuzz input does not survive encode + parse: shape \(array.shape)")
    }
    return 0
}

runLibFuzzer(fuzzNPY)

/// Storage equality that holds for NaN too (bit patterns of floats).
func sameBits(_ a: NPYArray.Storage, _ b: NPYArray.Storage) -> Bool {
    if case .float32(let x) = a, case .float32(let y) = b { return x.map(\.bitPattern) == y.map(\.bitPattern) }
    return a == b
}
