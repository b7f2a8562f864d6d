import AttentionCore

/// A benchmark problem shape. Standard ones have names used across AttentionKit's docs and notes,
/// `attnbench` and the regression benchmarks.
public struct ShapeSpec: Codable, Hashable, Sendable {
    public var name: String
    public var batch: Int
    public var queryHeads: Int
    public var keyValueHeads: Int
    public var queryLength: Int
    public var keyLength: Int
    public var headDim: Int
    public var valueDim: Int
    public var causal: Bool

    public var regime: AttentionProblem.Regime { AttentionProblem.regime(queryLength: queryLength) }

    public func problem(storage: StorageTypes = .f32) throws(AttentionError) -> AttentionProblem {
        try AttentionProblem(
            query: [batch, queryHeads, queryLength, headDim], key: [batch, keyValueHeads, keyLength, headDim],
            value: [batch, keyValueHeads, keyLength, valueDim], options: .init(causal: causal), storage: storage)
    }

    /// Reproducible inputs: Q, K, V uniform in [-1, 1] from seeds 1, 2, 3.
    public func inputs() throws(AttentionError) -> (query: Tensor, key: Tensor, value: Tensor) {
        let p = try problem()
        return (
            try .random(shape: p.queryShape, seed: 1), try .random(shape: p.keyShape, seed: 2),
            try .random(shape: p.valueShape, seed: 3)
        )
    }

    public var summary: String {
        "B\(batch) H\(queryHeads)\(keyValueHeads == queryHeads ? "" : "/\(keyValueHeads)") "
            + (queryLength == keyLength ? "N\(queryLength)" : "Nq\(queryLength) Nk\(keyLength)")
            + " D\(headDim)\(valueDim == headDim ? "" : " Dv\(valueDim)")\(causal ? " causal" : "")"
    }

    public static func make(
        _ name: String, b: Int = 1, hq: Int, hkv: Int? = nil, nq: Int, nk: Int? = nil, d: Int, causal: Bool = false
    ) -> ShapeSpec {
        ShapeSpec(
            name: name, batch: b, queryHeads: hq, keyValueHeads: hkv ?? hq, queryLength: nq, keyLength: nk ?? nq,
            headDim: d, valueDim: d, causal: causal)
    }

    public static let standard: [ShapeSpec] = [
        make("small-128", b: 4, hq: 8, nq: 128, d: 64),
        make("prefill-512", hq: 8, nq: 512, d: 64),
        make("prefill-1k", hq: 8, nq: 1024, d: 64),
        make("prefill-2k", hq: 8, nq: 2048, d: 64),
        make("prefill-4k", hq: 8, nq: 4096, d: 64),
        make("causal-2k", hq: 8, nq: 2048, d: 64, causal: true),
        make("causal-4k", hq: 8, nq: 4096, d: 64, causal: true),
        make("gqa-causal-2k", hq: 32, hkv: 8, nq: 2048, d: 128, causal: true),
        make("decode-4k", hq: 32, hkv: 8, nq: 1, nk: 4096, d: 128),
        make("decode-32k", hq: 32, hkv: 8, nq: 1, nk: 32768, d: 128),
        make("long-64k", hq: 1, nq: 65536, d: 64, causal: true),
    ]

    /// A standard name, or a custom shape `NAME:b=1,hq=8,hkv=8,nq=1000,nk=1000,d=64,dv=64,causal`
    /// (hkv defaults to hq, nk to nq, dv to d, b to 1).
    public static func parse(_ text: String) throws(ShapeSyntaxError) -> ShapeSpec {
        if let known = standard.first(where: { $0.name == text }) { return known }
        let parts = text.split(separator: ":", maxSplits: 1)
        guard parts.count == 2 else {
            throw ShapeSyntaxError(
                "unknown shape '\(text)': use one of \(standard.map(\.name).joined(separator: ", ")), or "
                    + "NAME:b=1,hq=8,nq=1000,d=64[,hkv=..,nk=..,dv=..,causal]"
            )
        }
        var values: [String: Int] = [:]
        var causal = false
        for item in parts[1].split(separator: ",") {
            if item == "causal" {
                causal = true
                continue
            }
            let kv = item.split(separator: "=")
            guard kv.count == 2, let value = Int(kv[1]), value > 0,
                ["b", "hq", "hkv", "nq", "nk", "d", "dv"].contains(String(kv[0]))
            else {
                throw ShapeSyntaxError(
                    "shape '\(text)': cannot read '\(item)' (keys b, hq, hkv, nq, nk, d, dv: positive "
                        + "integers; or 'causal')"
                )
            }
            values[String(kv[0])] = value
        }
        guard let hq = values["hq"], let nq = values["nq"], let d = values["d"] else {
            throw ShapeSyntaxError("shape '\(text)' needs at least hq, nq and d")
        }
        return ShapeSpec(
            name: String(parts[0]), batch: values["b"] ?? 1, queryHeads: hq, keyValueHeads: values["hkv"] ?? hq,
            queryLength: nq, keyLength: values["nk"] ?? nq, headDim: d, valueDim: values["dv"] ?? d, causal: causal)
    }
}

/// A shape written in a way `ShapeSpec.parse` cannot read; the message says how to write it.
public struct ShapeSyntaxError: Error, Equatable, Sendable, CustomStringConvertible {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
