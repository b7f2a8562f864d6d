import AttentionCore

/// The problems of `attnbench verify`: a fixed grid of shapes and features, then (unless `quick`)
/// more fixed cases and seeded random problems.
public enum VerificationGrid {
    /// Storage combinations every layout is checked with: each of Q, K/V and O meets each type
    /// somewhere, and the types of Q and K/V vary independently.
    public static let storageCombinations: [StorageTypes] = [
        .f32, StorageTypes(keyValue: .f16), StorageTypes(keyValue: .bf16),
        StorageTypes(query: .f16, keyValue: .f16, output: .f16),
        StorageTypes(query: .bf16, keyValue: .bf16, output: .bf16),
        StorageTypes(query: .f16, keyValue: .f32, output: .bf16),
        StorageTypes(query: .f32, keyValue: .bf16, output: .f16),
    ]

    /// Small problems the layout x storage matrix of `verify` runs (every layout fits the first
    /// three; the last two are decode shapes: split-KV on OpenCL, key ranges on the CPU).
    public static func layoutCases(quick: Bool, seed: UInt64) -> [VerificationCase] {
        var cases = [
            VerificationCase(
                heads: (4, 2), nq: 33, nk: 33, d: 24, dv: 24, options: .init(causal: true), seed: seed,
                label: "causal GQA"),
            VerificationCase(
                batch: 2, heads: (2, 2), nq: 40, nk: 40, d: 16, dv: 16,
                options: .init(softcap: 5, window: .init(left: 7, right: 2)), seed: seed + 3,
                label: "softcap window"),
            VerificationCase(heads: (8, 2), nq: 1, nk: 1500, d: 64, dv: 64, seed: seed + 6, label: "GQA decode"),
        ]
        if !quick {
            cases += [
                VerificationCase(
                    heads: (4, 4), nq: 65, nk: 65, d: 32, dv: 32, amplitude: 20, seed: seed + 9,
                    label: "large logits"),
                VerificationCase(
                    heads: (4, 1), nq: 2, nk: 4500, d: 32, dv: 16, options: .init(causal: true),
                    seed: seed + 12, label: "MQA decode, key ranges"),
            ]
        }
        return cases
    }

    public static func cases(quick: Bool, seed: UInt64) throws(AttentionError) -> [VerificationCase] {
        var cases = try fixed(seed: seed)
        if !quick {
            cases += try extended(seed: seed)
            var rng = SplitMix64(seed: seed)
            for index in 0..<24 { cases.append(try random(index, seed: seed, using: &rng)) }
        }
        for index in cases.indices { cases[index].seed = seed &+ UInt64(3 * index) }
        return cases
    }

    private static func c(
        _ name: String, b: Int = 1, hq: Int, hkv: Int, nq: Int, nk: Int, d: Int, dv: Int,
        _ options: AttentionOptions = .init(), x: Float = 1
    ) -> VerificationCase {
        VerificationCase(
            batch: b, heads: (hq, hkv), nq: nq, nk: nk, d: d, dv: dv, options: options, amplitude: x, label: name)
    }

