import ArgumentParser
import AttentionKit
import Foundation
import NumPyIO

/// The attention-probability heatmap of one head: what attends to what.
struct Map: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Draw the attention probabilities of one head as an SVG heatmap.",
        discussion:
            "Rows are queries i, columns keys j; colour is p[i, j] as the float64 reference computes it "
            + "(scale, softcap, causal, window and mask applied), scaled to the largest probability shown. "
            + "Hidden keys are drawn in light grey."
    )

    @Option(name: .customLong("q"), help: "Query .npy file, [B, Hq, Nq, D].") var queryPath: String
    @Option(name: .customLong("k"), help: "Key .npy file, [B, Hkv, Nk, D].") var keyPath: String
    @Option(help: "Query head to draw.") var head: Int = 0
    @Option(help: "Batch entry to draw.") var batch: Int = 0
    @Flag(help: "Bottom-right aligned causal masking.") var causal = false
    @Option(help: ArgumentHelp("Sliding window L,R (-1 = unbounded side).", valueName: "L,R")) var window:
        AttentionWindow?
    @Option(help: "Score scale (default 1/sqrt(D)).") var scale: Float?
    @Option(help: "Softcap c > 0.") var softcap: Float?
    @Option(name: .customLong("mask"), help: "Mask .npy file (bool or float), broadcastable to [B, Hq, Nq, Nk].")
    var maskPath: String?
    @Option(help: "Largest Nq and Nk drawn.") var maxTokens: Int = 1024
    @Option(name: .customLong("out"), help: "Output .svg file.") var outPath: String

    func run() throws {
        guard let qValues = try NPYArray.read(contentsOf: queryPath).floatsOrThrow(queryPath),
            let kValues = try NPYArray.read(contentsOf: keyPath).floatsOrThrow(keyPath)
        else { return }
        let q = try Tensor(shape: qValues.shape, storage: qValues.values, name: "query (\(queryPath))")
        let k = try Tensor(shape: kValues.shape, storage: kValues.values, name: "key (\(keyPath))")
        var options = AttentionOptions(scale: scale, softcap: softcap, causal: causal, window: window)
        if let maskPath { options.mask = try loadMask(maskPath) }
        let problem = try AttentionProblem(query: q.shape, key: k.shape, value: k.shape, options: options)
        guard (0..<problem.batch).contains(batch) else {
            throw CLIError("--batch \(batch) out of range 0..<\(problem.batch)")
        }
        guard (0..<problem.queryHeads).contains(head) else {
            throw CLIError("--head \(head) out of range 0..<\(problem.queryHeads)")
        }
        let (nq, nk) = (problem.queryLength, problem.keyLength)
        guard nq <= maxTokens, nk <= maxTokens else {
            throw CLIError(
                "Nq = \(nq), Nk = \(nk): a heatmap is for at most \(maxTokens) tokens per side (--max-tokens)")
        }
        let probabilities = NaiveBackend.probabilities(problem, query: q, key: k, batch: batch, head: head)
        try writeText(heatmap(probabilities, problem), to: outPath)
        printError("heatmap of \(nq) x \(nk) probabilities written to \(outPath)")
    }

    /// The SVG: title, the probabilities as an embedded PNG, axes and a colour bar.
    private func heatmap(_ probabilities: [Double?], _ problem: AttentionProblem) -> String {
        let (nq, nk, d) = (problem.queryLength, problem.keyLength, problem.headDim)
        let top = probabilities.compactMap { $0 }.max() ?? 1
        let png = PNG.encode(width: nk, height: nq, rgb: pixels(probabilities, scale: top)).base64EncodedString()
        let cell = min(640 / Double(nk), 640 / Double(nq))
        let (w, h) = (Double(nk) * cell, Double(nq) * cell)
        let (left, top0) = (70.0, 80.0)
        var rules = causal ? ", causal (bottom-right)" : ""
        rules += window.map { ", window (\($0.left), \($0.right))" } ?? ""
        rules += maskPath.map { ", mask \(xml($0))" } ?? ""
        var svg = """
            <svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" \
            width="\(Int(left + w + 140))" height="\(Int(top0 + h + 60))" font-family="Helvetica, Arial, \
            sans-serif" font-size="12">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="24" font-size="16" font-weight="bold">Attention probabilities, batch \(batch), \
            head \(head) (K/V head \(head / problem.groupSize))</text>
            <text x="\(left)" y="44" fill="#555">\(xml(queryPath)) x \(xml(keyPath)); Nq = \(nq), Nk = \(nk), D = \
            \(d)\(rules); \
            grey = hidden</text>
            <text x="\(left + w / 2)" y="\(top0 - 22)" text-anchor="middle">key j</text>
            <text transform="translate(\(left - 45) \(top0 + h / 2)) rotate(-90)" text-anchor="middle">query i</text>
            <image x="\(left)" y="\(top0)" width="\(w)" height="\(h)" preserveAspectRatio="none" \
            style="image-rendering: pixelated" xlink:href="data:image/png;base64,\(png)"/>
            <rect x="\(left)" y="\(top0)" width="\(w)" height="\(h)" fill="none" stroke="black"/>

            """
        for j in axisTicks(nk) {
            let x = left + (Double(j) + 0.5) * cell
            svg +=
                "<line x1=\"\(x)\" y1=\"\(top0 - 4)\" x2=\"\(x)\" y2=\"\(top0)\" stroke=\"black\"/>"
                + "<text x=\"\(x)\" y=\"\(top0 - 7)\" text-anchor=\"middle\">\(j)</text>\n"
        }
        for i in axisTicks(nq) {
            let y = top0 + (Double(i) + 0.5) * cell
            svg +=
                "<line x1=\"\(left - 4)\" y1=\"\(y)\" x2=\"\(left)\" y2=\"\(y)\" stroke=\"black\"/>"
                + "<text x=\"\(left - 7)\" y=\"\(y + 4)\" text-anchor=\"end\">\(i)</text>\n"
        }
        return svg + colourBar(x: left + w + 30, top: top0, height: h, maximum: top) + "</svg>\n"
    }

    /// RGB bytes, row-major: viridis of p / scale, light grey where hidden.
    private func pixels(_ probabilities: [Double?], scale: Double) -> [UInt8] {
        var rgb: [UInt8] = []
        rgb.reserveCapacity(probabilities.count * 3)
        for p in probabilities {
            let (r, g, b) = p.map { viridis(scale > 0 ? $0 / scale : 0) } ?? (235, 235, 235)
            rgb += [r, g, b]
        }
        return rgb
    }

    private func colourBar(x barX: Double, top: Double, height h: Double, maximum: Double) -> String {
        var svg = ""
        for step in 0..<100 {
            let (r, g, b) = viridis(Double(step) / 99)
            svg +=
                "<rect x=\"\(barX)\" y=\"\(top + h - Double(step + 1) * h / 100)\" width=\"18\" "
                + "height=\"\(h / 100 + 0.5)\" fill=\"rgb(\(r),\(g),\(b))\"/>\n"
        }
        svg +=
            "<text x=\"\(barX + 24)\" y=\"\(top + 10)\">\(format(maximum))</text>"
            + "<text x=\"\(barX + 24)\" y=\"\(top + h)\">0</text>\n"
        return svg + "<text x=\"\(barX)\" y=\"\(top + h + 24)\">p[i, j]</text>\n"
    }

    private func axisTicks(_ n: Int) -> [Int] {
        let step = [1, 2, 5, 10, 20, 50, 100, 200, 500].first { n / $0 <= 10 } ?? 1000
        return Array(stride(from: 0, to: n, by: step))
    }
}
