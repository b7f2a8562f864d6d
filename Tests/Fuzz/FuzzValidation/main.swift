// libFuzzer target: problem and batch validation through the public API. The input picks shapes (small
// or wild: 0, negative, huge), storage types, strides (dense, padded, or arbitrary and possibly wrong),
// window / scale / softcap values (NaN and infinities included), masks, offsets, lengths and block
// tables. Everything must validate or throw an AttentionError; whatever validates and is small runs on
// the BLAS backend and the float64 reference, and the two must agree within the contract's tolerance.
// A crash, or a disagreement (fatalError), is a finding. Built by scripts/fuzz.
import AttentionBLAS
import AttentionCore
import FuzzSupport

/// Reads the fuzz input as a stream of choices (zeros once it runs out).
struct Choices {
    let bytes: UnsafeBufferPointer<UInt8>
    var index = 0

    mutating func byte() -> Int {
        guard index < bytes.count else { return 0 }
        defer { index += 1 }
        return Int(bytes[index])
    }

    mutating func small(_ range: ClosedRange<Int>) -> Int { range.lowerBound + byte() % (range.count) }

    /// Usually small and valid, sometimes an edge value.
    mutating func size(_ range: ClosedRange<Int>) -> Int {
        let pick = byte()
        guard pick >= 224 else { return range.lowerBound + pick % range.count }
        return [0, -1, -7, 1 << 20, 1 << 31, Int(Int32.max), Int.max, Int.min][pick % 8]
    }

    mutating func float() -> Float {
        let pick = byte()
        if pick < 200 { return Float(pick - 100) / 16 }
        return [.nan, .infinity, -.infinity, 0, -0.0, -1, -1e-30, 1e-3][pick % 8]
    }

    mutating func storage() -> StorageType { StorageType.allCases[byte() % StorageType.allCases.count] }

    mutating func bool() -> Bool { byte() & 1 == 1 }
}

/// Memory for one operand of logical shape [B, H, N, D] in a layout the input picks.
struct Operand {
    let buffer: UnsafeMutableRawPointer
    let view: TensorView
    /// Whether the strides are one of the valid layouts (the call must then succeed).
    let valid: Bool

    init(shape: [Int], storage: StorageType, choices: inout Choices, fill: Bool) {
        let (b, h, n, d) = (shape[0], shape[1], shape[2], shape[3])
        var strides: Strides
        var capacity: Int
        switch choices.small(0...3) {
        case 0:
            strides = .bhsd(shape)
            capacity = b * h * n * d
            valid = true
        case 1:
            strides = .bshd(shape)
            capacity = b * h * n * d
            valid = true
        case 2:  // a cache view: spare rows and padded rows
            let row = d + choices.small(0...3)
            let rows = n + choices.small(0...5)
            strides = Strides(batch: h * rows * row, head: rows * row, sequence: row)
            capacity = b * h * rows * row
            valid = true
        default:  // arbitrary strides and a buffer of arbitrary size: must be refused or stay inside
            strides = Strides(
                batch: choices.size(-2...64), head: choices.size(-2...64), sequence: choices.size(-2...64))
            capacity = choices.small(0...4096)
            valid = false
        }
        capacity = max(capacity, 1)
        buffer = .allocate(byteCount: capacity * storage.byteSize, alignment: 64)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: capacity * storage.byteSize)
        view = TensorView(address: buffer, storage: storage, strides: strides, capacity: capacity)
        if fill && valid {
            var seed = UInt64(choices.byte()) &* 0x9E37_79B9_7F4A_7C15
            for i in 0..<b {
                for j in 0..<h {
                    for k in 0..<n {
                        for e in 0..<d {
                            seed = seed &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                            let x = Float(Int(seed >> 40) % 2001 - 1000) / 500
                            view.store(x, strides, i, j, k, e)
                        }
                    }
                }
            }
        }
    }

    func deallocate() { buffer.deallocate() }
}

/// Fails loudly when BLAS and the reference disagree beyond the contract's tolerance.
func compare(_ problem: AttentionProblem, _ got: Operand, _ want: Operand, _ gotLSE: [Float], _ wantLSE: [Float]) {
    let s = problem.outputShape
    let unit: Float = problem.storage.output == .f32 ? 0 : (problem.storage.output == .f16 ? 0x1p-10 : 0x1p-7)
    let gs = got.view.strides(for: s)
    let ws = want.view.strides(for: s)
    for b in 0..<s[0] {
        for h in 0..<s[1] {
            for n in 0..<s[2] {
                for e in 0..<s[3] {
                    let x = got.view.load(gs, b, h, n, e)
                    let r = want.view.load(ws, b, h, n, e)
                    let allowed = 3e-4 + 2e-5 * abs(r) + unit * abs(r)
                    if !(abs(x - r) <= allowed) {
                        fatalError("BLAS \(x) vs reference \(r) at [\(b), \(h), \(n), \(e)] of \(problem)")
                    }
                }
            }
        }
    }
    for (x, r) in zip(gotLSE, wantLSE) where !(x == r || abs(x - r) <= 1e-4 * (1 + abs(r))) {
        fatalError("log-sum-exp \(x) vs reference \(r) of \(problem)")
    }
}

