import ArgumentParser

@main
struct AttnBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attnbench",
        abstract: "Run, check and time transformer attention with AttentionKit's backends.",
        subcommands: [
            Report.self, Bench.self, Verify.self, Run.self, Devices.self, Explain.self, Tune.self, Map.self,
            Extremes.self, Ring.self,
        ],
        defaultSubcommand: Report.self
    )
}

/// A one-line error for the user; `attnbench` exits non-zero with it on stderr.
struct CLIError: Error, CustomStringConvertible {
    let description: String
    init(_ message: String) { description = message }
}
