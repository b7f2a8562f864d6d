// The C entry points declared in Sources/CAttentionKitABI/include/attentionkit.h. Each one catches
// every error, records its message for the calling thread and returns a status: nothing traps on
// what a caller passes.
import AttentionKit
import CAttentionKitABI

/// Messages of failed `attentionkit_context_create` calls (no context to keep them in).
let contextlessRecords = ThreadRecords()

/// The library version, kept equal to the header's ATTENTIONKIT_VERSION_* (checked by the C test).
enum LibraryVersion {
    static let major: UInt32 = 1
    static let minor: UInt32 = 1
    static let patch: UInt32 = 0
    static let text: StaticString = "1.1.0"
    static let abi: UInt32 = 1
}

@_cdecl("attentionkit_version")
public func cVersion() -> UInt32 {
    LibraryVersion.major * 10000 + LibraryVersion.minor * 100 + LibraryVersion.patch
}

@_cdecl("attentionkit_version_string")
public func cVersionString() -> UnsafePointer<CChar> { staticCString(LibraryVersion.text) }

@_cdecl("attentionkit_abi_version")
public func cAbiVersion() -> UInt32 { LibraryVersion.abi }

@_cdecl("attentionkit_context_create")
public func cContextCreate(
    _ options: UnsafePointer<attentionkit_context_options>?, _ context: UnsafeMutablePointer<OpaquePointer?>?
) -> attentionkit_status {
    guard let context else {
        contextlessRecords.setError("context (the output pointer) is NULL")
        return .invalidArgument
    }
    context.pointee = nil
    var settings = attentionkit_context_options(
        struct_size: UInt32(MemoryLayout<attentionkit_context_options>.size), backend: nil, threads: 0, cpu_isa: nil,
        use_environment: 1)
    if let options {
        do throws(CallError) {
            settings = try versioned(options, name: "options", initializer: "ATTENTIONKIT_CONTEXT_OPTIONS_INIT")
        } catch {
            contextlessRecords.setError(error.message)
            return error.status
        }
    }
    do throws(CallError) {
        let made = try Context.make(settings)
        context.pointee = OpaquePointer(Unmanaged.passRetained(made).toOpaque())
        return .ok
    } catch {
        contextlessRecords.setError(error.message)
        return error.status
    }
}

@_cdecl("attentionkit_context_free")
public func cContextFree(_ context: OpaquePointer?) {
    guard let context else { return }
    Unmanaged<Context>.fromOpaque(UnsafeRawPointer(context)).release()
}

/// The context behind a C handle (not retained: the caller keeps it alive for the call).
private func resolve(_ context: OpaquePointer?) -> Context? {
    context.map { Unmanaged<Context>.fromOpaque(UnsafeRawPointer($0)).takeUnretainedValue() }
}

@_cdecl("attentionkit_last_error")
public func cLastError(_ context: OpaquePointer?) -> UnsafePointer<CChar> {
    (resolve(context)?.records ?? contextlessRecords).error()
}

@_cdecl("attentionkit_last_backend")
public func cLastBackend(_ context: OpaquePointer?) -> UnsafePointer<CChar> {
    (resolve(context)?.records ?? contextlessRecords).backend()
}

@_cdecl("attentionkit_last_reason")
public func cLastReason(_ context: OpaquePointer?) -> UnsafePointer<CChar> {
    (resolve(context)?.records ?? contextlessRecords).reason()
}

/// Runs `body` for a call on `context`: records the selection or the error for this thread.
private func call(
    _ handle: OpaquePointer?, _ body: (Context) throws(CallError) -> (BackendSelection, AttentionRun)
) -> attentionkit_status {
    guard let context = resolve(handle) else {
        contextlessRecords.setError("context is NULL (create one with attentionkit_context_create)")
        return .invalidArgument
    }
    do throws(CallError) {
        let (selection, run) = try body(context)
        context.records.setOutcome(selection, run)
        return .ok
    } catch {
        context.records.setError(error.message)
        return error.status
    }
}

/// Library errors as C errors.
private func lifted<T>(_ body: () throws(AttentionError) -> T) throws(CallError) -> T {
    do throws(AttentionError) { return try body() } catch { throw CallError(error) }
}

