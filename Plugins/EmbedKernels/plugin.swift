import Foundation
import PackagePlugin

/// Embeds the target's `.cl` files into a generated Swift file (`KernelSources.swift`), so the
/// kernels stay real files under `Kernels/` and the binary needs nothing at run time.
@main
struct EmbedKernels: BuildToolPlugin {
    func createBuildCommands(context: PluginContext, target: Target) async throws -> [Command] {
        let directory = target.directoryURL
        let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
            .filter { $0.hasSuffix(".cl") }
            .sorted()
        let inputs = names.map { directory.appendingPathComponent($0) }
        let output = context.pluginWorkDirectoryURL.appendingPathComponent("KernelSources.swift")
        return [
            .buildCommand(
                displayName: "Embedding \(names.count) OpenCL kernel files",
                executable: try context.tool(named: "embed-kernels").url,
                arguments: [output.path] + inputs.map(\.path),
                inputFiles: inputs,
                outputFiles: [output]
            )
        ]
    }
}
