import AttentionKit
import Foundation

/// Escapes text for SVG/XML.
func xml(_ s: String) -> String {
    s.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;")
        .replacingOccurrences(of: ">", with: "&gt;").replacingOccurrences(of: "\"", with: "&quot;")
}

/// "Nice" axis steps: 1, 2 or 5 times a power of ten.
func niceTicks(max: Double, count: Int = 5) -> [Double] {
    guard max > 0, max.isFinite else { return [0] }
    let raw = max / Double(count)
    let magnitude = pow(10, floor(log10(raw)))
    let step = [1.0, 2, 5, 10].map { $0 * magnitude }.first { $0 >= raw } ?? raw
    return stride(from: 0, through: max, by: step).map { $0 }
}

let seriesColors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]

/// GFLOP/s against sequence length, one line per backend/device (solid: full attention, dashed:
/// causal), with the SGEMM roofline measured in the same run.
func svgPlot(_ rows: [BenchRow], roofline: Roofline) -> String {
    struct Point { var n: Int; var gflops: Double; var label: String }
    struct Series { var backend: String; var family: String; var causal: Bool; var points: [Point] }
    // Shapes of a family ("prefill-512", "prefill-1k"...) are joined into one line per backend.
    func family(_ name: String) -> String {
        guard let dash = name.lastIndex(of: "-"), name[name.index(after: dash)...].first?.isNumber == true else { return name }
        return String(name[..<dash])
    }
    var series: [Series] = []
    var devices: [String: String] = [:]
    for row in rows where row.skipped == nil {
        guard let gflops = row.gflops, let spec = try? ShapeSpec.parse(row.shape), !spec.isDecode else { continue }
        let backend = row.backendName
        if row.backend == "opencl" { devices[backend] = row.device }
        let point = Point(n: spec.keyLength, gflops: gflops, label: "\(row.shape) (\(spec.summary)) on \(backend): \(format(gflops)) GFLOP/s")
        let fam = family(row.shape)
        if let index = series.firstIndex(where: { $0.backend == backend && $0.family == fam }) {
            series[index].points.append(point)
        } else {
            series.append(Series(backend: backend, family: fam, causal: spec.causal, points: [point]))
        }
    }
    let width = 980.0, height = 580.0
    let (left, right, top, bottom) = (80.0, 300.0, 60.0, 70.0)
    let plotW = width - left - right, plotH = height - top - bottom
    let ns = Set(series.flatMap { $0.points.map(\.n) }).sorted()
    let xMin = log2(Double(ns.first ?? 128)) - 0.3, xMax = log2(Double(ns.last ?? 4096)) + 0.6
    let yMax = max(roofline.sgemmGFLOPS, series.flatMap { $0.points.map(\.gflops) }.max() ?? 1) * 1.1
    func x(_ n: Int) -> Double { left + (log2(Double(n)) - xMin) / max(xMax - xMin, 0.1) * plotW }
    func y(_ g: Double) -> Double { top + plotH - g / yMax * plotH }
    func tickLabel(_ v: Double) -> String { v == v.rounded() ? String(Int(v)) : format(v) }

    var svg = """
    <svg xmlns="http://www.w3.org/2000/svg" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" font-family="Helvetica, Arial, sans-serif" font-size="13">
    <rect width="100%" height="100%" fill="white"/>
    <text x="\(left)" y="28" font-size="17" font-weight="bold">Attention throughput vs sequence length (fp32)</text>
    <text x="\(left)" y="47" fill="#555">\(xml(CPUInfoSummary.line)); roofline measured in the same run</text>

    """
    for tick in niceTicks(max: yMax) {
        svg += "<line x1=\"\(left)\" y1=\"\(y(tick))\" x2=\"\(left + plotW)\" y2=\"\(y(tick))\" stroke=\"#e5e5e5\"/>\n"
        svg += "<text x=\"\(left - 8)\" y=\"\(y(tick) + 4)\" text-anchor=\"end\">\(tickLabel(tick))</text>\n"
    }
    for n in ns {
        svg += "<line x1=\"\(x(n))\" y1=\"\(top + plotH)\" x2=\"\(x(n))\" y2=\"\(top + plotH + 5)\" stroke=\"black\"/>\n"
        svg += "<text x=\"\(x(n))\" y=\"\(top + plotH + 20)\" text-anchor=\"middle\">\(n >= 1024 ? "\(n / 1024)k" : "\(n)")</text>\n"
    }
    svg += """
    <line x1="\(left)" y1="\(top)" x2="\(left)" y2="\(top + plotH)" stroke="black"/>
    <line x1="\(left)" y1="\(top + plotH)" x2="\(left + plotW)" y2="\(top + plotH)" stroke="black"/>
    <text x="\(left + plotW / 2)" y="\(height - 22)" text-anchor="middle">sequence length N (keys), log scale</text>
    <text transform="translate(22 \(top + plotH / 2)) rotate(-90)" text-anchor="middle">GFLOP/s (causal counts half the FLOPs)</text>
    <line x1="\(left)" y1="\(y(roofline.sgemmGFLOPS))" x2="\(left + plotW)" y2="\(y(roofline.sgemmGFLOPS))" stroke="black" stroke-width="1.5" stroke-dasharray="2 4"/>
    <text x="\(left + 6)" y="\(y(roofline.sgemmGFLOPS) - 6)">roofline: OpenBLAS SGEMM \(format(roofline.sgemmGFLOPS)) GFLOP/s (core \(xml(roofline.openBLASCore)))</text>

    """
    var backends: [String] = []
    for s in series where !backends.contains(s.backend) { backends.append(s.backend) }
    var labelled: Set<String> = []
    for s in series {
        let color = seriesColors[(backends.firstIndex(of: s.backend) ?? 0) % seriesColors.count]
        let points = s.points.sorted { $0.n < $1.n }
        if points.count > 1 {
            let path = points.map { "\(x($0.n)),\(y($0.gflops))" }.joined(separator: " ")
            svg += "<polyline points=\"\(path)\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"2.2\"\(s.causal ? " stroke-dasharray=\"7 4\"" : "")/>\n"
        }
        for p in points {
            svg += "<circle cx=\"\(x(p.n))\" cy=\"\(y(p.gflops))\" r=\"4\" fill=\"\(color)\"><title>\(xml(p.label))</title></circle>\n"
        }
        // Name each family once, next to its last point on the fastest backend's line.
        let best = series.filter { $0.family == s.family }.max { ($0.points.map(\.gflops).max() ?? 0) < ($1.points.map(\.gflops).max() ?? 0) }
        if let last = points.last, best?.backend == s.backend, !labelled.contains(s.family) {
            labelled.insert(s.family)
            svg += "<text x=\"\(x(last.n) + 7)\" y=\"\(y(last.gflops) - 7)\" fill=\"#333\" font-size=\"11\">\(xml(s.family))</text>\n"
        }
    }
    var legendY = top + 10
    let legendX = left + plotW + 25
    svg += "<text x=\"\(legendX)\" y=\"\(legendY)\" font-weight=\"bold\">backend</text>\n"
    for (index, name) in backends.enumerated() {
        legendY += 22
        let color = seriesColors[index % seriesColors.count]
        svg += "<line x1=\"\(legendX)\" y1=\"\(legendY - 4)\" x2=\"\(legendX + 30)\" y2=\"\(legendY - 4)\" stroke=\"\(color)\" stroke-width=\"2.5\"/>\n"
        svg += "<text x=\"\(legendX + 38)\" y=\"\(legendY)\">\(xml(name))</text>\n"
        if let device = devices[name] {
            legendY += 16
            svg += "<text x=\"\(legendX + 38)\" y=\"\(legendY)\" font-size=\"11\" fill=\"#555\">\(xml(String(device.prefix(38))))</text>\n"
        }
    }
    legendY += 30
    svg += "<line x1=\"\(legendX)\" y1=\"\(legendY - 4)\" x2=\"\(legendX + 30)\" y2=\"\(legendY - 4)\" stroke=\"#333\" stroke-width=\"2\"/>\n"
    svg += "<text x=\"\(legendX + 38)\" y=\"\(legendY)\">full attention</text>\n"
    legendY += 20
    svg += "<line x1=\"\(legendX)\" y1=\"\(legendY - 4)\" x2=\"\(legendX + 30)\" y2=\"\(legendY - 4)\" stroke=\"#333\" stroke-width=\"2\" stroke-dasharray=\"7 4\"/>\n"
    svg += "<text x=\"\(legendX + 38)\" y=\"\(legendY)\">causal</text>\n"
    legendY += 20
    svg += "<text x=\"\(legendX)\" y=\"\(legendY)\" font-size=\"11\" fill=\"#555\">decode shapes: see the table (GB/s)</text>\n"
    svg += "</svg>\n"
    return svg
}