@_cdecl("attentionkit_attention")
public func cAttention(
    _ context: OpaquePointer?, _ query: UnsafePointer<attentionkit_tensor>?, _ key: UnsafePointer<attentionkit_tensor>?,
    _ value: UnsafePointer<attentionkit_tensor>?, _ output: UnsafePointer<attentionkit_tensor>?,
    _ logSumExp: UnsafeMutablePointer<Float>?, _ options: UnsafePointer<attentionkit_options>?
) -> attentionkit_status {
    call(context) { (context) throws(CallError) in
        let q = try Operand(query, name: "query", rank: 4)
        let k = try Operand(key, name: "key", rank: 4)
        let v = try Operand(value, name: "value", rank: 4)
        let o = try Operand(output, name: "output", rank: 4)
        let storage = try storageTypes(query: q, key: k, value: v, output: o)
        let options = try attentionOptions(options, target: [q.shape[0], q.shape[1], q.shape[2], k.shape[2]])
        return try lifted { () throws(AttentionError) in
            let problem = try AttentionProblem(
                query: q.shape, key: k.shape, value: v.shape, options: options, storage: storage)
            guard o.shape == problem.outputShape else {
                throw .shapeMismatch("output must be \(problem.outputShape), got \(o.shape)")
            }
            let selection = try BackendSelection.select(context.choice, for: problem, dispatcher: context.dispatcher)
            let lse = logSumExp.map { UnsafeMutableBufferPointer(start: $0, count: problem.lseShape.reduce(1, *)) }
            let run = try selection.run(
                problem, AttentionBuffers(query: q.bhsd, key: k.bhsd, value: v.bhsd, output: o.bhsd, logSumExp: lse))
            return (selection, run)
        }
    }
}

@_cdecl("attentionkit_attention_sequences")
public func cAttentionSequences(
    _ context: OpaquePointer?, _ sequences: UnsafePointer<attentionkit_sequences>?,
    _ query: UnsafePointer<attentionkit_tensor>?, _ key: UnsafePointer<attentionkit_tensor>?,
    _ value: UnsafePointer<attentionkit_tensor>?, _ output: UnsafePointer<attentionkit_tensor>?,
    _ logSumExp: UnsafeMutablePointer<Float>?, _ options: UnsafePointer<attentionkit_options>?
) -> attentionkit_status {
    call(context) { (context) throws(CallError) in
        guard let sequences else { throw CallError(.invalidArgument, "sequences is NULL") }
        let form = try versioned(sequences, name: "sequences", initializer: "ATTENTIONKIT_SEQUENCES_INIT")
        guard (1...3).contains(form.form) else {
            throw CallError(
                .invalidArgument, "sequences.form must be VARLEN (1), CACHE_LENGTHS (2) or PAGED (3), got \(form.form)")
        }
        let packed = form.form == Int32(ATTENTIONKIT_VARLEN.rawValue)
        let paged = form.form == Int32(ATTENTIONKIT_PAGED.rawValue)
        let rank = packed ? 3 : 4
        let q = try Operand(query, name: "query", rank: rank)
        let k = try Operand(key, name: "key", rank: rank)
        let v = try Operand(value, name: "value", rank: rank)
        let o = try Operand(output, name: "output", rank: rank)
        let storage = try storageTypes(query: q, key: k, value: v, output: o)
        let options = try attentionOptions(options, target: nil)  // masks are refused for batches
        let layout = try sequenceLayout(form, pageSize: paged ? k.shape[1] : 0)
        // Views in the library's (batch, head, sequence) terms: varlen [total, H, D]; pools
        // [pages, pageSize, H, D]; everything else [B, H, N, D].
        func view(_ operand: Operand, pool: Bool) -> TensorView {
            if packed { return operand.view(batch: nil, head: 1, sequence: 0) }
            return pool ? operand.view(batch: 0, head: 2, sequence: 1) : operand.bhsd
        }
        return try lifted { () throws(AttentionError) in
            let batch = try SequenceBatch(
                query: q.shape, key: k.shape, value: v.shape, layout: layout, options: options, storage: storage)
            let expected = packed ? [batch.outputShape[2], batch.queryHeads, batch.valueDim] : batch.outputShape
            guard o.shape == expected else { throw .shapeMismatch("output must be \(expected), got \(o.shape)") }
            let selection = try BackendSelection.select(context.choice, for: batch, dispatcher: context.dispatcher)
            let lse = logSumExp.map { UnsafeMutableBufferPointer(start: $0, count: batch.logSumExpCount) }
            let buffers = AttentionBuffers(
                query: view(q, pool: false), key: view(k, pool: paged), value: view(v, pool: paged),
                output: view(o, pool: false), logSumExp: lse)
            return (selection, try selection.run(batch: batch, buffers))
        }
    }
}
