import ArgumentParser
import AttentionKit
import AttentionVerification
import Foundation
import TextTable

/// Shows the dispatcher's decision for a problem.
struct Explain: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Explain which backend the dispatcher picks for a problem, and why.",
        discussion:
            "Lists every backend/device: supported or why not, its estimated time from this machine's profile "
            + "(attnbench tune, or built-in defaults), and the winner."
    )

    @Argument(
        help: ArgumentHelp(
            "The problem: a standard shape name or NAME:b=1,hq=8,hkv=8,nq=1000,nk=1000,d=64[,dv=..][,causal].",
            valueName: "shape"))
    var shape: String
    @Option(help: ArgumentHelp("Sliding window L,R (-1 = unbounded side).", valueName: "L,R")) var window:
        AttentionWindow?
    @Option(help: "Softcap c > 0.") var softcap: Float?
    @Flag(help: "Print the decision as JSON.") var json = false

    struct Row: Codable {
        var backend, device, support: String
        var estimatedSeconds: Double?
        var detail: String
        var chosen: Bool
    }

    func run() throws {
        let spec = try ShapeSpec.parse(shape)
        let problem = try AttentionProblem(
            query: [spec.batch, spec.queryHeads, spec.queryLength, spec.headDim],
            key: [spec.batch, spec.keyValueHeads, spec.keyLength, spec.headDim],
            value: [spec.batch, spec.keyValueHeads, spec.keyLength, spec.valueDim],
            options: .init(softcap: softcap, causal: spec.causal, window: window))
        let selection = try BackendSelection.select(.auto, for: problem)
        guard let decision = selection.decision else {
            print("\(selection.backend.name): \(selection.reason)")
            return
        }
        let rows = decision.options.enumerated().map { index, option in
            Row(
                backend: option.backend.description, device: option.device, support: option.support.description,
                estimatedSeconds: option.estimatedSeconds, detail: option.detail, chosen: index == decision.chosenIndex)
        }
        if json {
            try printJSON(rows)
            return
        }
        let windowText = window.map { " window(\($0.left),\($0.right))" } ?? ""
        print("\(spec.name): \(spec.summary)\(windowText)\(softcap.map { " softcap \($0)" } ?? "")")
        print("profile: \(decision.profileSource)\n")
        let table = TextTable<Row> {
            [
                Column(title: "", value: $0.chosen ? "=>" : ""), Column(title: "backend", value: $0.backend),
                Column(title: "device", value: String($0.device.prefix(30))),
                Column(
                    title: "estimate", value: $0.estimatedSeconds.map { format($0 * 1e3) + " ms" } ?? "-", align: .right
                ),
                Column(
                    title: "supported",
                    value: $0.support.count > 80 ? String($0.support.prefix(77)) + "..." : $0.support),
                Column(title: "notes", value: $0.detail),
            ]
        }
        print(table.string(for: rows) ?? "")
        print("\nchosen: \(decision.winner.backend) — \(decision.reason)")
    }
}
