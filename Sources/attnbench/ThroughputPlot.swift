import AttentionKit
import AttentionVerification
import Foundation

/// GFLOP/s against sequence length, one line per backend/device (solid: full attention, dashed:
/// causal), with the SGEMM roofline measured in the same run.
func svgPlot(_ rows: [BenchRow], roofline: Roofline) -> String {
    let plot = ThroughputPlot(rows: rows, roofline: roofline)
    return plot.header() + plot.axes() + plot.lines() + plot.legend() + "</svg>\n"
}

private struct ThroughputPlot {
    struct Point {
        var n: Int
        var gflops: Double
        var label: String
    }
    struct Series {
        var backend: String
        var family: String
        var causal: Bool
        var points: [Point]
    }

    static let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    let width = 980.0, height = 580.0
    let left = 80.0, right = 300.0, top = 60.0, bottom = 70.0
    let roofline: Roofline
    let series: [Series]
    /// Backends in order of first appearance, and the OpenCL devices behind their names.
    let backends: [String]
    let devices: [String: String]
    let lengths: [Int]
    let xMin: Double, xMax: Double, yMax: Double

    var plotW: Double { width - left - right }
    var plotH: Double { height - top - bottom }

    init(rows: [BenchRow], roofline: Roofline) {
        self.roofline = roofline
        var series: [Series] = []
        var devices: [String: String] = [:]
        for row in rows where row.skipped == nil {
            guard let gflops = row.gflops, let spec = try? ShapeSpec.parse(row.shape), spec.regime == .prefillLike
            else { continue }
            let backend = row.backendName
            if row.backend == "opencl" { devices[backend] = row.device }
            let label = "\(row.shape) (\(spec.summary)) on \(backend): \(format(gflops)) GFLOP/s"
            let point = Point(n: spec.keyLength, gflops: gflops, label: label)
            let family = Self.family(row.shape)
            if let index = series.firstIndex(where: { $0.backend == backend && $0.family == family }) {
                series[index].points.append(point)
            } else {
                series.append(Series(backend: backend, family: family, causal: spec.causal, points: [point]))
            }
        }
        self.series = series
        self.devices = devices
        var backends: [String] = []
        for s in series where !backends.contains(s.backend) { backends.append(s.backend) }
        self.backends = backends
        lengths = Set(series.flatMap { $0.points.map(\.n) }).sorted()
        xMin = log2(Double(lengths.first ?? 128)) - 0.3
        xMax = log2(Double(lengths.last ?? 4096)) + 0.6
        yMax = max(roofline.sgemmGFLOPS, series.flatMap { $0.points.map(\.gflops) }.max() ?? 1) * 1.1
    }

    /// Shapes of a family ("prefill-512", "prefill-1k"...) are joined into one line per backend.
    static func family(_ name: String) -> String {
        guard let dash = name.lastIndex(of: "-"), name[name.index(after: dash)...].first?.isNumber == true else {
            return name
        }
        return String(name[..<dash])
    }

    func x(_ n: Int) -> Double { left + (log2(Double(n)) - xMin) / max(xMax - xMin, 0.1) * plotW }
    func y(_ g: Double) -> Double { top + plotH - g / yMax * plotH }

    func header() -> String {
        let machine = "\(CPUInfo.modelName ?? "CPU"), \(CPUInfo.logicalCores) cores"
        return """
            <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" \
            viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="13">
            <rect width="100%" height="100%" fill="white"/>
            <text x="\(left)" y="28" font-size="17" font-weight="bold">Attention throughput vs sequence length \
            (fp32)</text>
            <text x="\(left)" y="47" fill="#555">\(xml(machine)); roofline measured in the same run</text>

            """
    }

