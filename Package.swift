// swift-tools-version: 6.1
import Foundation  // ProcessInfo: the opt-in benchmark target below
import PackageDescription

let package = Package(
    name: "AttentionKit",
    products: [
        .library(name: "AttentionKit", targets: ["AttentionKit"]),
        .library(name: "AttentionCore", targets: ["AttentionCore"]),
        .library(name: "NumPyIO", targets: ["NumPyIO"]),
        /// The C ABI (`Sources/CAttentionKitABI/include/attentionkit.h`) as `libAttentionKitC.so`:
        /// what C, C++, Rust and the Python package (`python/`) link or load.
        .library(name: "AttentionKitC", type: .dynamic, targets: ["AttentionKitC"]),
        .executable(name: "attnbench", targets: ["attnbench"]),
        /// Context-parallel ring attention and sharded-K/V decode across ranks. Over the system's MPI
        /// (`MPICommunicator`) only with the package trait "MPI"; without it, the in-process ring only.
        .library(name: "AttentionDistributed", targets: ["AttentionDistributed"]),
    ],
    traits: [
        .trait(
            name: "MPI",
            description:
                "Builds AttentionDistributed's MPICommunicator and `attnbench ring` under mpirun over the system's "
                + "MPI (Debian: libopenmpi-dev, found through pkg-config as mpi-c). Off by default: builds "
                + "without it never need MPI.")
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/ordo-one/TextTable", from: "0.0.2"),
    ],
    targets: [
        // MARK: Public modules

        /// The contract: problems, tensors, masks, errors, the `AttentionBackend` protocol, the
        /// float64 reference backend and the accuracy metrics. No system dependencies.
        .target(name: "AttentionCore"),

        /// Facts about this machine, outside any backend: CPU model, cores, caches, the CPU kernel
        /// variants it runs, and the roofline probes (SGEMM rate, memory read bandwidth).
        .target(name: "AttentionMachine", dependencies: ["AttentionCore", "CBLAS", "CAttentionCPU"]),

        /// The OpenBLAS backend: flash-style tiling on the CPU, its hot loops in CAttentionCPU.
        .target(name: "AttentionBLAS", dependencies: ["AttentionCore", "AttentionMachine", "CBLAS", "CAttentionCPU"]),

        /// The OpenCL backend: flash and split-KV decode kernels, device discovery, program caches.
        /// libOpenCL is loaded at run time, so binaries start on machines without OpenCL.
        .target(name: "AttentionOpenCL", dependencies: ["AttentionCore", "COpenCL", "AttentionKernels"]),

        /// Umbrella: every backend plus backend selection.
        .target(
            name: "AttentionKit",
            dependencies: ["AttentionCore", "AttentionMachine", "AttentionBLAS", "AttentionOpenCL"]),

        /// Ring attention and sharded-K/V decode over a `RingCommunicator`: in-process ranks always, MPI
        /// ranks with the trait "MPI".
        .target(
            name: "AttentionDistributed",
            dependencies: ["AttentionKit", .target(name: "CMPI", condition: .when(traits: ["MPI"]))]),

        /// The C ABI: `@_cdecl` entry points over AttentionKit, declared by the header of CAttentionKitABI.
        .target(name: "AttentionKitC", dependencies: ["AttentionKit", "CAttentionKitABI"]),
        /// `attentionkit.h`, the one public C header, plus compile-time checks of its struct layouts.
        .target(name: "CAttentionKitABI"),

        /// Package-internal (no product): the verification every checker shares — cases, input and
        /// mask generators, the tolerance rule, the NaN-padded run, the standard benchmark shapes.
        .target(name: "AttentionVerification", dependencies: ["AttentionCore"]),

        /// NumPy `.npy` reading and writing.
        .target(name: "NumPyIO"),

        // MARK: Kernels and system libraries

        /// `Kernels/*.cl`, embedded at build time as `KernelSources` by the EmbedKernels plugin.
        .target(
            name: "AttentionKernels",
            path: "Kernels",
            exclude: ["README.md", "attention.cl", "common.cl", "convert.cl", "decode.cl"],
            plugins: ["EmbedKernels"]
        ),
        .plugin(
            name: "EmbedKernels", capability: .buildTool(), dependencies: ["embed-kernels"],
            path: "Plugins/EmbedKernels"),
        .executableTarget(name: "embed-kernels", path: "Plugins/EmbedKernelsTool"),

        /// The CPU hot loops (softmax, masking, decode products), compiled once per instruction set
        /// (baseline x86-64, AVX2+FMA, AVX-512; NEON on aarch64) and chosen at run time: no build flags.
        .target(name: "CAttentionCPU", linkerSettings: [.linkedLibrary("m")]),

        /// OpenCL 1.2 headers plus a dlopen-based loader (no link-time dependency on libOpenCL).
        .target(name: "COpenCL", linkerSettings: [.linkedLibrary("dl")]),

        /// The system's MPI, used only with the trait "MPI".
        .systemLibrary(name: "CMPI", pkgConfig: "mpi-c", providers: [.apt(["libopenmpi-dev"])]),

        .systemLibrary(
            name: "CBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),

        // MARK: Command-line tool

        .executableTarget(
            name: "attnbench",
            dependencies: [
                "AttentionKit", "AttentionVerification", "NumPyIO", "AttentionDistributed",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "TextTable", package: "TextTable"),
            ]
        ),

        // MARK: Tests

        .testTarget(name: "AttentionCoreTests", dependencies: ["AttentionCore", "AttentionVerification"]),
        .testTarget(
            name: "AttentionBackendTests",
            dependencies: [
                "AttentionCore", "AttentionBLAS", "AttentionOpenCL", "AttentionKit", "AttentionVerification",
                "AttentionDistributed",
            ]),
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
            dependencies: ["AttentionKit", "AttentionVerification", .product(name: "Benchmark", package: "benchmark")],
            path: "Benchmarks/AttentionBenchmarks",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ))
}

// MARK: - Fuzz targets (opt-in; scripts/fuzz builds them with -sanitize=fuzzer,address)
//
//   ATTENTIONKIT_FUZZ=1 swift build -c release --build-path .build-fuzz \
//       -Xswiftc -sanitize=fuzzer,address --product FuzzNPY

if ProcessInfo.processInfo.environment["ATTENTIONKIT_FUZZ"] != nil {
    let fuzzTargets: [(String, [Target.Dependency])] = [
        ("FuzzNPY", ["NumPyIO"]),
        ("FuzzShapes", ["AttentionCore", "AttentionVerification"]),
        ("FuzzValidation", ["AttentionCore", "AttentionBLAS"]),
    ]
    package.targets.append(.target(name: "FuzzSupport", path: "Tests/Fuzz/FuzzSupport"))
    for (name, dependencies) in fuzzTargets {
        package.targets.append(
            .executableTarget(name: name, dependencies: dependencies + ["FuzzSupport"], path: "Tests/Fuzz/\(name)"))
    }
}
