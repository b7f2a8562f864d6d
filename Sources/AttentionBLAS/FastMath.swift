// Vectorised transcendental functions for the backends' softmax. `package` scope: an
// implementation detail shared by the CPU backends, tested in AttentionCoreTests.

/// e^x for 16 lanes, relative error below 2e-7 over the normal range.
///
/// Cody-Waite range reduction x = k·ln2 + r, |r| <= ln2/2, then a degree-6 polynomial, then
/// 2^k assembled in the exponent bits. Lanes with x < -87.3 (including -inf) give exactly 0,
/// NaN stays NaN, x > 88.7 gives +inf.
@inlinable @inline(__always)
package func fastExp(_ x: SIMD16<Float>) -> SIMD16<Float> {
    let low = SIMD16<Float>(repeating: -87.3)
    let tiny = x .< low
    // Clamp without touching NaN: `.<` is false for NaN lanes.
    var xc = x.replacing(with: low, where: tiny)
    xc = xc.replacing(with: 88.7, where: xc .> 88.7)
    let magic = SIMD16<Float>(repeating: 12_582_912)  // 1.5 * 2^23: rounds to nearest integer
    let t = magic.addingProduct(xc, SIMD16(repeating: 1.442_695_04))
    let k = t - magic
    let r = xc.addingProduct(k, SIMD16(repeating: -0.693_359_375)).addingProduct(k, SIMD16(repeating: 2.121_944_4e-4))
    var p = SIMD16<Float>(repeating: 1.987_569_15e-4)
    p = SIMD16(repeating: 1.398_199_95e-3).addingProduct(p, r)
    p = SIMD16(repeating: 8.333_451_9e-3).addingProduct(p, r)
    p = SIMD16(repeating: 4.166_579_59e-2).addingProduct(p, r)
    p = SIMD16(repeating: 1.666_666_55e-1).addingProduct(p, r)
    p = SIMD16(repeating: 5.000_000_12e-1).addingProduct(p, r)
    p = (r + 1).addingProduct(p, r * r)
    // 2^k: k sits in the low mantissa bits of t; k in [-126, 128]. Split 2^k = 2^(k/2)·2^(k-k/2) so
    // that k = 128 (x near 88.7) does not overflow the exponent field.
    let ki = unsafeBitCast(t, to: SIMD16<Int32>.self) &- 0x4B40_0000
    let k1 = ki &>> 1
    let k2 = ki &- k1
    let s1 = unsafeBitCast((k1 &+ 127) &<< 23, to: SIMD16<Float>.self)
    let s2 = unsafeBitCast((k2 &+ 127) &<< 23, to: SIMD16<Float>.self)
    return (p * s1 * s2).replacing(with: 0, where: tiny)
}

/// tanh(x) for 16 lanes via 1 - 2 / (e^(2x) + 1); absolute error below 1e-6, odd by construction.
@inlinable @inline(__always)
package func fastTanh(_ x: SIMD16<Float>) -> SIMD16<Float> {
    let ax = x.replacing(with: -x, where: x .< 0)
    // For |x| > 9, tanh rounds to 1 in fp32.
    let e = fastExp(2 * ax.replacing(with: 9, where: ax .> 9))
    let t = (1 - 2 / (e + 1)).replacing(with: 1, where: ax .> 9)
    return t.replacing(with: -t, where: x .< 0)
}

/// Lane-wise maximum as compare-and-blend. (`pointwiseMax` lowers to a per-lane loop.)
/// A NaN in `b` is not taken; callers detect NaN separately.
@inlinable @inline(__always)
package func laneMax(_ a: SIMD16<Float>, _ b: SIMD16<Float>) -> SIMD16<Float> {
    a.replacing(with: b, where: b .> a)
}

/// The largest lane (NaN lanes ignored unless all are NaN).
@inlinable @inline(__always)
package func horizontalMax(_ v: SIMD16<Float>) -> Float {
    let a = v.lowHalf.replacing(with: v.highHalf, where: v.highHalf .> v.lowHalf)
    let b = a.lowHalf.replacing(with: a.highHalf, where: a.highHalf .> a.lowHalf)
    let c = b.lowHalf.replacing(with: b.highHalf, where: b.highHalf .> b.lowHalf)
    return c[1] > c[0] ? c[1] : c[0]
}

/// The sum of the lanes, by halving (a fixed order, so results are deterministic).
@inlinable @inline(__always)
package func horizontalSum(_ v: SIMD16<Float>) -> Float {
    let a = v.lowHalf + v.highHalf
    let b = a.lowHalf + a.highHalf
    let c = b.lowHalf + b.highHalf
    return c[0] + c[1]
}
