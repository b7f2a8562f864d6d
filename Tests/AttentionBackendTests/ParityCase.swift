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
    /// The whole sweep, or every fifth case up to 20 M multiply-adds when the environment says
    /// `ATTENTIONKIT_TEST_SWEEP=reduced` (scripts/sanitize: sanitizers run the suite 3-15x slower).
    static func cases() -> [ParityCase] {
        do {
            let all = try ParitySweep.cases()
            guard ProcessInfo.processInfo.environment["ATTENTIONKIT_TEST_SWEEP"] == "reduced" else { return all }
            return all.enumerated().filter { $0.offset % 5 == 0 && $0.element.work <= 20_000_000 }.map(\.element)
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
