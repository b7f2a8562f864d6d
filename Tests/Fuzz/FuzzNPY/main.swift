// libFuzzer target: the `.npy` reader. Any input must parse or throw an NPYError, never crash; what
// parses must survive an encode / parse round trip with its shape and values. Built by scripts/fuzz.
import Foundation
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

// The entry point. SwiftPM gives executables its own entry symbol, so libFuzzer's `main` is not linked;
// its driver is called instead (`LLVMFuzzerRunDriver`, public libFuzzer API), found with dlsym so that the
// call uses the C calling convention.
typealias FuzzerDriver =
    @convention(c) (
        UnsafeMutablePointer<CInt>, UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
        @convention(c) (UnsafePointer<UInt8>, Int) -> CInt
    ) -> CInt
guard let driver = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "LLVMFuzzerRunDriver") else {
    fatalError("LLVMFuzzerRunDriver not found: build with -sanitize=fuzzer (scripts/fuzz)")
}
var argc = CommandLine.argc
var argv = CommandLine.unsafeArgv
exit(unsafeBitCast(driver, to: FuzzerDriver.self)(&argc, &argv, fuzzNPY))

/// Storage equality that holds for NaN too (bit patterns of floats).
func sameBits(_ a: NPYArray.Storage, _ b: NPYArray.Storage) -> Bool {
    if case .float32(let x) = a, case .float32(let y) = b { return x.map(\.bitPattern) == y.map(\.bitPattern) }
    return a == b
}
