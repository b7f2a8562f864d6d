import AttentionKit
import CAttentionKitABI
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// What `attentionkit_context` points to: a backend choice, the dispatcher that resolves it, and the
/// strings each calling thread was last handed.
final class Context: Sendable {
    let choice: BackendChoice
    let dispatcher: Dispatcher
    let records = ThreadRecords()

    init(choice: BackendChoice, dispatcher: Dispatcher) {
        self.choice = choice
        self.dispatcher = dispatcher
    }

    /// Builds a context from the caller's options, refusing names and devices this machine lacks.
    static func make(_ options: attentionkit_context_options) throws(CallError) -> Context {
        let backendName = options.backend.map { String(cString: $0) } ?? "auto"
        let isaName = options.cpu_isa.map { String(cString: $0) }
        guard options.threads >= 0 else {
            throw CallError(.invalidArgument, "context threads must be >= 0, got \(options.threads)")
        }
        let choice: BackendChoice
        do throws(AttentionError) {
            choice = try BackendChoice(parsing: backendName)
        } catch {
            throw CallError(.invalidConfiguration, "context backend: \(error.description)")
        }
        let useEnvironment = options.use_environment != 0
        var configuration = useEnvironment ? AttentionConfiguration.process : AttentionConfiguration()
        if let isaName {  // parsed by the one parser of settings, as if it came from the environment
            configuration.cpuISA =
                AttentionConfiguration(environment: [AttentionConfiguration.cpuISAVariable: isaName]).cpuISA
        }
        if case .failure(let error) = configuration.cpuISA {
            throw CallError(.invalidConfiguration, error.description)
        }
        if case .failure(let error) = configuration.backendOverride {
            throw CallError(.invalidConfiguration, error.description)
        }
        if case .success(let isa?) = configuration.cpuISA, let why = isa.unsupportedReason {
            throw CallError(.invalidConfiguration, "cpu_isa \(isa): \(why)")
        }
        if case .backend(.opencl(let device)) = choice {
            let devices = OpenCLRuntime.availableDevices
            guard device < devices.count else {
                let have = devices.isEmpty ? "none" : devices.indices.map { "opencl:\($0)" }.joined(separator: ", ")
                throw CallError(
                    .invalidConfiguration, "no OpenCL device \(device) on this machine (OpenCL devices: \(have))")
            }
        }
        let threads = options.threads > 0 ? Int(options.threads) : nil
        let dispatcher: Dispatcher
        if useEnvironment, isaName == nil, threads == nil {
            dispatcher = .process  // the process's own: candidates already built
        } else {
            dispatcher = Dispatcher(
                configuration: configuration, profile: MachineProfile.load(configuration: configuration),
                threads: threads)
        }
        return Context(choice: choice, dispatcher: dispatcher)
    }
}

/// An error on its way to C: a status code and the message `attentionkit_last_error` returns.
struct CallError: Error {
    let status: attentionkit_status
    let message: String

    init(_ status: attentionkit_status, _ message: String) {
        self.status = status
        self.message = message
    }

    init(_ error: AttentionError) {
        self.init(Self.status(of: error), error.description)
    }

    /// The C status of each library error.
    static func status(of error: AttentionError) -> attentionkit_status {
        switch error {
        case .invalidRank, .zeroSizedDimension, .invalidShape, .storageSizeMismatch, .shapeMismatch,
            .headsNotDivisible, .maskNotBroadcastable, .outputSizeMismatch, .invalidStrides, .overlappingOutput,
            .invalidSequenceOffsets, .invalidCacheLength, .invalidPageTable:
            return .invalidShape
        case .storageTypeMismatch:
            return .invalidDType
        case .invalidWindow, .invalidScale, .invalidSoftcap, .unsupportedOption:
            return .invalidOption
        case .unsupported:
            return .unsupported
        case .backendFailure:
            return .backendFailure
        case .invalidConfiguration, .unknownBackend, .fileError:
            return .invalidConfiguration
        case .cacheFull, .unknownSequence:
            return .invalidArgument
        }
    }
}

extension attentionkit_status {
    static let ok = ATTENTIONKIT_OK
    static let invalidArgument = ATTENTIONKIT_INVALID_ARGUMENT
    static let invalidShape = ATTENTIONKIT_INVALID_SHAPE
    static let invalidDType = ATTENTIONKIT_INVALID_DTYPE
    static let invalidOption = ATTENTIONKIT_INVALID_OPTION
    static let unsupported = ATTENTIONKIT_UNSUPPORTED
    static let backendFailure = ATTENTIONKIT_BACKEND_FAILURE
    static let invalidConfiguration = ATTENTIONKIT_INVALID_CONFIGURATION
}

/// Per calling thread: the last error message, and the backend (with its selection, whose reason
/// is rendered only when asked for) of the last successful call. The C strings handed out stay
/// valid until the same thread's next call that replaces them, or until the records are freed.
final class ThreadRecords: Sendable {
    // `@unchecked Sendable`: the C strings are owned by the record and only touched under the lock.
    private struct Record: @unchecked Sendable {
        var error: UnsafeMutablePointer<CChar>?
        var backend: UnsafeMutablePointer<CChar>?
        var reason: UnsafeMutablePointer<CChar>?
        var selection: BackendSelection?
        var run: AttentionRun?
        var backendID: BackendID?
    }

    private let records = Mutex<[UInt: Record]>([:])

    private static var thread: UInt {
        #if canImport(Darwin)
            UInt(bitPattern: pthread_self())
        #else
            UInt(pthread_self())
        #endif
    }

    deinit {
        records.withLock { all in
            for record in all.values {
                free(record.error)
                free(record.backend)
                free(record.reason)
            }
            all.removeAll()
        }
    }

    func setError(_ message: String) {
        let copy = strdup(message)
        records.withLock { all in
            let old = all[Self.thread]?.error
            all[Self.thread, default: Record()].error = copy
            free(old)
        }
    }

    /// A successful call: the selection and which backend produced the outputs (another one than
    /// selected when `.auto` fell back).
    func setOutcome(_ selection: BackendSelection, _ run: AttentionRun) {
        records.withLock { all in
            var record = all[Self.thread, default: Record()]
            if record.backendID != run.backend {
                free(record.backend)
                record.backend = strdup(run.backend.description)
                record.backendID = run.backend
            }
            record.selection = selection
            record.run = run.fellBack ? run : nil
            free(record.reason)
            record.reason = nil
            free(record.error)
            record.error = nil
            all[Self.thread] = record
        }
    }

    /// The last error message of this thread ("" when none).
    func error() -> UnsafePointer<CChar> {
        records.withLock { all in UnsafePointer(all[Self.thread]?.error) } ?? Self.empty
    }

    func backend() -> UnsafePointer<CChar> {
        records.withLock { all in UnsafePointer(all[Self.thread]?.backend) } ?? Self.empty
    }

    func reason() -> UnsafePointer<CChar> {
        records.withLock { all -> UnsafePointer<CChar>? in
            guard var record = all[Self.thread], let selection = record.selection else { return nil }
            if record.reason == nil {
                var text = selection.reason
                if let run = record.run { text += "; ran on \(run)" }
                record.reason = strdup(text)
                all[Self.thread] = record
            }
            return UnsafePointer(record.reason)
        } ?? Self.empty
    }

    private static var empty: UnsafePointer<CChar> { staticCString("") }
}

/// A string literal's static, NUL-terminated storage as a C string (never freed).
func staticCString(_ text: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}
