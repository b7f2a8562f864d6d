import AttentionBLAS
import AttentionCore
import AttentionOpenCL
import AttentionVerification
import Foundation
import Testing

/// Inputs the fuzzers (scripts/fuzz) found crashing or returning garbage, kept as tests. Their raw
/// inputs are in Tests/Fuzz/corpus/*/regression-*.
@Suite struct FuzzRegressions {
    /// FuzzValidation: a window side of Int.max passed validation, then `pos + right` overflowed
    /// (a trap) in the visibility rule, and `Int32(right)` trapped in the OpenCL parameters. A side
    /// wider than every key now equals an unbounded one on every backend.
    @Test func hugeWindowSidesEqualUnboundedOnes() throws {
        let c = VerificationCase(heads: (3, 1), nq: 4, nk: 7, d: 5, dv: 4, options: .init(causal: true))
        let (q, k, v) = try c.inputs()
        var backends: [any AttentionBackend] = [NaiveBackend(), BLASBackend()]
        backends += OpenCLRuntime.availableDevices.indices.map { OpenCLBackend(device: $0) }
        for backend in backends {
            for (huge, same) in [
                (AttentionWindow(left: .max, right: .max), AttentionWindow(left: -1, right: -1)),
                (AttentionWindow(left: .max, right: 0), AttentionWindow(left: -1, right: 0)),
                (AttentionWindow(left: 2, right: Int(Int32.max) + 5), AttentionWindow(left: 2, right: -1)),
            ] {
                var options = c.options
                options.causal = false
                options.window = huge
                let got = try backend.attention(query: q, key: k, value: v, options: options)
                options.window = same
                let want = try backend.attention(query: q, key: k, value: v, options: options)
                #expect(got == want, "\(backend.name): window \(huge) differs from \(same)")
            }
        }
    }

    /// FuzzValidation: an additive mask holding +infinity (or NaN) made every backend return NaN rows;
    /// it is now refused with the element named.
    @Test func additiveMasksRefuseInfinityAndNaN() {
        for bad: Float in [.infinity, .nan] {
            #expect(throws: AttentionError.self) {
                try AttentionMask(shape: [2, 2], additive: [0, -.infinity, bad, 1])
            }
        }
        do {
            _ = try AttentionMask(shape: [2, 2], additive: [0, -.infinity, .infinity, 1])
        } catch {
            #expect(error.description.contains("element 2"), "\(error)")
        }
        #expect((try? AttentionMask(shape: [2, 2], additive: [0, -.infinity, -3, 1e30])) != nil)
    }
}