/// One problem from the input: validate, and run it if it is valid and small.
func fuzzProblem(_ c: inout Choices) {
    let batch = c.size(1...2)
    let hkv = c.size(1...3)
    let hq = c.bool() ? hkv.multipliedReportingOverflow(by: c.small(1...3)).partialValue : c.size(1...6)
    let nq = c.size(1...9)
    let nk = c.size(1...40)
    let d = c.size(1...20)
    let dv = c.bool() ? d : c.size(1...20)
    var options = AttentionOptions(causal: c.bool())
    if c.bool() { options.window = AttentionWindow(left: c.size(-2...12), right: c.size(-2...12)) }
    if c.bool() { options.scale = c.float() }
    if c.bool() { options.softcap = c.float() }
    if c.bool() {
        let rank = c.small(2...4)
        let full = [batch, hq, nq, nk]
        let shape = (0..<rank).map { i in
            let dim = full[4 - rank + i]
            return c.small(0...7) == 0 ? c.size(1...9) : (i < rank - 2 && c.bool() ? 1 : dim)
        }
        let count = shape.reduce(1) {
            $0.multipliedReportingOverflow(by: max($1, 0)).overflow ? 1 << 40 : $0 * max($1, 0)
        }
        if count <= 1 << 16 {
            if c.bool() {
                options.mask = try? AttentionMask(shape: shape, allowed: (0..<count).map { _ in c.byte() % 4 != 0 })
            } else {
                options.mask = try? AttentionMask(
                    shape: shape, additive: (0..<count).map { _ in c.byte() % 5 == 0 ? -.infinity : c.float() })
            }
        }
    }
    let storage = StorageTypes(query: c.storage(), keyValue: c.storage(), output: c.storage())
    let q = [batch, hq, nq, d]
    let k = [batch, hkv, nk, d]
    let v = [batch, hkv, nk, dv]
    guard let problem = try? AttentionProblem(query: q, key: k, value: v, options: options, storage: storage) else {
        return
    }
    guard Double(batch) * Double(hq) * Double(nq) * Double(nk) * (Double(d) + Double(dv)) <= 200_000 else { return }
    let query = Operand(shape: q, storage: storage.query, choices: &c, fill: true)
    let key = Operand(shape: k, storage: storage.keyValue, choices: &c, fill: true)
    let value = Operand(shape: v, storage: storage.keyValue, choices: &c, fill: true)
    let output = Operand(shape: problem.outputShape, storage: storage.output, choices: &c, fill: false)
    let reference = Operand(shape: problem.outputShape, storage: storage.output, choices: &c, fill: false)
    defer { for operand in [query, key, value, output, reference] { operand.deallocate() } }
    let lseCount = problem.lseShape.reduce(1, *)
    var lse = [Float](repeating: .nan, count: lseCount)
    var referenceLSE = [Float](repeating: .nan, count: lseCount)
    let ranBLAS = lse.withUnsafeMutableBufferPointer { l in
        (try? BLASBackend().forward(
            problem,
            AttentionBuffers(query: query.view, key: key.view, value: value.view, output: output.view, logSumExp: l)))
            != nil
    }
    let valid = query.valid && key.valid && value.valid && output.valid && reference.valid
    if valid && !ranBLAS { fatalError("BLAS refused a valid call: \(problem)") }
    guard ranBLAS && valid else { return }
    let ranNaive = referenceLSE.withUnsafeMutableBufferPointer { l in
        (try? NaiveBackend().forward(
            problem,
            AttentionBuffers(query: query.view, key: key.view, value: value.view, output: reference.view, logSumExp: l)
        )) != nil
    }
    if !ranNaive { fatalError("the reference refused a call BLAS ran: \(problem)") }
    compare(problem, output, reference, lse, referenceLSE)
}

