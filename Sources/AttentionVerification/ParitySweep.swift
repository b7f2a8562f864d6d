import AttentionCore

/// The parity sweep the tests run on every backend: every (Nq, Nk) pair of odd and round lengths,
/// with head dimensions, head layouts, batch and features rotating so that every value of every
/// axis meets every feature somewhere, plus hand-picked feature cases.
public enum ParitySweep {
    public static let lengths = [1, 2, 7, 64, 65, 130, 777]
    public static let dims = [1, 3, 32, 64, 80, 128, 256, 512]
    public static let headConfigs = [(1, 1), (4, 4), (8, 2), (8, 1)]
    /// Largest naive work (multiply-adds) of a sweep case: heads, then batch, shrink to fit.
    public static let maxWork = 300_000_000

    public static func cases() throws(AttentionError) -> [VerificationCase] {
        var out: [VerificationCase] = []
        for variant in 0..<2 {
            for (a, nq) in lengths.enumerated() {
                for (b, nk) in lengths.enumerated() {
                    out.append(try sweepCase(index: out.count, variant: variant, a: a, nq: nq, b: b, nk: nk))
                }
            }
        }
        return out
    }

    private static func sweepCase(index: Int, variant: Int, a: Int, nq: Int, b: Int, nk: Int) throws(AttentionError)
        -> VerificationCase
    {
        var c = VerificationCase(nq: nq, nk: nk)
        c.d = dims[(a * 3 + b + 5 * variant) % dims.count]
        c.dv = (a + b + variant) % 3 == 0 ? c.d : dims[(a + 2 * b + 1 + variant) % dims.count]
        c.heads = headConfigs[(a + b + variant) % headConfigs.count]
        c.batch = 1 + (a * b + variant) % 2
        c.seed = UInt64(100 + index)
        let featureIndex = index + 4 * variant
        c.options = try feature(featureIndex, c)
        while c.work > maxWork && (c.heads.q > 1 || c.batch > 1) {
            if c.heads.q > 1 { c.heads = (c.heads.q / 2, max(1, c.heads.kv / 2)) } else { c.batch = 1 }
            c.options = try feature(featureIndex, c)
        }
        return c
    }

    /// The feature mix of case `index` (masks sized for `c`).
    static func feature(_ index: Int, _ c: VerificationCase) throws(AttentionError) -> AttentionOptions {
        let seed = c.seed &* 31
        switch index % 9 {
        case 0: return .init()
        case 1: return .init(causal: true)
        case 2: return .init(window: .init(left: 5, right: 3))
        case 3: return .init(causal: true, window: .init(left: 16, right: 0))
        case 4:  // boolean mask broadcast over batch, ~70% visible, some rows fully hidden
            return .init(mask: try MaskGenerator.boolean(shape: [1, c.heads.q, c.nq, c.nk], seed: seed))
        case 5:  // float mask over [B, 1, Nq, Nk] with -inf entries
            return .init(mask: try MaskGenerator.additive(shape: [c.batch, 1, c.nq, c.nk], seed: seed))
        case 6: return .init(softcap: 5)
        case 7: return .init(scale: 0.9, causal: true)
        default: return .init(softcap: 20, causal: true, window: .init(left: 40, right: -1))
        }
    }

    /// Hand-picked cases for what the sweep reaches only by chance: large logits, MQA/GQA decode,
    /// early rows that see nothing, single diagonals, windows wider than the keys, D = 512.
    public static let featureCases: [VerificationCase] = [
        .init(batch: 2, heads: (8, 2), nq: 130, nk: 130, d: 64, dv: 64, amplitude: 20, label: "large logits"),
        .init(
            heads: (4, 4), nq: 65, nk: 777, d: 128, dv: 128, options: .init(causal: true), amplitude: 20,
            label: "large logits causal"),
        .init(heads: (8, 1), nq: 1, nk: 777, d: 256, dv: 64, label: "MQA decode"),
        .init(
            batch: 2, heads: (8, 2), nq: 2, nk: 1030, d: 128, dv: 128, options: .init(causal: true),
            label: "GQA decode two tokens"),
        .init(
            heads: (4, 4), nq: 130, nk: 7, d: 32, dv: 32, options: .init(causal: true),
            label: "Nq > Nk causal: early rows see nothing"),
        .init(nq: 64, nk: 64, d: 32, dv: 32, options: .init(window: .init(left: 0, right: 0)), label: "diagonal only"),
        .init(
            heads: (2, 2), nq: 64, nk: 200, d: 16, dv: 16, options: .init(window: .init(left: 500, right: -1)),
            label: "window wider than keys"),
        .init(nq: 600, nk: 600, d: 3, dv: 200, options: .init(causal: true), label: "many key blocks, odd dims"),
        .init(
            nq: 33, nk: 1500, d: 512, dv: 512,
            options: .init(softcap: 30, causal: true, window: .init(left: 700, right: 0)), label: "D 512 sliding window"
        ),
        .init(
            batch: 2, heads: (8, 2), nq: 3, nk: 5000, d: 64, dv: 48,
            options: .init(causal: true, window: .init(left: 2500, right: -1)),
            label: "decode over several key ranges"),
        .init(
            heads: (4, 1), nq: 1, nk: 6000, d: 32, dv: 32,
            options: .init(softcap: 20, window: .init(left: 100, right: 0)), label: "key ranges that see nothing"),
    ]
}