    private static func fixed(seed: UInt64) throws(AttentionError) -> [VerificationCase] {
        [
            c("tiny", hq: 1, hkv: 1, nq: 1, nk: 1, d: 1, dv: 1),
            c("odd", b: 2, hq: 4, hkv: 4, nq: 7, nk: 65, d: 3, dv: 5),
            c("gqa-causal", hq: 8, hkv: 2, nq: 130, nk: 130, d: 80, dv: 80, .init(causal: true)),
            c("mqa-decode", hq: 8, hkv: 1, nq: 1, nk: 777, d: 128, dv: 64, .init(causal: true)),
            c("cross Nq>Nk causal", hq: 4, hkv: 4, nq: 65, nk: 7, d: 32, dv: 32, .init(causal: true)),
            c(
                "sliding window", hq: 4, hkv: 2, nq: 200, nk: 300, d: 64, dv: 48,
                .init(causal: true, window: .init(left: 37, right: 0))),
            c(
                "two-sided window", hq: 2, hkv: 2, nq: 64, nk: 64, d: 16, dv: 16,
                .init(window: .init(left: 5, right: 3))),
            c(
                "bool mask", b: 2, hq: 4, hkv: 4, nq: 33, nk: 100, d: 32, dv: 32,
                .init(mask: try MaskGenerator.boolean(shape: [33, 100], seed: seed))),
            c(
                "float mask", b: 2, hq: 2, hkv: 1, nq: 40, nk: 90, d: 24, dv: 40,
                .init(mask: try MaskGenerator.additive(shape: [2, 1, 40, 90], seed: seed))),
            c("softcap", hq: 4, hkv: 4, nq: 64, nk: 64, d: 64, dv: 64, .init(softcap: 5), x: 4),
            c("scale", hq: 2, hkv: 2, nq: 50, nk: 70, d: 40, dv: 40, .init(scale: 0.9, causal: true)),
            c("large logits", hq: 4, hkv: 2, nq: 130, nk: 200, d: 64, dv: 64, x: 20),
            c("D 512", hq: 1, hkv: 1, nq: 17, nk: 300, d: 512, dv: 512, .init(causal: true)),
            c("decode long", b: 2, hq: 8, hkv: 2, nq: 1, nk: 3000, d: 128, dv: 128),
        ]
    }

    private static func extended(seed: UInt64) throws(AttentionError) -> [VerificationCase] {
        [
            c("odd 777", hq: 1, hkv: 1, nq: 777, nk: 777, d: 80, dv: 80, .init(causal: true)),
            c("D 256 Dv 200", hq: 2, hkv: 1, nq: 64, nk: 130, d: 256, dv: 200),
            c("decode 2 tokens", hq: 32, hkv: 8, nq: 2, nk: 4096, d: 128, dv: 128, .init(causal: true)),
            c(
                "softcap window mask", b: 2, hq: 4, hkv: 2, nq: 100, nk: 300, d: 64, dv: 32,
                .init(
                    softcap: 30, causal: true, window: .init(left: 64, right: 0),
                    mask: try MaskGenerator.boolean(shape: [100, 300], seed: seed + 1))),
        ]
    }

    private static func random(_ index: Int, seed: UInt64, using rng: inout SplitMix64) throws(AttentionError)
        -> VerificationCase
    {
        let hkv = [1, 2, 4].randomElement(using: &rng) ?? 1
        let hq = hkv * ([1, 2, 4].randomElement(using: &rng) ?? 1)
        let nq = [1, 2, 7, 64, 65, 130, 200].randomElement(using: &rng) ?? 1
        let nk = [1, 7, 64, 65, 130, 500].randomElement(using: &rng) ?? 1
        let d = [1, 3, 32, 64, 80, 128].randomElement(using: &rng) ?? 1
        let dv = Bool.random(using: &rng) ? d : [8, 48, 96].randomElement(using: &rng) ?? 8
        var options = AttentionOptions(causal: Bool.random(using: &rng))
        if Int.random(in: 0..<3, using: &rng) == 0 {
            options.window = .init(
                left: Int.random(in: -1...50, using: &rng), right: Int.random(in: -1...10, using: &rng))
        }
        if Int.random(in: 0..<4, using: &rng) == 0 { options.softcap = Float.random(in: 1...30, using: &rng) }
        if Int.random(in: 0..<4, using: &rng) == 0 {
            options.mask = try MaskGenerator.boolean(shape: [nq, nk], seed: seed &+ UInt64(index))
        }
        let batch = Int.random(in: 1...2, using: &rng)
        let amplitude = [1, 1, 5, 20].randomElement(using: &rng) ?? 1
        return c(
            "random \(index)", b: batch, hq: hq, hkv: hkv, nq: nq, nk: nk, d: d, dv: dv, options, x: Float(amplitude))
    }
}
