// The entry point every fuzz target shares. SwiftPM gives executables its own entry symbol, so libFuzzer's
// `main` is not linked; its driver is called instead (`LLVMFuzzerRunDriver`, public libFuzzer API), found
// with dlsym so that the call uses the C calling convention.
import Foundation

public typealias FuzzInput = @convention(c) (UnsafePointer<UInt8>, Int) -> CInt

private typealias FuzzerDriver =
    @convention(c) (
        UnsafeMutablePointer<CInt>, UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
        FuzzInput
    ) -> CInt

/// Runs libFuzzer on `testOneInput` with this process's arguments, then exits with its status.
public func runLibFuzzer(_ testOneInput: FuzzInput) -> Never {
    guard let driver = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "LLVMFuzzerRunDriver") else {
        fatalError("LLVMFuzzerRunDriver not found: build with -sanitize=fuzzer (scripts/fuzz)")
    }
    var argc = CommandLine.argc
    var argv = CommandLine.unsafeArgv
    exit(unsafeBitCast(driver, to: FuzzerDriver.self)(&argc, &argv, testOneInput))
}
