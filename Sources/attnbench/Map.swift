import ArgumentParser
import AttentionKit
import Foundation
import NumPyIO

/// The attention-probability heatmap of one head: what attends to what.
struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Draw the attention probabilities of one head as an SVG heatmap.",
        discussion: "Rows are queries i, columns keys j; colour is p[i, j] (scaled to the largest probability shown). Hidden keys are drawn in light grey."
    )

    @Option(name: .customLong("q"), help: "Query .npy file, [B, Hq, Nq, D].") var queryPath: String
    @Option(name: .customLong("k"), help: "Key .npy file, [B, Hkv, Nk, D].") var keyPath: String
    @Option(help: "Query head to draw.") var head: Int = 0
    @Option(help: "Batch entry to draw.") var batch: Int = 0
    @Flag(help: "Bottom-right aligned causal masking.") var causal = false
    @Option(help: ArgumentHelp("Sliding window L,R (-1 = unbounded side).", valueName: "L,R")) var window: AttentionWindow?
    @Option(help: "Score scale (default 1/sqrt(D)).") var scale: Float?
    @Option(help: "Softcap c > 0.") var softcap: Float?
    @Option(help: "Largest Nq and Nk drawn.") var maxTokens: Int = 1024
    @Option(name: .customLong("out"), help: "Output .svg file.") var outPath: String

    func run() throws {
        guard let qValues = try NPYArray.read(contentsOf: queryPath).floatsOrThrow(queryPath),
              let kValues = try NPYArray.read(contentsOf: keyPath).floatsOrThrow(keyPath) else { return }
        let (qShape, kShape) = (qValues.shape, kValues.shape)
        let q = try Tensor(shape: qShape, storage: qValues.values, name: "query (\(queryPath))")
        let k = try Tensor(shape: kShape, storage: kValues.values, name: "key (\(keyPath))")
        let problem = try AttentionProblem(query: q.shape, key: k.shape, value: k.shape,
                                           options: .init(scale: scale, softcap: softcap, causal: causal, window: window))
        guard (0..<problem.batch).contains(batch) else { throw CLIError("--batch \(batch) out of range 0..<\(problem.batch)") }
        guard (0..<problem.queryHeads).contains(head) else { throw CLIError("--head \(head) out of range 0..<\(problem.queryHeads)") }
        let (nq, nk, d) = (problem.queryLength, problem.keyLength, problem.headDim)
        guard nq <= maxTokens, nk <= maxTokens else {
            throw CLIError("Nq = \(nq), Nk = \(nk): a heatmap is for at most \(maxTokens) tokens per side (--max-tokens)")
        }
        // Probabilities in Double, following the contract (scale, softcap, bottom-right causal, window).
        var probabilities = [Double](repeating: -1, count: nq * nk)  // -1: hidden
        let kvHead = head / problem.groupSize
        for i in 0..<nq {
            let (lo, hi) = problem.visibleKeys(forQuery: i)
            guard lo <= hi else { continue }
            var scores = [Double](repeating: 0, count: nk)
            var m = -Double.infinity
            for j in lo...hi {
                var s = 0.0
                for c in 0..<d { s += Double(q[batch, head, i, c]) * Double(k[batch, kvHead, j, c]) }
                s *= Double(problem.scale)
                if let cap = softcap { s = Double(cap) * tanh(s / Double(cap)) }
                scores[j] = s
                m = max(m, s)
            }
            let sum = (lo...hi).reduce(0.0) { $0 + exp(scores[$1] - m) }
            for j in lo...hi { probabilities[i * nk + j] = exp(scores[j] - m) / sum }
        }
        let top = probabilities.max() ?? 1
        var rgb = [UInt8](repeating: 0, count: nq * nk * 3)
        for index in 0..<(nq * nk) {
            let p = probabilities[index]
            let (r, g, b) = p < 0 ? (235, 235, 235) : viridis(top > 0 ? p / top : 0)
            rgb[3 * index] = UInt8(r); rgb[3 * index + 1] = UInt8(g); rgb[3 * index + 2] = UInt8(b)
        }
        let png = PNG.encode(width: nk, height: nq, rgb: rgb).base64EncodedString()
        let side = 640.0
        let cell = min(side / Double(nk), side / Double(nq))
        let (w, h) = (Double(nk) * cell, Double(nq) * cell)
        let (left, top0) = (70.0, 80.0)
        var svg = """
        <svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="\(Int(left + w + 140))" height="\(Int(top0 + h + 60))" font-family="Helvetica, Arial, sans-serif" font-size="12">
        <rect width="100%" height="100%" fill="white"/>
        <text x="\(left)" y="24" font-size="16" font-weight="bold">Attention probabilities, batch \(batch), head \(head) (K/V head \(kvHead))</text>
        <text x="\(left)" y="44" fill="#555">\(xml(queryPath)) x \(xml(keyPath)); Nq = \(nq), Nk = \(nk), D = \(d)\(causal ? ", causal (bottom-right)" : "")\(window.map { ", window (\($0.left), \($0.right))" } ?? ""); grey = hidden</text>
        <text x="\(left + w / 2)" y="\(top0 - 22)" text-anchor="middle">key j</text>
        <text transform="translate(\(left - 45) \(top0 + h / 2)) rotate(-90)" text-anchor="middle">query i</text>
        <image x="\(left)" y="\(top0)" width="\(w)" height="\(h)" preserveAspectRatio="none" style="image-rendering: pixelated" xlink:href="data:image/png;base64,\(png)"/>
        <rect x="\(left)" y="\(top0)" width="\(w)" height="\(h)" fill="none" stroke="black"/>

        """
        for j in axisTicks(nk) {
            let x = left + (Double(j) + 0.5) * cell
            svg += "<line x1=\"\(x)\" y1=\"\(top0 - 4)\" x2=\"\(x)\" y2=\"\(top0)\" stroke=\"black\"/><text x=\"\(x)\" y=\"\(top0 - 7)\" text-anchor=\"middle\">\(j)</text>\n"
        }
        for i in axisTicks(nq) {
            let y = top0 + (Double(i) + 0.5) * cell
            svg += "<line x1=\"\(left - 4)\" y1=\"\(y)\" x2=\"\(left)\" y2=\"\(y)\" stroke=\"black\"/><text x=\"\(left - 7)\" y=\"\(y + 4)\" text-anchor=\"end\">\(i)</text>\n"
        }
        // Colour bar.
        let barX = left + w + 30
        for step in 0..<100 {
            let (r, g, b) = viridis(Double(step) / 99)
            svg += "<rect x=\"\(barX)\" y=\"\(top0 + h - Double(step + 1) * h / 100)\" width=\"18\" height=\"\(h / 100 + 0.5)\" fill=\"rgb(\(r),\(g),\(b))\"/>\n"
        }
        svg += "<text x=\"\(barX + 24)\" y=\"\(top0 + 10)\">\(format(top))</text><text x=\"\(barX + 24)\" y=\"\(top0 + h)\">0</text>\n"
        svg += "<text x=\"\(barX)\" y=\"\(top0 + h + 24)\">p[i, j]</text>\n</svg>\n"
        try writeText(svg, to: outPath)
        printError("heatmap of \(nq) x \(nk) probabilities written to \(outPath)")
    }

    private func axisTicks(_ n: Int) -> [Int] {
        let step = [1, 2, 5, 10, 20, 50, 100, 200, 500].first { n / $0 <= 10 } ?? 1000
        return Array(stride(from: 0, to: n, by: step))
    }
}

extension NPYArray {
    /// The fp32 values, or an error naming the file when the array holds booleans.
    func floatsOrThrow(_ path: String) throws -> (shape: [Int], values: [Float])? {
        guard let values = floats else { throw NPYError.wrongKind(file: path, expected: "floating-point", actual: fileDType.rawValue) }
        return (shape, values)
    }
}
