import AttentionCore
import AttentionKit
import AttentionOpenCL
import COpenCL
import Foundation
import Testing

/// OpenCL devices of this machine; empty without a loader or platform (then these tests are skipped).
let openCLDevices = OpenCLRuntime.availableDevices
let openCLAvailable = !openCLDevices.isEmpty
let noOpenCLReason: Comment =
    "no OpenCL: \((try? OpenCLRuntime.devices.get()).map { _ in "" } ?? OpenCLRuntime.devices.failureReason)"

extension Result where Failure == OpenCLUnavailable {
    var failureReason: String {
        if case .failure(let reason) = self { return reason.reason }
        return ""
    }
}

/// Backends under test: every device, with the table's configuration.
func openCLBackends() -> [OpenCLBackend] { openCLDevices.indices.map { OpenCLBackend(device: $0) } }

/// The OpenCL backend against the float64 reference, on every device.
@Suite(.enabled(if: openCLAvailable, noOpenCLReason))
struct OpenCLParity {
    @Test(arguments: Sweep.cases())
    func sweep(_ c: ParityCase) throws {
        for backend in openCLBackends() { try expectParity(backend, c) }
    }

    @Test(arguments: Sweep.featureCases)
    func features(_ c: ParityCase) throws {
        for backend in openCLBackends() { try expectParity(backend, c) }
    }

    /// The GPU-shaped variants (local-memory tiles, narrower vectors, several work-items per
    /// group) and the flash kernel on decode shapes, run here so that they are checked on PoCL too.
    @Test(arguments: [
        OpenCLKernelConfig(
            vectorWidth: 4, rows: 2, workGroup: 8, useLocalMemory: true, decodeRows: 8, minKeysPerSplit: 32),
        OpenCLKernelConfig(
            vectorWidth: 8, rows: 3, workGroup: 2, useLocalMemory: true, decodeRows: 4, minKeysPerSplit: 16),
        OpenCLKernelConfig(
            vectorWidth: 8, rows: 1, workGroup: 1, useLocalMemory: false, decodeRows: 16, minKeysPerSplit: 64),
    ])
    func otherKernelConfigurations(_ config: OpenCLKernelConfig) throws {
        let cases = Sweep.cases().enumerated().filter { $0.offset % 4 == 0 }.map(\.element) + Sweep.featureCases
        for index in openCLDevices.indices {
            for c in cases {
                try expectParity(OpenCLBackend(device: index, config: config), c)
                try expectParity(OpenCLBackend(device: index, config: config, allowSplitKV: false), c)
            }
        }
    }

    @Test func decodeShapesUseSplitKVAndMatchTheFlashKernel() throws {
        let c = ParityCase(
            batch: 2, heads: (8, 2), nq: 1, nk: 3001, d: 128, dv: 96,
            options: .init(causal: true, window: .init(left: 2500, right: -1)))
        for index in openCLDevices.indices {
            let backend = OpenCLBackend(device: index)
            let problem = try c.problem()
            guard case .splitKV = backend.kernelChoice(for: problem).choice else {
                Issue.record("expected split-KV for \(c.description), got \(backend.kernelChoice(for: problem))")
                continue
            }
            let split = try expectParity(backend, c)
            let flash = try expectParity(OpenCLBackend(device: index, allowSplitKV: false), c)
            for (a, b) in zip(split.output.storage, flash.output.storage) { #expect(abs(a - b) <= 1e-5) }
        }
    }
}

/// Containment, determinism, bounds, residency, errors.
@Suite(.enabled(if: openCLAvailable, noOpenCLReason))
struct OpenCLRobustness {
    @Test func aMissingKernelProgramIsAnErrorNeverSilence() throws {
        // A build without kernel sources: both kernels must fail with a typed error naming the file
        // (the flash kernel on prefill, split-KV on a long decode), never return unwritten output.
        let cases = [
            (ParityCase(heads: (2, 2), nq: 33, nk: 40, d: 16, dv: 16), "attention.cl"),
            (ParityCase(heads: (8, 2), nq: 1, nk: 4096, d: 64, dv: 64), "decode.cl"),
        ]
        for index in openCLDevices.indices {
            let backend = OpenCLBackend(
                device: index, config: nil, tunedConfigs: [], allowSplitKV: true, programs: { _ in nil })
            for (c, file) in cases {
                let (q, k, v) = try c.inputs()
                let expected = AttentionError.backendFailure(
                    backend: BackendID.opencl(device: index).description,
                    message: "kernel program '\(file)' is missing from this build")
                #expect(throws: expected) { try backend.attention(query: q, key: k, value: v) }
            }
        }
    }

