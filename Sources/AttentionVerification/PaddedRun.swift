import AttentionCore

/// A run whose buffers are sized exactly for the problem and followed in memory by NaN: any read
/// past the end of an input poisons the output, any write past the end of an output shows.
public struct PaddedRun: Sendable {
    /// The output and log-sum-exp of the run.
    public var output: [Float]
    public var logSumExp: [Float]
    /// Whether the NaN padding after both outputs is still untouched.
    public var paddingIntact: Bool

    /// Elements of NaN after every buffer.
    public static let padding = 1024

    /// Runs `backend` on `problem` with NaN-padded copies of the inputs.
    public init(
        _ backend: any AttentionBackend, _ problem: AttentionProblem, query q: Tensor, key k: Tensor, value v: Tensor
    )
        throws(AttentionError)
    {
        let pad = [Float](repeating: .nan, count: Self.padding)
        let (qp, kp, vp) = (q.storage + pad, k.storage + pad, v.storage + pad)
        let outCount = problem.outputShape.reduce(1, *)
        let lseCount = problem.lseShape.reduce(1, *)
        var out = [Float](repeating: .nan, count: outCount + Self.padding)
        var lse = [Float](repeating: .nan, count: lseCount + Self.padding)
        var failure: AttentionError?
        qp.withUnsafeBufferPointer { qb in
            kp.withUnsafeBufferPointer { kb in
                vp.withUnsafeBufferPointer { vb in
                    out.withUnsafeMutableBufferPointer { ob in
                        lse.withUnsafeMutableBufferPointer { lb in
                            let buffers = AttentionBuffers(
                                query: UnsafeBufferPointer(rebasing: qb[0..<q.count]),
                                key: UnsafeBufferPointer(rebasing: kb[0..<k.count]),
                                value: UnsafeBufferPointer(rebasing: vb[0..<v.count]),
                                output: UnsafeMutableBufferPointer(rebasing: ob[0..<outCount]),
                                logSumExp: UnsafeMutableBufferPointer(rebasing: lb[0..<lseCount]))
                            do throws(AttentionError) { try backend.forward(problem, buffers) } catch {
                                failure = error
                            }
                        }
                    }
                }
            }
        }
        if let failure { throw failure }
        output = Array(out[0..<outCount])
        logSumExp = Array(lse[0..<lseCount])
        paddingIntact = out[outCount...].allSatisfy(\.isNaN) && lse[lseCount...].allSatisfy(\.isNaN)
    }

    /// Whether this run equals `result` bit for bit (output and log-sum-exp).
    public func isBitwiseEqual(to result: AttentionResult) -> Bool {
        output.map(\.bitPattern) == result.output.storage.map(\.bitPattern)
            && logSumExp.map(\.bitPattern) == result.logSumExp.storage.map(\.bitPattern)
    }
}
