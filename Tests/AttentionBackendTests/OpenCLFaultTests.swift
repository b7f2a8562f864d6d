import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionOpenCL
import AttentionVerification
import COpenCL
import Foundation
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// The fault-injection fixture (Tests/Fixtures/faulty_opencl.c): a libOpenCL stand-in that forwards
/// to the real loader, counts the CL objects it hands out and fails the calls a test arms. Compiled
/// once per test process with the system C compiler, loaded the way `ATTENTIONKIT_OPENCL_LIBRARY`
/// loads a library.
final class FaultyOpenCL: Sendable {
    let path: String
    private let fail: @convention(c) (UnsafePointer<CChar>, Int32, Int32, Int32) -> Void
    private let clear: @convention(c) () -> Void
    private let hits: @convention(c) () -> Int
    private let pretendGPU: @convention(c) (Int32) -> Void
    private let live: @convention(c) (UnsafePointer<CChar>) -> Int

    static let kinds = ["context", "queue", "mem", "program", "kernel"]

    /// The fixture, or why there is none (no C compiler, no OpenCL headers).
    static let shared: Result<FaultyOpenCL, FixtureUnavailable> = build()

    struct FixtureUnavailable: Error, CustomStringConvertible {
        let description: String
    }

    private init(path: String, handle: UnsafeMutableRawPointer) throws(FixtureUnavailable) {
        func symbol<T>(_ name: String, as: T.Type) throws(FixtureUnavailable) -> T {
            guard let pointer = dlsym(handle, name) else { throw FixtureUnavailable(description: "no symbol \(name)") }
            return unsafeBitCast(pointer, to: T.self)
        }
        self.path = path
        fail = try symbol("faulty_fail", as: (@convention(c) (UnsafePointer<CChar>, Int32, Int32, Int32) -> Void).self)
        clear = try symbol("faulty_clear", as: (@convention(c) () -> Void).self)
        hits = try symbol("faulty_hits", as: (@convention(c) () -> Int).self)
        pretendGPU = try symbol("faulty_pretend_gpu", as: (@convention(c) (Int32) -> Void).self)
        live = try symbol("faulty_live", as: (@convention(c) (UnsafePointer<CChar>) -> Int).self)
    }

