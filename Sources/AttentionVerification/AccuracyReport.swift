import AttentionCore

/// How far a result is from the float64 reference, and whether that is within the contract.
///
/// Tolerance (fp32, xFormers' forward tolerance): |o - ref| <= 3e-4 + 2e-5·|ref| elementwise, no NaN
/// where the reference has none, and rows with no visible key exactly 0. NMSE = Σ(o-ref)² / Σref²
/// should sit near 1e-12 for fp32; it is reported, not judged. The tolerance rule lives here and
/// nowhere else: tests, `attnbench verify`, `bench` and Benchmarks all judge through this type.
public struct AccuracyReport: Sendable, Equatable, CustomStringConvertible {
    public static let absoluteTolerance = 3e-4
    public static let relativeTolerance = 2e-5

    public var maxAbsError = 0.0
    public var maxRelError = 0.0
    public var nmse = 0.0
    /// Elements outside tolerance (including unexpected NaN, and non-zero masked rows).
    public var violations = 0
    /// The first violating flat index, if any.
    public var firstViolation: Int?
    /// Worst log-sum-exp error over rows where the reference is finite.
    public var maxLSEError = 0.0
    public var lseViolations = 0

    public var passed: Bool { violations == 0 && lseViolations == 0 }
    /// Rows compared (all, or the sample of `sampled(...)`).
    public var rowsChecked = 0

    /// An empty report (nothing compared yet).
    public init() {}

    /// Whether `value` is within the contract's tolerance of `reference` (NaN only where the
    /// reference is NaN).
    /// fp16/bf16 outputs additionally allow one rounding of the output type, |ref| * 2^-11 or 2^-8
    /// (the contract's rule for reduced-precision storage; inputs are compared through the reference
    /// of the rounded inputs).
    public static func withinTolerance(_ value: Double, of reference: Double, outputType: StorageType = .f32) -> Bool {
        if reference.isNaN { return true }
        let allowance = absoluteTolerance + (relativeTolerance + outputType.unitRoundoff) * abs(reference)
        return !value.isNaN && abs(value - reference) <= allowance
    }

    public var description: String {
        let verdict =
            passed
            ? "ok" : "FAIL (\(violations) output, \(lseViolations) lse violations; first at \(firstViolation ?? -1))"
        return
            "max abs \(format(maxAbsError)), max rel \(format(maxRelError)), NMSE \(format(nmse)), lse "
            + "\(format(maxLSEError)): \(verdict)"
    }

    private func format(_ x: Double) -> String {
        guard x.isFinite, x != 0 else { return "\(x)" }
        var exponent = 0
        var m = x
        while abs(m) >= 10 {
            m /= 10
            exponent += 1
        }
        while abs(m) < 1 {
            m *= 10
            exponent -= 1
        }
        let rounded = (m * 100).rounded() / 100
        return "\(rounded)e\(exponent)"
    }

    /// Compares `output` / `logSumExp` (fp32) against the float64 reference.
    /// Rows whose reference is NaN (poisoned inputs) are skipped.
    public init(
        output: UnsafeBufferPointer<Float>, logSumExp: UnsafeBufferPointer<Float>?,
        reference: [Double], referenceLSE: [Double], valueDim: Int, outputType: StorageType = .f32
    ) {
        precondition(output.count == reference.count && valueDim > 0)
        var sumSq = 0.0
        var refSq = 0.0
        for idx in 0..<reference.count {
            let ref = reference[idx]
            let o = Double(output[idx])
            let row = idx / valueDim
            if ref.isNaN { continue }
            let masked = referenceLSE[row] == -.infinity
            let err = abs(o - ref)
            let bad = !Self.withinTolerance(o, of: ref, outputType: outputType) || (masked && o != 0)
            if bad {
                violations += 1
                if firstViolation == nil { firstViolation = idx }
            }
            if err.isFinite {
                maxAbsError = max(maxAbsError, err)
                if ref != 0 { maxRelError = max(maxRelError, err / abs(ref)) }
            } else {
                maxAbsError = .infinity
            }
            sumSq += (o - ref) * (o - ref)
            refSq += ref * ref
        }
        nmse = refSq > 0 ? sumSq / refSq : (sumSq > 0 ? .infinity : 0)
        rowsChecked = reference.count / valueDim
        if let lse = logSumExp {
            for row in 0..<referenceLSE.count {
                let ref = referenceLSE[row]
                let got = Double(lse[row])
                if ref.isNaN { continue }
                if ref == -.infinity {
                    if got != -.infinity { lseViolations += 1 }
                    continue
                }
                let err = abs(got - ref)
                maxLSEError = max(maxLSEError, err.isNaN ? .infinity : err)
                // LSE is O(scores): judge relative to its magnitude.
                if !(err <= Self.absoluteTolerance + 1e-5 * abs(ref)) { lseViolations += 1 }
            }
        }
    }

    /// Compares a result against the reference computed from the same fp32 inputs.
    public init(result: AttentionResult, reference: (output: [Double], logSumExp: [Double]), valueDim: Int) {
        self = result.output.storage.withUnsafeBufferPointer { out in
            result.logSumExp.storage.withUnsafeBufferPointer { lse in
                AccuracyReport(
                    output: out, logSumExp: lse, reference: reference.output,
                    referenceLSE: reference.logSumExp, valueDim: valueDim)
            }
        }
    }

    /// Compares the rows of `result` at up to `count` row indices spread over all of them with the
    /// float64 reference of those rows alone: error measurement on problems too large for a full
    /// reference. The log-sum-exp is not judged here.
    public static func sampled(
        _ problem: AttentionProblem, query q: Tensor, key k: Tensor, value v: Tensor, result: AttentionResult,
        count: Int = 32, outputType: StorageType = .f32
    ) -> AccuracyReport {
        let total = problem.batch * problem.queryHeads * problem.queryLength
        let n = min(count, total)
        let picks = Array(Set((0..<n).map { $0 * (total - 1) / max(1, n - 1) })).sorted()
        var output: [Float] = []
        var reference: [Double] = []
        var referenceLSE: [Double] = []
        for (row, values, lse) in NaiveBackend.reference(problem, query: q, key: k, value: v, rows: picks) {
            output += result.output.storage[row * problem.valueDim..<(row + 1) * problem.valueDim]
            reference += values
            referenceLSE.append(lse)
        }
        var report = output.withUnsafeBufferPointer { out in
            AccuracyReport(
                output: out, logSumExp: nil, reference: reference, referenceLSE: referenceLSE,
                valueDim: problem.valueDim, outputType: outputType)
        }
        report.rowsChecked = picks.count
        return report
    }
}
