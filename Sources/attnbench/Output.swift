import Foundation

// What attnbench prints and writes: one place for formatting and files.

func printError(_ line: String) {
    FileHandle.standardError.write(Data((line + "\n").utf8))
}

func format(_ x: Double) -> String {
    if x == 0 || !x.isFinite { return "\(x)" }
    if abs(x) >= 100 { return String(format: "%.0f", x) }
    if abs(x) >= 1 { return String(format: "%.2f", x) }
    if abs(x) >= 0.01 { return String(format: "%.3f", x) }
    return String(format: "%.2e", x)
}

func writeJSON<T: Encodable>(_ value: T, to path: String) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.keyEncodingStrategy = .convertToSnakeCase
    encoder.nonConformingFloatEncodingStrategy = .convertToString(
        positiveInfinity: "inf", negativeInfinity: "-inf", nan: "nan")
    try writeData(try encoder.encode(value), to: path)
}

func writeCSV(_ rows: [BenchRow], to path: String) throws {
    let columns = [
        "shape", "backend", "device", "kernel", "median_seconds", "min_seconds", "max_seconds", "repetitions", "gflops",
        "roofline_fraction", "kv_gbps", "bandwidth_fraction", "max_abs_error", "nmse", "peak_extra_bytes",
        "dispatcher_pick", "skipped",
    ]
    var text = columns.joined(separator: ",") + "\n"
    func field(_ s: String?) -> String {
        guard let s else { return "" }
        return s.contains(",") || s.contains("\"") ? "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\"" : s
    }
    func num(_ x: Double?) -> String { x.map { "\($0)" } ?? "" }
    for r in rows {
        text +=
            [
                field(r.shape), field(r.backend), field(r.device), field(r.kernel), num(r.medianSeconds),
                num(r.minSeconds), num(r.maxSeconds),
                "\(r.repetitions)", num(r.gflops), num(r.rooflineFraction), num(r.keyValueGBps),
                num(r.bandwidthFraction),
                num(r.maxAbsError), num(r.nmse), r.peakExtraBytes.map(String.init) ?? "", field(r.dispatcherPick),
                field(r.skipped),
            ].joined(separator: ",") + "\n"
    }
    try writeText(text, to: path)
}

func writeText(_ text: String, to path: String) throws { try writeData(Data(text.utf8), to: path) }

func writeData(_ data: Data, to path: String) throws {
    do {
        try data.write(to: URL(fileURLWithPath: path), options: .atomic)
    } catch {
        throw CLIError("\(path): cannot write: \((error as NSError).localizedDescription)")
    }
}

func printJSON<T: Encodable>(_ value: T) throws {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    encoder.keyEncodingStrategy = .convertToSnakeCase
    print(String(decoding: try encoder.encode(value), as: UTF8.self))
}