/// One batch of sequences from the input: offsets, lengths and block tables, often wrong.
func fuzzBatch(_ c: inout Choices) {
    let count = c.small(0...4)
    let hkv = c.small(1...2)
    let hq = hkv * c.small(1...2)
    let d = c.small(1...8)
    let layout: SequenceLayout
    var query = [1, hq, 1, d]
    var key = [1, hkv, 1, d]
    switch c.small(0...2) {
    case 0:
        var cuQ: [Int32] = [0]
        var cuK: [Int32] = [0]
        for _ in 0..<count {
            cuQ.append(
                c.small(0...7) == 0 ? Int32(truncatingIfNeeded: c.size(-3...3)) : cuQ.last! &+ Int32(c.small(0...3)))
            cuK.append(
                c.small(0...7) == 0 ? Int32(truncatingIfNeeded: c.size(-3...3)) : cuK.last! &+ Int32(c.small(0...9)))
        }
        if c.small(0...9) == 0 { cuQ.removeLast(min(1, cuQ.count)) }
        layout = .packed(queryOffsets: cuQ, keyOffsets: cuK)
        query = [max(0, Int(cuQ.last ?? 0)) + c.small(0...1), hq, d]
        key = [max(0, Int(cuK.last ?? 0)) + c.small(0...1), hkv, d]
    case 1:
        let capacity = c.small(1...12)
        layout = .cacheLengths((0..<count).map { _ in Int32(truncatingIfNeeded: c.size(0...12)) })
        query = [count, hq, c.small(1...3), d]
        key = [count, hkv, capacity, d]
    default:
        let pageSize = c.small(0...7) == 0 ? c.size(1...5) : 1 << c.small(0...3)
        let pages = c.small(1...6)
        let maxPages = c.small(1...3)
        let table = (0..<(count * maxPages)).map { _ in
            Int32(truncatingIfNeeded: c.small(0...9) == 0 ? c.size(-1...9) : c.small(0...pages - 1))
        }
        layout = .paged(
            lengths: (0..<count).map { _ in
                Int32(truncatingIfNeeded: c.size(0...(maxPages * min(max(pageSize, 1), 1024))))
            },
            table: PageTable(pageSize: pageSize, maxPages: maxPages, blockTable: table))
        query = [count, hq, c.small(1...2), d]
        key = [pages, max(pageSize, 1), hkv, d]
    }
    let options = AttentionOptions(causal: c.bool())
    guard let batch = try? SequenceBatch(query: query, key: key, value: key, layout: layout, options: options),
        batch.count > 0
    else { return }
    // Valid: run BLAS and the reference on dense operands in the form's stored order, when small (a
    // valid batch may still name 2^31 packed rows).
    let elements = [query, key, batch.outputShape].map { Double($0.reduce(1, *)) }.reduce(0, +)
    guard elements <= Double(1 << 20) else { return }
    func dense(_ shape: [Int]) -> UnsafeMutableBufferPointer<Float> {
        let n = max(1, shape.reduce(1, *))
        let buffer = UnsafeMutableBufferPointer<Float>.allocate(capacity: n)
        for i in 0..<n { buffer[i] = Float((i * 7919) % 61) / 30 - 1 }
        return buffer
    }
    let q = dense(query)
    let k = dense(key)
    let v = dense(key)
    let outputs = (dense(batch.outputShape), dense(batch.outputShape))
    let lse = (dense([batch.logSumExpCount]), dense([batch.logSumExpCount]))
    defer { for buffer in [q, k, v, outputs.0, outputs.1, lse.0, lse.1] { buffer.deallocate() } }
    func buffers(_ o: UnsafeMutableBufferPointer<Float>, _ l: UnsafeMutableBufferPointer<Float>) -> AttentionBuffers {
        AttentionBuffers(
            query: TensorView(address: q.baseAddress!, storage: .f32, strides: nil, capacity: query.reduce(1, *)),
            key: TensorView(address: k.baseAddress!, storage: .f32, strides: nil, capacity: key.reduce(1, *)),
            value: TensorView(address: v.baseAddress!, storage: .f32, strides: nil, capacity: key.reduce(1, *)),
            output: TensorView(
                address: o.baseAddress!, storage: .f32, strides: nil, capacity: batch.outputShape.reduce(1, *)),
            logSumExp: UnsafeMutableBufferPointer(rebasing: l[0..<batch.logSumExpCount]))
    }
    do {
        try BLASBackend().forward(batch, buffers(outputs.0, lse.0))
        try NaiveBackend().forward(batch, buffers(outputs.1, lse.1))
    } catch {
        fatalError("a validated batch failed to run: \(error) (\(layout))")
    }
    for i in 0..<batch.outputShape.reduce(1, *) {
        let (x, r) = (outputs.0[i], outputs.1[i])
        if !(abs(x - r) <= 3e-4 + 2e-5 * abs(r)) {
            fatalError("batch output \(x) vs reference \(r) at \(i) (\(layout))")
        }
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzValidation(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    var choices = Choices(bytes: UnsafeBufferPointer(start: data, count: size))
    if choices.bool() { fuzzProblem(&choices) } else { fuzzBatch(&choices) }
    return 0
}

runLibFuzzer(fuzzValidation)
