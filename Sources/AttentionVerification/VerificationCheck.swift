import AttentionCore

/// Every check of one backend on one problem: the tolerance against the float64 reference and the
/// log-sum-exp (`AccuracyReport`), bitwise determinism over two runs, and a NaN-padded run that must
/// give bitwise the same result and leave the memory after the outputs alone.
public struct VerificationCheck: Sendable {
    public var report: AccuracyReport
    /// What failed, in words; empty when everything passed.
    public var failures: [String]
    /// The first run's result.
    public var result: AttentionResult?

    public var passed: Bool { failures.isEmpty }

    public init(
        _ backend: any AttentionBackend, _ problem: AttentionProblem, query q: Tensor, key k: Tensor, value v: Tensor,
        reference: (output: [Double], logSumExp: [Double])
    ) {
        report = AccuracyReport()
        failures = []
        do throws(AttentionError) {
            let first = try backend.attention(problem, query: q, key: k, value: v)
            result = first
            report = AccuracyReport(result: first, reference: reference, valueDim: problem.valueDim)
            if report.violations > 0 { failures.append("tolerance: \(report.violations) elements") }
            if report.lseViolations > 0 { failures.append("log-sum-exp: \(report.lseViolations) rows") }
            let second = try backend.attention(problem, query: q, key: k, value: v)
            if second.output.storage.map(\.bitPattern) != first.output.storage.map(\.bitPattern) {
                failures.append("non-deterministic")
            }
            let padded = try PaddedRun(backend, problem, query: q, key: k, value: v)
            if !padded.isBitwiseEqual(to: first) {
                failures.append("out-of-bounds read: NaN-padded inputs change the output")
            }
            if !padded.paddingIntact { failures.append("out-of-bounds write past the outputs") }
        } catch {
            failures.append("error: \(error)")
        }
    }

    /// Checks `backend` on `c`, computing the reference.
    public init(_ backend: any AttentionBackend, _ c: VerificationCase) throws(AttentionError) {
        let problem = try c.problem()
        let (q, k, v) = try c.inputs()
        self.init(
            backend, problem, query: q, key: k, value: v,
            reference: NaiveBackend.reference(problem, query: q, key: k, value: v))
    }
}