    private static func build() -> Result<FaultyOpenCL, FixtureUnavailable> {
        let source = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../Fixtures/faulty_opencl.c").standardizedFileURL.path
        let directory = FileManager.default.temporaryDirectory
            .appendingPathComponent("attentionkit-faulty-opencl-\(getpid())")
        let library = directory.appendingPathComponent("libfaulty_opencl.so").path
        let environment = ProcessInfo.processInfo.environment
        let compilers = [environment["CC"], "cc", "clang", "gcc"].compactMap { $0 }.filter { !$0.isEmpty }
        var failures: [String] = []
        do {
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        } catch {
            return .failure(FixtureUnavailable(description: "cannot create \(directory.path): \(error)"))
        }
        let logPath = directory.appendingPathComponent("build.log").path
        for compiler in compilers {
            // posix_spawn rather than Foundation's Process, whose run() leaks a weak reference (LSan).
            let arguments = [compiler, "-std=c11", "-O1", "-shared", "-fPIC", "-o", library, source, "-ldl"]
            var actions = posix_spawn_file_actions_t()
            posix_spawn_file_actions_init(&actions)
            defer { posix_spawn_file_actions_destroy(&actions) }
            posix_spawn_file_actions_addopen(&actions, 1, logPath, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
            posix_spawn_file_actions_adddup2(&actions, 1, 2)
            var argv = arguments.map { strdup($0) } + [nil]
            defer { for pointer in argv { free(pointer) } }
            var pid: pid_t = 0
            guard posix_spawnp(&pid, compiler, &actions, nil, &argv, environ) == 0 else {
                failures.append("\(compiler): not found")
                continue
            }
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            if status == 0 { break }
            let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
            failures.append("\(compiler): exit status \(status): \(log)")
        }
        guard FileManager.default.fileExists(atPath: library), let handle = dlopen(library, RTLD_NOW | RTLD_LOCAL)
        else {
            return .failure(
                FixtureUnavailable(description: "cannot build \(source): \(failures.joined(separator: "; "))"))
        }
        do throws(FixtureUnavailable) {
            return .success(try FaultyOpenCL(path: library, handle: handle))
        } catch {
            return .failure(error)
        }
    }

    /// Fails the calls to `call` after letting `skip` through, `times` times (-1: until cleared).
    func arm(_ call: String, status: Int32, skip: Int = 0, times: Int = -1) {
        fail(call, status, Int32(skip), Int32(times))
    }

    func disarm() { clear() }
    var hitCount: Int { hits() }
    func presentAsGPU(_ on: Bool) { pretendGPU(on ? 1 : 0) }
    func liveObjects() -> [String: Int] { Dictionary(uniqueKeysWithValues: Self.kinds.map { ($0, live($0)) }) }

    /// The devices behind the fixture (each call: new device objects, no state shared with others).
    func devices(programCache: URL?) -> [OpenCLDevice] {
        (try? OpenCLRuntime.discover(libraryPath: path, programCache: programCache).get()) ?? []
    }
}

let faultFixture = FaultyOpenCL.shared
let faultFixtureUsable: Bool = {
    guard case .success(let fixture) = faultFixture else { return false }
    return !fixture.devices(programCache: nil).isEmpty
}()
let faultFixtureComment: Comment = {
    switch faultFixture {
    case .failure(let why): return "no fault-injection fixture: \(why)"
    case .success:
        return "the fault-injection fixture forwards to an OpenCL platform, and there is none: \(noOpenCLReason)"
    }
}()

/// Every OpenCL call that can fail during attention, failed on purpose: the error names the call and
/// its status, `.auto` falls back to the CPU with that reason, every CL object made on the failed path
/// is released, and the next call succeeds once the fault is gone.
@Suite(.serialized, .enabled(if: faultFixtureUsable, faultFixtureComment))
struct OpenCLFaultInjection {
    struct Fault: CustomTestStringConvertible, Sendable {
        var call: String
        var status: Int32
        /// Calls to let through before failing.
        var skip = 0
        /// Whether a successful call comes first (programs built, context made).
        var warm = true
        /// Whether the device presents itself as a discrete GPU (copy paths, read-back).
        var gpu = false
        /// Whether the problem is decode-shaped (split-KV kernel).
        var decode = false
        var testDescription: String {
            "\(call) -> \(OpenCLError(code: status, operation: "").name)\(skip > 0 ? " after \(skip)" : "")"
                + "\(warm ? "" : ", cold")\(gpu ? ", as GPU" : "")\(decode ? ", decode" : "")"
        }
    }

    static let faults: [Fault] = [
        Fault(call: "clBuildProgram", status: OpenCLError.buildProgramFailure, warm: false),
        Fault(call: "clCreateContext", status: OpenCLError.outOfHostMemory, warm: false),
        Fault(call: "clCreateCommandQueue", status: OpenCLError.outOfResources, warm: false),
        Fault(call: "clCreateProgramWithSource", status: OpenCLError.outOfHostMemory, warm: false),
        Fault(call: "clCreateKernel", status: OpenCLError.outOfResources, warm: false),
        Fault(call: "clCreateBuffer", status: -4),  // CL_MEM_OBJECT_ALLOCATION_FAILURE
        Fault(call: "clCreateBuffer", status: -4, skip: 3),
        Fault(call: "clCreateBuffer", status: -4, skip: 2, gpu: true),
        Fault(call: "clCreateBuffer", status: -4, skip: 4, decode: true),
        Fault(call: "clSetKernelArg", status: -51),  // CL_INVALID_ARG_SIZE
        Fault(call: "clEnqueueNDRangeKernel", status: OpenCLError.outOfResources),
        Fault(call: "clEnqueueNDRangeKernel", status: OpenCLError.outOfResources, skip: 1, decode: true),
        Fault(call: "clEnqueueNDRangeKernel", status: OpenCLError.outOfResources, gpu: true),
        Fault(call: "clFinish", status: OpenCLError.outOfResources),
        Fault(call: "clEnqueueMapBuffer", status: OpenCLError.outOfResources),  // read-back, host memory
        Fault(call: "clEnqueueReadBuffer", status: OpenCLError.outOfResources, gpu: true),  // read-back, copy
        Fault(call: "clEnqueueReadBuffer", status: OpenCLError.outOfResources, skip: 1, gpu: true),
    ]

