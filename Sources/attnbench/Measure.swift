import AttentionKit
import Dispatch
import Foundation

/// This machine's roofline, measured once per run of attnbench.
struct Roofline: Codable {
    var sgemmGFLOPS: Double
    var memoryReadGBps: Double
    var openBLASCore: String
    var openBLASCoreTypeOverride: String?

    static func measure() -> Roofline {
        Roofline(
            sgemmGFLOPS: MachineProbes.measureSGEMM(), memoryReadGBps: MachineProbes.measureReadBandwidth(),
            openBLASCore: CPUInfo.openBLASCore,
            openBLASCoreTypeOverride: ProcessInfo.processInfo.environment["OPENBLAS_CORETYPE"])
    }
}

/// Peak resident memory added by a piece of work: free heap memory is handed back to the kernel
/// (`malloc_trim`, so that memory the work allocates counts even where the allocator would reuse
/// pages freed earlier), the kernel's high-water mark is reset (`/proc/self/clear_refs`), the work
/// runs, and VmHWM minus the RSS before is the answer. `nil` where the kernel does not offer this
/// (non-Linux, restricted /proc).
enum PeakMemory {
    static func measure(_ body: () throws -> Void) rethrows -> Int? {
        _ = trimHeap?(0)
        let reset = (try? "5".write(toFile: "/proc/self/clear_refs", atomically: false, encoding: .utf8)) != nil
        let before = status("VmRSS")
        try body()
        guard reset, let before, let peak = status("VmHWM") else { return nil }
        return max(0, peak - before)
    }

    /// glibc's `malloc_trim` (not in the Glibc module's headers), where there is one.
    private static let trimHeap: (@convention(c) (Int) -> Int32)? = {
        #if os(Linux)
            guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "malloc_trim") else { return nil }
            return unsafeBitCast(symbol, to: (@convention(c) (Int) -> Int32).self)
        #else
            return nil
        #endif
    }()

    /// A `/proc/self/status` field in bytes.
    private static func status(_ field: String) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = text.split(separator: "\n").first(where: { $0.hasPrefix(field + ":") }),
            let kib = Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "")
        else { return nil }
        return kib * 1024
    }
}

/// Times `body`: one warm-up call (more for short calls), then repetitions until `repetitions`
/// are done or `budget` seconds are spent (at least one when `repetitions` > 0). Returns sorted
/// durations in seconds.
func timeCalls(repetitions: Int, budget: Double, _ body: () throws -> Void) throws -> [Double] {
    func once() throws -> Double {
        let start = DispatchTime.now().uptimeNanoseconds
        try body()
        return Double(DispatchTime.now().uptimeNanoseconds - start) / 1e9
    }
    let warm = try once()
    // Short calls: warm up for a while (the first calls of a process are slow); long ones are their own warm-up.
    var warmed = warm
    while warmed < 0.2 && warm < 0.05 { warmed += try once() }
    var times: [Double] = []
    var spent = 0.0
    while times.count < repetitions && (times.isEmpty || spent + times.last! <= budget) {
        let t = try once()
        times.append(t)
        spent += t
    }
    return times.sorted()
}

/// Progress on stderr: a bar on a terminal, one quiet line per step otherwise (or when CI is set).
final class Progress {
    let total: Int
    private var done = 0
    private let interactive: Bool

    init(total: Int) {
        self.total = max(1, total)
        interactive = isatty(2) == 1 && ProcessInfo.processInfo.environment["CI"] == nil
    }

    func step(_ label: String) {
        done += 1
        if interactive {
            let width = 30
            let filled = width * done / total
            let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
            FileHandle.standardError.write(Data("\r\u{1B}[K[\(bar)] \(done)/\(total) \(label)".utf8))
            if done == total { FileHandle.standardError.write(Data("\n".utf8)) }
        } else {
            printError("[\(done)/\(total)] \(label)")
        }
    }

    func finish() {
        if interactive && done < total { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}
