import AttentionCore
import AttentionVerification
// libFuzzer target: attnbench's custom shape syntax (`NAME:b=1,hq=8,...,causal`). Any text must parse or
// throw a ShapeSyntaxError, never crash; a parsed shape's problem must validate or throw an AttentionError.
import Foundation

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzShapes(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    guard let spec = try? ShapeSpec.parse(text) else { return 0 }
    _ = try? spec.problem()
    _ = spec.summary
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
exit(unsafeBitCast(driver, to: FuzzerDriver.self)(&argc, &argv, fuzzShapes))