    static func problemCase(decode: Bool) -> VerificationCase {
        decode
            ? VerificationCase(heads: (4, 2), nq: 1, nk: 1500, d: 32, dv: 32, options: .init(causal: true))
            : VerificationCase(heads: (4, 2), nq: 13, nk: 37, d: 16, dv: 24, options: .init(causal: true))
    }

    /// A dispatcher whose `.auto` picks the fixture's device first, then BLAS, then the reference.
    static func dispatcher(_ opencl: OpenCLBackend) -> Dispatcher {
        func profile(_ id: BackendID, _ gflops: Double) -> BackendProfile {
            BackendProfile(
                backend: id, device: id.description,
                gflops: [.init(headDim: 64, curve: ThroughputCurve([(1, gflops)]))],
                decodeGBps: ThroughputCurve([(1, gflops)]), overheadSeconds: 0, memoryBytes: 1 << 34)
        }
        let profiles = [profile(opencl.id, 1000), profile(.blas, 10), profile(.naive, 1)]
        return Dispatcher(
            profile: MachineProfile(identity: "fault injection", source: "test", backends: profiles),
            candidates: [
                DispatchCandidate(backend: opencl, profile: profiles[0]),
                DispatchCandidate(backend: BLASBackend(), profile: profiles[1]),
                DispatchCandidate(backend: NaiveBackend(), profile: profiles[2]),
            ])
    }

    @Test(arguments: faults)
    func faultIsReportedFallsBackReleasesAndRecovers(_ fault: Fault) throws {
        let fixture = try faultFixture.get()
        let baseline = fixture.liveObjects()
        try exercise(fault, fixture)
        // Every device object is gone: every CL object ever created through the fixture was released.
        #expect(fixture.liveObjects() == baseline, "CL objects left after \(fault.testDescription)")
    }