    let cases = [
        ParityCase(
            batch: 2, heads: (8, 2), nq: 77, nk: 300, d: 64, dv: 48,
            options: .init(causal: true, window: .init(left: 90, right: 4))),
        ParityCase(batch: 1, heads: (8, 2), nq: 1, nk: 2000, d: 64, dv: 64, label: "split-KV"),
    ]

    /// A NaN in one key poisons exactly the rows that see that key, among finite scores in the
    /// same block; every other row is bitwise what it is without it, in the flash kernel (prefill)
    /// and the split-KV decode kernel. (Both find such rows through the row sum, exp(NaN) reaching
    /// it, rather than by testing every score.)
    @Test(arguments: [0, 1]) func naNInOneKeyPoisonsExactlyTheRowsThatSeeIt(_ index: Int) throws {
        let c = cases[index]
        let group = c.heads.q / c.heads.kv
        let (batch, kvHead, key) = (c.batch - 1, 1, c.nk / 2 + 3)
        let backends: [any AttentionBackend] = [BLASBackend()] + openCLBackends()
        for backend in backends {
            var (q, k, v) = try c.inputs()
            let clean = try backend.attention(query: q, key: k, value: v, options: c.options)
            k[batch, kvHead, key, 5] = .nan
            let dirty = try backend.attention(query: q, key: k, value: v, options: c.options)
            var poisonedRows = 0
            for b in 0..<c.batch {
                for h in 0..<c.heads.q {
                    for i in 0..<c.nq {
                        let row = (b * c.heads.q + h) * c.nq + i
                        let range = row * c.dv..<(row + 1) * c.dv
                        let seen = AttentionProblem.visibleKeys(
                            query: i, queryLength: c.nq, keyLength: c.nk, causal: c.options.causal,
                            window: c.options.window)
                        if b == batch && h / group == kvHead && seen.lo <= key && key <= seen.hi {
                            poisonedRows += 1
                            #expect(dirty.output.storage[range].allSatisfy { $0.isNaN }, "\(backend.name) row \(row)")
                            #expect(dirty.logSumExp.storage[row].isNaN, "\(backend.name) row \(row)")
                        } else {
                            #expect(
                                clean.output.storage[range].map(\.bitPattern)
                                    == dirty.output.storage[range].map(\.bitPattern), "\(backend.name) row \(row)")
                        }
                    }
                }
            }
            #expect(poisonedRows > 0 && poisonedRows < c.heads.q * c.nq)
        }
    }

