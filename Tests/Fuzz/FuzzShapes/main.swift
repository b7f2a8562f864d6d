// libFuzzer target: attnbench's custom shape syntax (`NAME:b=1,hq=8,...,causal`). Any text must parse or
// throw a ShapeSyntaxError, never crash; a parsed shape's problem must validate or throw an AttentionError.
import AttentionCore
import AttentionVerification
import FuzzSupport

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzShapes(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    guard let spec = try? ShapeSpec.parse(text) else { return 0 }
    _ = try? spec.problem()
    _ = spec.summary
    return 0
}

runLibFuzzer(fuzzShapes)