    private func exercise(_ fault: Fault, _ fixture: FaultyOpenCL) throws {
        let cache = FileManager.default.temporaryDirectory.appendingPathComponent("attentionkit-fault-\(UUID())")
        defer { try? FileManager.default.removeItem(at: cache) }
        fixture.presentAsGPU(fault.gpu)
        defer { fixture.presentAsGPU(false) }
        let devices = fixture.devices(programCache: cache)
        let device = try #require(devices.first)
        #expect(device.info.isGPU == fault.gpu)
        let backend = OpenCLBackend(device: device)
        let c = Self.problemCase(decode: fault.decode)
        let problem = try c.problem()
        let (q, k, v) = try c.inputs()
        if case .splitKV = backend.kernelChoice(for: problem).choice {
            #expect(fault.decode, "a prefill problem chose split-KV")
        } else {
            #expect(!fault.decode, "a decode problem did not choose split-KV")
        }
        let reference = try NaiveBackend().attention(problem, query: q, key: k, value: v)
        let blas = try BLASBackend().attention(problem, query: q, key: k, value: v)

        var healthy: AttentionResult?
        if fault.warm { healthy = try backend.attention(problem, query: q, key: k, value: v) }
        let before = fixture.liveObjects()

        // 1. A typed error naming the call and the status.
        fixture.arm(fault.call, status: fault.status, skip: fault.skip)
        let status = OpenCLError(code: fault.status, operation: "").name
        do {
            _ = try backend.attention(problem, query: q, key: k, value: v)
            Issue.record("\(fault.testDescription): no error")
        } catch {
            guard case .backendFailure(let name, let message) = error else {
                Issue.record("\(fault.testDescription): \(error) is not a backend failure")
                return
            }
            #expect(name == backend.name)
            #expect(message.contains(fault.call), "\(message)")
            #expect(message.contains(status), "\(message)")
            if fault.call == "clBuildProgram" { #expect(message.contains("injected build failure"), "\(message)") }
        }
        #expect(fixture.hitCount >= 1, "the fault was never reached")
        // Nothing made for the failed call outlives it (buffers; programs and kernels that failed).
        if fault.warm { #expect(fixture.liveObjects() == before, "objects leaked by the failed call") }

        // 2. `.auto` falls back to the CPU, with the reason, and its result is the CPU's.
        let selection = try BackendSelection.select(.auto, for: problem, dispatcher: Self.dispatcher(backend))
        #expect(selection.backend.id == backend.id)
        var output = try Tensor(shape: problem.outputShape, name: "output")
        var lse = try Tensor(shape: problem.lseShape, name: "lse")
        let run = try Self.run(selection, problem, q, k, v, &output, &lse)
        #expect(run.backend == BackendID.blas)
        #expect(run.failures.map { $0.backend } == [backend.id])
        #expect(run.description.contains(fault.call) && run.description.contains(status), "\(run)")
        #expect(output == blas.output && lse == blas.logSumExp, "the fallback's outputs are not BLAS's")

        // 3. With the fault gone the device works again, and agrees with the reference.
        fixture.disarm()
        let recovered = try backend.attention(problem, query: q, key: k, value: v)
        if let healthy { #expect(recovered == healthy, "results differ after recovery") }
        for (index, (got, want)) in zip(recovered.output.storage, reference.output.storage).enumerated() {
            guard AccuracyReport.withinTolerance(Double(got), of: Double(want)) else {
                Issue.record("output[\(index)] = \(got), reference \(want)")
                break
            }
        }
        let run2 = try Self.run(selection, problem, q, k, v, &output, &lse)
        #expect(!run2.fellBack && run2.backend == backend.id)
    }

    /// A forced backend never falls back: the failure is the caller's error.
    @Test func forcedBackendDoesNotFallBack() throws {
        let fixture = try faultFixture.get()
        let device = try #require(fixture.devices(programCache: nil).first)
        let backend = OpenCLBackend(device: device)
        let c = Self.problemCase(decode: false)
        let problem = try c.problem()
        let (q, k, v) = try c.inputs()
        let selection = BackendSelection(backend: backend, reason: "requested")
        fixture.arm("clEnqueueNDRangeKernel", status: OpenCLError.outOfResources)
        defer { fixture.disarm() }
        var output = try Tensor(shape: problem.outputShape, name: "output")
        var lse = try Tensor(shape: problem.lseShape, name: "lse")
        #expect(throws: AttentionError.self) { try Self.run(selection, problem, q, k, v, &output, &lse) }
    }

    /// `selection.run` on host tensors.
    static func run(
        _ selection: BackendSelection, _ problem: AttentionProblem, _ q: Tensor, _ k: Tensor, _ v: Tensor,
        _ output: inout Tensor, _ lse: inout Tensor
    ) throws(AttentionError) -> AttentionRun {
        try output.withUnsafeMutableBufferPointer { (o) throws(AttentionError) -> AttentionRun in
            try lse.withUnsafeMutableBufferPointer { (l) throws(AttentionError) -> AttentionRun in
                try q.storage.withUnsafeBufferPointer { (qb) throws(AttentionError) -> AttentionRun in
                    try k.storage.withUnsafeBufferPointer { (kb) throws(AttentionError) -> AttentionRun in
                        try v.storage.withUnsafeBufferPointer { (vb) throws(AttentionError) -> AttentionRun in
                            try selection.run(
                                problem,
                                AttentionBuffers(
                                    query: TensorView(qb), key: TensorView(kb), value: TensorView(vb),
                                    output: TensorView(o), logSumExp: l))
                        }
                    }
                }
            }
        }
    }

    /// Cached program binaries that are truncated, altered or not ours are never handed to the driver:
    /// ignored with the reason, rebuilt, and the file replaced by a good one.
    @Test func corruptProgramCacheFilesAreIgnoredAndRebuilt() throws {
        let fixture = try faultFixture.get()
        let cache = FileManager.default.temporaryDirectory.appendingPathComponent("attentionkit-cache-\(UUID())")
        defer { try? FileManager.default.removeItem(at: cache) }
        let c = Self.problemCase(decode: false)
        let problem = try c.problem()
        let (q, k, v) = try c.inputs()
        // Prefill and decode: the convert, flash and split-KV programs, so every kind of damage is used.
        let decode = Self.problemCase(decode: true)
        let decodeProblem = try decode.problem()
        let (dq, dk, dv) = try decode.inputs()
        let coldBackend = try OpenCLBackend(device: #require(fixture.devices(programCache: cache).first))
        let first = try coldBackend.attention(problem, query: q, key: k, value: v)
        let firstDecode = try coldBackend.attention(decodeProblem, query: dq, key: dk, value: dv)
        let files = try FileManager.default.contentsOfDirectory(at: cache, includingPropertiesForKeys: nil)
            .filter { $0.pathExtension == "bin" }.sorted { $0.path < $1.path }
        #expect(files.count >= 2)
        for file in files { #expect(ProgramDiskCache.read(file).isBinary, "\(file.lastPathComponent) unreadable") }

        // Four kinds of damage, each applied to every file in turn.
        let damages: [(reason: String, damage: ([UInt8]) -> [UInt8])] = [
            ("truncated", { Array($0.prefix($0.count / 2)) }),
            (
                "checksum mismatch",
                { bytes in
                    var altered = bytes
                    altered[altered.count - 7] ^= 0x5a
                    return altered
                }
            ),
            ("not a program cache file", { _ in Array("\u{7f}ELF garbage, not a program".utf8) }),
            ("0 bytes", { _ in [] }),
        ]
        for (reason, damage) in damages {
            for file in files { try Data(damage([UInt8](try Data(contentsOf: file)))).write(to: file) }
            let device = try #require(fixture.devices(programCache: cache).first)
            let backend = OpenCLBackend(device: device)
            #expect(try backend.attention(problem, query: q, key: k, value: v) == first)
            #expect(try backend.attention(decodeProblem, query: dq, key: dk, value: dv) == firstDecode)
            let notes = device.programCacheNotes
            #expect(notes.count == files.count, "\(reason): \(notes)")
            #expect(notes.allSatisfy { $0.contains(reason) && $0.contains("rebuilt") }, "\(reason): \(notes)")
            for file in files {
                #expect(ProgramDiskCache.read(file).isBinary, "\(reason): \(file.lastPathComponent) not rewritten")
            }
        }
    }

    /// A well-formed cache file the driver refuses (another driver build, a binary it cannot load) is
    /// ignored with the driver's status and rebuilt from source.
    @Test(arguments: [
        ("clCreateProgramWithBinary", Int32(-42)),  // CL_INVALID_BINARY
        ("clBuildProgram", OpenCLError.buildProgramFailure),
    ])
    func cachedBinaryRefusedByTheDriverIsRebuilt(_ call: String, _ status: Int32) throws {
        let fixture = try faultFixture.get()
        let baseline = fixture.liveObjects()
        let cache = FileManager.default.temporaryDirectory.appendingPathComponent("attentionkit-cache-\(UUID())")
        defer { try? FileManager.default.removeItem(at: cache) }
        let c = Self.problemCase(decode: false)
        let problem = try c.problem()
        let (q, k, v) = try c.inputs()
        do {
            let first = try OpenCLBackend(device: #require(fixture.devices(programCache: cache).first))
                .attention(problem, query: q, key: k, value: v)
            let device = try #require(fixture.devices(programCache: cache).first)
            // Only the binaries' loads fail: each program's first CreateProgramWithBinary / BuildProgram.
            fixture.arm(call, status: status, times: call == "clBuildProgram" ? 1 : -1)
            let again = try OpenCLBackend(device: device).attention(problem, query: q, key: k, value: v)
            fixture.disarm()
            #expect(again == first)
            let name = OpenCLError(code: status, operation: "").name
            #expect(
                device.programCacheNotes.contains { $0.contains(name) && $0.contains("rebuilt") },
                "\(device.programCacheNotes)")
        }
        #expect(fixture.liveObjects() == baseline)
    }
}

extension ProgramDiskCache.Entry {
    var isBinary: Bool {
        if case .binary = self { return true }
        return false
    }
}

/// In CI (with a C compiler and PoCL) the fault-injection suite must run, not be skipped.
@Suite struct FaultFixtureAvailability {
    @Test(.enabled(if: ProcessInfo.processInfo.environment["CI"] == "true" && openCLAvailable))
    func fixtureBuildsAndPresentsTheDevicesInCI() throws {
        let fixture = try faultFixture.get()
        #expect(fixture.devices(programCache: nil).count == openCLDevices.count)
    }
}
