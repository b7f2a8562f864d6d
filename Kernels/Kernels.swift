// The OpenCL C sources in this folder are embedded by the EmbedKernels build-tool plugin into
// `KernelSources` (one string per .cl file). This file gives the target its Swift entry points.

extension KernelSources {
    /// The complete source of a program: the shared helpers followed by the named kernel file.
    package static func program(_ kernelFile: String) -> String? {
        guard let body = all.first(where: { $0.name == kernelFile })?.source else { return nil }
        return common + "\n" + body
    }
}