    func axes() -> String {
        func tickLabel(_ v: Double) -> String { v == v.rounded() ? String(Int(v)) : format(v) }
        var svg = ""
        for tick in niceTicks(max: yMax) {
            svg +=
                "<line x1=\"\(left)\" y1=\"\(y(tick))\" x2=\"\(left + plotW)\" y2=\"\(y(tick))\" stroke=\"#e5e5e5\"/>\n"
            svg += "<text x=\"\(left - 8)\" y=\"\(y(tick) + 4)\" text-anchor=\"end\">\(tickLabel(tick))</text>\n"
        }
        for n in lengths {
            let label = n >= 1024 ? "\(n / 1024)k" : "\(n)"
            svg +=
                "<line x1=\"\(x(n))\" y1=\"\(top + plotH)\" x2=\"\(x(n))\" y2=\"\(top + plotH + 5)\" "
                + "stroke=\"black\"/>\n"
            svg += "<text x=\"\(x(n))\" y=\"\(top + plotH + 20)\" text-anchor=\"middle\">\(label)</text>\n"
        }
        let sgemm = roofline.sgemmGFLOPS
        return svg + """
            <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(top + plotH)" stroke="black"/>
            <line x1="\(left)" y1="\(top + plotH)" x2="\(left + plotW)" y2="\(top + plotH)" stroke="black"/>
            <text x="\(left + plotW / 2)" y="\(height - 22)" text-anchor="middle">sequence length N (keys), log \
            scale</text>
            <text transform="translate(22 \(top + plotH / 2)) rotate(-90)" text-anchor="middle">\
            GFLOP/s (causal counts half the FLOPs)</text>
            <line x1="\(left)" y1="\(y(sgemm))" x2="\(left + plotW)" y2="\(y(sgemm))" stroke="black" \
            stroke-width="1.5" \
            stroke-dasharray="2 4"/>
            <text x="\(left + 6)" y="\(y(sgemm) - 6)">roofline: OpenBLAS SGEMM \(format(sgemm)) GFLOP/s \
            (core \(xml(roofline.openBLASCore)))</text>

            """
    }

    func color(_ backend: String) -> String { Self.colors[(backends.firstIndex(of: backend) ?? 0) % Self.colors.count] }

    func lines() -> String {
        var svg = ""
        var labelled: Set<String> = []
        for s in series {
            let color = color(s.backend)
            let points = s.points.sorted { $0.n < $1.n }
            if points.count > 1 {
                let path = points.map { "\(x($0.n)),\(y($0.gflops))" }.joined(separator: " ")
                let dash = s.causal ? " stroke-dasharray=\"7 4\"" : ""
                svg += "<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2.2\"\(dash)/>\n"
            }
            for p in points {
                svg +=
                    "<circle cx=\"\(x(p.n))\" cy=\"\(y(p.gflops))\" r=\"4\" fill=\"\(color)\">"
                    + "<title>\(xml(p.label))</title></circle>\n"
            }
            // Name each family once, next to its last point on the fastest backend's line.
            let peak = { (s: Series) in s.points.map(\.gflops).max() ?? 0 }
            let best = series.filter { $0.family == s.family }.max { peak($0) < peak($1) }
            if let last = points.last, best?.backend == s.backend, !labelled.contains(s.family) {
                labelled.insert(s.family)
                svg +=
                    "<text x=\"\(x(last.n) + 7)\" y=\"\(y(last.gflops) - 7)\" fill=\"#333\" font-size=\"11\">"
                    + "\(xml(s.family))</text>\n"
            }
        }
        return svg
    }

    func legend() -> String {
        let legendX = left + plotW + 25
        var legendY = top + 10
        func sample(_ color: String, dashed: Bool = false, width: Double = 2.5) -> String {
            let dash = dashed ? " stroke-dasharray=\"7 4\"" : ""
            return "<line x1=\"\(legendX)\" y1=\"\(legendY - 4)\" x2=\"\(legendX + 30)\" y2=\"\(legendY - 4)\" "
                + "stroke=\"\(color)\" stroke-width=\"\(width)\"\(dash)/>\n"
        }
        func text(_ s: String, x: Double, small: Bool = false) -> String {
            "<text x=\"\(x)\" y=\"\(legendY)\"\(small ? " font-size=\"11\" fill=\"#555\"" : "")>\(xml(s))</text>\n"
        }
        var svg = "<text x=\"\(legendX)\" y=\"\(legendY)\" font-weight=\"bold\">backend</text>\n"
        for name in backends {
            legendY += 22
            svg += sample(color(name)) + text(name, x: legendX + 38)
            if let device = devices[name] {
                legendY += 16
                svg += text(String(device.prefix(38)), x: legendX + 38, small: true)
            }
        }
        legendY += 30
        svg += sample("#333", width: 2) + text("full attention", x: legendX + 38)
        legendY += 20
        svg += sample("#333", dashed: true, width: 2) + text("causal", x: legendX + 38)
        legendY += 20
        return svg + text("decode shapes: see the table (GB/s)", x: legendX, small: true)
    }
}