enum CPUInfoSummary {
    static var line: String {
        let cpu = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8))?
            .split(separator: "\n").first { $0.hasPrefix("model name") }
            .map { String($0.split(separator: ":", maxSplits: 1).last ?? "").trimmingCharacters(in: .whitespaces) } ?? "CPU"
        return "\(cpu), \(CPUInfo.logicalCores) cores"
    }
}

// MARK: - PNG (for heatmaps)

/// A minimal PNG encoder: 8-bit RGB, zlib "stored" (uncompressed) deflate blocks.
enum PNG {
    static func encode(width: Int, height: Int, rgb: [UInt8]) -> Data {
        precondition(rgb.count == width * height * 3)
        var raw = [UInt8]()
        raw.reserveCapacity(height * (width * 3 + 1))
        for row in 0..<height {
            raw.append(0)  // filter: none
            raw.append(contentsOf: rgb[(row * width * 3)..<((row + 1) * width * 3)])
        }
        var zlib: [UInt8] = [0x78, 0x01]
        var offset = 0
        repeat {
            let length = min(65535, raw.count - offset)
            let final: UInt8 = offset + length == raw.count ? 1 : 0
            zlib += [final, UInt8(length & 0xFF), UInt8(length >> 8), UInt8(~length & 0xFF), UInt8((~length >> 8) & 0xFF)]
            zlib += raw[offset..<(offset + length)]
            offset += length
        } while offset < raw.count
        var a: UInt32 = 1, b: UInt32 = 0
        for byte in raw {
            a = (a + UInt32(byte)) % 65521
            b = (b + a) % 65521
        }
        zlib += bigEndian((b << 16) | a)
        var png: [UInt8] = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A]
        png += chunk("IHDR", bigEndian(UInt32(width)) + bigEndian(UInt32(height)) + [8, 2, 0, 0, 0])
        png += chunk("IDAT", zlib)
        png += chunk("IEND", [])
        return Data(png)
    }

    private static func bigEndian(_ x: UInt32) -> [UInt8] { [UInt8(x >> 24), UInt8((x >> 16) & 0xFF), UInt8((x >> 8) & 0xFF), UInt8(x & 0xFF)] }

    private static func chunk(_ type: String, _ data: [UInt8]) -> [UInt8] {
        let body = Array(type.utf8) + data
        return bigEndian(UInt32(data.count)) + body + bigEndian(crc32(body))
    }

    private static let crcTable: [UInt32] = (0..<256).map { n -> UInt32 in
        var c = UInt32(n)
        for _ in 0..<8 { c = c & 1 != 0 ? 0xEDB8_8320 ^ (c >> 1) : c >> 1 }
        return c
    }

    private static func crc32(_ bytes: [UInt8]) -> UInt32 {
        var c: UInt32 = 0xFFFF_FFFF
        for byte in bytes { c = crcTable[Int((c ^ UInt32(byte)) & 0xFF)] ^ (c >> 8) }
        return c ^ 0xFFFF_FFFF
    }
}

/// A perceptual colour scale (viridis stops), t in [0, 1].
func viridis(_ t: Double) -> (UInt8, UInt8, UInt8) {
    let stops: [(Double, Double, Double)] = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]
    let x = min(max(t, 0), 1) * Double(stops.count - 1)
    let i = min(Int(x), stops.count - 2)
    let f = x - Double(i)
    let (a, b) = (stops[i], stops[i + 1])
    return (UInt8(a.0 + (b.0 - a.0) * f), UInt8(a.1 + (b.1 - a.1) * f), UInt8(a.2 + (b.2 - a.2) * f))
}