    @Test func naNInOneQueryRowLeavesOtherRowsBitwiseUnchanged() throws {
        for backend in openCLBackends() {
            for c in cases {
                var (q, k, v) = try c.inputs()
                let clean = try backend.attention(query: q, key: k, value: v, options: c.options)
                q[1 % c.batch, 3, c.nq / 2, 5] = .nan
                let dirty = try backend.attention(query: q, key: k, value: v, options: c.options)
                let poisoned = ((1 % c.batch) * 8 + 3) * c.nq + c.nq / 2
                for row in 0..<clean.logSumExp.count {
                    let range = row * c.dv..<(row + 1) * c.dv
                    if row == poisoned {
                        #expect(dirty.output.storage[range].allSatisfy { $0.isNaN })
                    } else {
                        #expect(
                            clean.output.storage[range].map(\.bitPattern)
                                == dirty.output.storage[range].map(\.bitPattern), "\(c.label) row \(row)")
                    }
                }
            }
        }
    }

    @Test func repeatedRunsAreBitwiseEqual() throws {
        for backend in openCLBackends() {
            for c in cases {
                let (q, k, v) = try c.inputs()
                let a = try backend.attention(query: q, key: k, value: v, options: c.options)
                let b = try backend.attention(query: q, key: k, value: v, options: c.options)
                #expect(a.output.storage.map(\.bitPattern) == b.output.storage.map(\.bitPattern))
                #expect(a.logSumExp.storage.map(\.bitPattern) == b.logSumExp.storage.map(\.bitPattern))
            }
        }
    }

    @Test func inputsPaddedWithNaNGiveBitwiseTheSameOutput() throws {
        for backend in openCLBackends() {
            for c in cases { try expectPaddedRunMatches(backend, c) }
        }
    }

    @Test func deviceResidentTensorsGiveTheHostResult() throws {
        for backend in openCLBackends() {
            for c in cases {
                let (q, k, v) = try c.inputs()
                let problem = try AttentionProblem(query: q.shape, key: k.shape, value: v.shape, options: c.options)
                let host = try backend.attention(problem, query: q, key: k, value: v)
                let (dq, dk, dv) = (try backend.upload(q), try backend.upload(k), try backend.upload(v))
                for _ in 0..<2 {  // the inputs stay on the device across calls
                    let resident = try backend.attention(problem, query: dq, key: dk, value: dv)
                    #expect(
                        try backend.download(resident.output).storage.map(\.bitPattern)
                            == host.output.storage.map(\.bitPattern))
                    #expect(
                        try backend.download(resident.logSumExp).storage.map(\.bitPattern)
                            == host.logSumExp.storage.map(\.bitPattern))
                }
                let wrong = try AttentionProblem(
                    query: [c.batch, c.heads.q, c.nq + 1, c.d], key: k.shape, value: v.shape)
                #expect(throws: AttentionError.self) { try backend.attention(wrong, query: dq, key: dk, value: dv) }
            }
        }
    }

    @Test func buildFailuresCarryTheBuildLog() throws {
        let device = try #require(openCLDevices.first)
        do {
            try device.withExecution { (state) throws(OpenCLError) in
                _ = try state.kernel(
                    "broken", source: "__kernel void broken(__global float *x) { x[0] = undefined_name; }",
                    options: "-cl-std=CL1.2")
            }
            Issue.record("expected a build failure")
        } catch {
            #expect(error.code == OpenCLError.buildProgramFailure)
            #expect(error.name == "CL_BUILD_PROGRAM_FAILURE")
            #expect(error.buildLog?.contains("undefined_name") == true)
        }
    }

    @Test func devicesReportTheirProperties() {
        for device in openCLDevices {
            let info = device.info
            #expect(!info.name.isEmpty && !info.platformName.isEmpty && !info.openCLCVersion.isEmpty)
            #expect(info.computeUnits > 0 && info.globalMemoryBytes > 0 && info.maxWorkGroupSize > 0)
            #expect(info.isCPU || info.isGPU || info.type == "ACCELERATOR" || info.type == "OTHER")
        }
    }
}

/// What happens without OpenCL: these run in every configuration.
@Suite struct OpenCLAbsence {
    @Test func missingLoaderLibraryIsAReasonNotACrash() {
        let result = OpenCLRuntime.discover(libraryPath: "/nonexistent/libOpenCL.so.1")
        guard case .failure(let reason) = result else {
            Issue.record("expected failure")
            return
        }
        #expect(reason.reason.contains("/nonexistent/libOpenCL.so.1"))
    }

    @Test func backendSaysWhyItCannotRun() throws {
        let problem = try AttentionProblem(query: [1, 1, 4, 8], key: [1, 1, 4, 8], value: [1, 1, 4, 8])
        let backend = OpenCLBackend()
        if openCLAvailable {
            #expect(backend.support(for: problem) == .supported)
        } else {
            guard case .unsupported(let reason) = backend.support(for: problem) else {
                Issue.record("expected unsupported without OpenCL")
                return
            }
            #expect(reason.contains("OpenCL") || reason.contains("libOpenCL"))
            let t = try Tensor(shape: [1, 1, 4, 8], repeating: 1)
            #expect(throws: AttentionError.unsupported(backend: "opencl:0", reason: reason)) {
                try backend.attention(query: t, key: t, value: t)
            }
            // auto falls back to the CPU and says why (this tiny problem: the naive backend, which has
            // no call overhead; a larger one: BLAS).
            let choice = try BackendSelection.select(.auto, for: problem)
            #expect(
                ["naive", "blas"].contains(choice.backend.name)
                    && choice.reason.contains("not possible: opencl:0 (no OpenCL"))
            let larger = try BackendSelection.select(
                .auto,
                for: try AttentionProblem(query: [1, 8, 512, 64], key: [1, 8, 512, 64], value: [1, 8, 512, 64]))
            #expect(larger.backend.name == "blas")
        }
        let missing = OpenCLBackend(device: 99)
        #expect(!missing.support(for: problem).isSupported)
    }

    @Test func errorNamesAreSymbolic() {
        #expect(OpenCLError(code: -5, operation: "x").name == "CL_OUT_OF_RESOURCES")
        #expect(OpenCLError(code: -1001, operation: "x").name == "CL_PLATFORM_NOT_FOUND_KHR")
        #expect(OpenCLError(code: -9999, operation: "x").name == "CL_UNKNOWN_ERROR(-9999)")
        #expect(
            OpenCLError(code: -11, operation: "clBuildProgram", buildLog: "line 1: oops").description.contains("oops"))
    }
}
