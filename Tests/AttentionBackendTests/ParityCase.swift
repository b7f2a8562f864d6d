import AttentionCore
import AttentionVerification
import Foundation
import Testing

/// The tests' name for a verification case (cases, generators and the tolerance rule live in
/// AttentionVerification, shared with `attnbench verify` and the benchmarks).
typealias ParityCase = VerificationCase

extension VerificationCase: CustomTestStringConvertible {
    public var testDescription: String { description }
}

/// The parity sweep and the feature cases, for `@Test(arguments:)`.
enum Sweep {
    static func cases() -> [ParityCase] {
        do {
            return try ParitySweep.cases()
        } catch {
            Issue.record("the parity sweep could not be built: \(error)")
            return []
        }
    }

    static let featureCases = ParitySweep.featureCases
}

/// Runs `backend` and the float64 reference on the case and checks the contract's tolerance.
@discardableResult
func expectParity(
    _ backend: some AttentionBackend, _ c: ParityCase, sourceLocation: SourceLocation = #_sourceLocation
) throws -> AttentionResult {
    let (q, k, v) = try c.inputs()
    let problem = try c.problem()
    let result = try backend.attention(problem, query: q, key: k, value: v)
    let reference = NaiveBackend.reference(problem, query: q, key: k, value: v)
    let report = AccuracyReport(result: result, reference: reference, valueDim: problem.valueDim)
    #expect(report.passed, "\(backend.name) on \(c): \(report)", sourceLocation: sourceLocation)
    #expect(report.nmse < 1e-9, "\(backend.name) on \(c): NMSE \(report.nmse)", sourceLocation: sourceLocation)
    return result
}

/// Runs `backend` on NaN-padded buffers and expects bitwise the output of a plain run and nothing
/// written past the outputs.
func expectPaddedRunMatches(
    _ backend: some AttentionBackend, _ c: ParityCase, sourceLocation: SourceLocation = #_sourceLocation
) throws {
    let (q, k, v) = try c.inputs()
    let problem = try c.problem()
    let expected = try backend.attention(problem, query: q, key: k, value: v)
    let padded = try PaddedRun(backend, problem, query: q, key: k, value: v)
    #expect(padded.isBitwiseEqual(to: expected), "\(backend.name) on \(c)", sourceLocation: sourceLocation)
    #expect(padded.paddingIntact, "\(backend.name) wrote past its outputs on \(c)", sourceLocation: sourceLocation)
}
