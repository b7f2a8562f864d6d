// swift-tools-version: 6.1
import Foundation
import PackageDescription

// MARK: - Code generation for the host CPU
//
// Swift on Linux compiles for the x86-64 baseline (SSE2) unless told otherwise, which makes the
// SIMD softmax about 16x slower. When the building machine has AVX2 and FMA (every x86 server since
// 2013) the hot modules are compiled for `haswell`. `ATTENTIONKIT_TARGET_CPU=<llvm cpu>` picks another
// CPU, `ATTENTIONKIT_TARGET_CPU=none` keeps the portable baseline (needed to use AttentionKit as a
// dependency of another package, since SwiftPM refuses unsafe flags in dependencies).
func hostCPUFlags() -> [String] {
    let env = ProcessInfo.processInfo.environment
    if let cpu = env["ATTENTIONKIT_TARGET_CPU"] {
        return cpu == "none" || cpu.isEmpty ? [] : ["-target-cpu", cpu]
    }
    #if arch(x86_64)
    guard let info = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
          let flagsLine = info.split(separator: "\n").first(where: { $0.hasPrefix("flags") })
    else { return [] }
    let flags = Set(flagsLine.split(separator: " ").map(String.init))
    return flags.isSuperset(of: ["avx2", "fma", "bmi2"]) ? ["-target-cpu", "haswell"] : []
    #else
    return []
    #endif
}

let cpuFlags = hostCPUFlags()
let hotSettings: [SwiftSetting] = cpuFlags.isEmpty ? [] : [.unsafeFlags(cpuFlags)]

let package = Package(
    name: "AttentionKit",
    products: [
        .library(name: "AttentionKit", targets: ["AttentionKit"]),
        .library(name: "AttentionCore", targets: ["AttentionCore"]),
        .library(name: "NumPyIO", targets: ["NumPyIO"]),
        .executable(name: "attnbench", targets: ["attnbench"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/ordo-one/TextTable", from: "0.0.2"),
    ],
    targets: [
        // MARK: Public modules

        /// The contract: problems, tensors, masks, errors, the `AttentionBackend` protocol, the
        /// float64 reference backend and the accuracy metrics. No system dependencies.
        .target(name: "AttentionCore", swiftSettings: hotSettings),

        /// The OpenBLAS backend: flash-style tiling on the CPU.
        .target(name: "AttentionBLAS", dependencies: ["AttentionCore", "CBLAS"], swiftSettings: hotSettings),

        /// The OpenCL backend: flash and split-KV decode kernels, device discovery, program caches.
        /// libOpenCL is loaded at run time, so binaries start on machines without OpenCL.
        .target(name: "AttentionOpenCL", dependencies: ["AttentionCore", "COpenCL", "AttentionKernels"]),

        /// Umbrella: every backend plus backend selection.
        .target(name: "AttentionKit", dependencies: ["AttentionCore", "AttentionBLAS", "AttentionOpenCL"]),

        /// NumPy `.npy` reading and writing.
        .target(name: "NumPyIO"),

        // MARK: Kernels and system libraries

        /// `Kernels/*.cl`, embedded at build time as `KernelSources` by the EmbedKernels plugin.
        .target(
            name: "AttentionKernels",
            path: "Kernels",
            exclude: ["README.md", "attention.cl", "common.cl", "decode.cl"],
            plugins: ["EmbedKernels"]
        ),
        .plugin(name: "EmbedKernels", capability: .buildTool(), dependencies: ["embed-kernels"], path: "Plugins/EmbedKernels"),
        .executableTarget(name: "embed-kernels", path: "Plugins/EmbedKernelsTool"),

        /// OpenCL 1.2 headers plus a dlopen-based loader (no link-time dependency on libOpenCL).
        .target(name: "COpenCL", linkerSettings: [.linkedLibrary("dl")]),

        .systemLibrary(
            name: "CBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        // MARK: Command-line tool

        .executableTarget(
            name: "attnbench",
            dependencies: [
                "AttentionKit", "NumPyIO",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "TextTable", package: "TextTable"),
            ]
        ),

        // MARK: Tests

        .testTarget(name: "AttentionCoreTests", dependencies: ["AttentionCore"]),
        .testTarget(name: "AttentionBackendTests", dependencies: ["AttentionCore", "AttentionBLAS", "AttentionOpenCL", "AttentionKit"]),
        .testTarget(name: "NumPyIOTests", dependencies: ["NumPyIO"]),
    ],
    swiftLanguageModes: [.v6]
)

// MARK: - Regression benchmarks (opt-in, so that normal builds and CI stay lean)
//
//   ATTENTIONKIT_BENCHMARKS=1 swift package benchmark

if ProcessInfo.processInfo.environment["ATTENTIONKIT_BENCHMARKS"] != nil {
    package.dependencies.append(
        .package(url: "https://github.com/ordo-one/benchmark", from: "1.38.1", traits: ["MallocInterposer"]))
    package.targets.append(
        .executableTarget(
            name: "AttentionBenchmarks",
            dependencies: ["AttentionKit", .product(name: "Benchmark", package: "benchmark")],
            path: "Benchmarks/AttentionBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ))
}
