import AttentionCore

/// How a verification run lays its operands out in memory.
public enum OperandLayout: String, Sendable, CaseIterable, CustomStringConvertible {
    /// Dense [B, H, N, D] for all four.
    case bhsd
    /// Dense [B, N, H, D] for all four.
    case bshd
    /// K and V as the first Nk rows of [B, Hkv, capacity, D] caches with 13 spare rows; Q dense; O with
    /// 3 spare elements after each row.
    case cacheView
    /// Q, K and V as three views of one fused-projection buffer [B, N, Hq·D + Hkv·D + Hkv·Dv] (needs
    /// Nq = Nk and one storage type for Q and K/V); O in [B, N, H, Dv].
    case packedQKV

    public var description: String { rawValue }

    /// Whether a case can be laid out this way.
    public func fits(_ c: VerificationCase, _ storage: StorageTypes) -> Bool {
        self != .packedQKV || (c.nq == c.nk && storage.query == storage.keyValue)
    }
}

/// One backend run with operands in a given layout and storage, checked against the float64
/// reference of the rounded inputs. Every buffer is filled with NaN before the operands are written,
/// so a read outside an operand's elements poisons the output, and a write outside the output's
/// elements is found afterwards.
public struct LayoutRun {
    /// O in logical [B, Hq, Nq, Dv] order, widened to fp32.
    public var output: [Float]
    public var logSumExp: [Float]
    public var report: AccuracyReport
    /// Whether every byte of the output buffer outside O's elements is unchanged.
    public var outputPaddingIntact: Bool

    public init(
        _ backend: any AttentionBackend, _ c: VerificationCase, layout: OperandLayout, storage: StorageTypes
    ) throws(AttentionError) {
        let base = try c.problem()
        let problem = try AttentionProblem(
            query: base.queryShape, key: base.keyShape, value: base.valueShape, options: c.options, storage: storage)
        let (q, k, v) = try c.inputs()
        let rounded = (
            try q.rounded(to: storage.query), try k.rounded(to: storage.keyValue), try v.rounded(to: storage.keyValue)
        )
        let reference = NaiveBackend.reference(base, query: rounded.0, key: rounded.1, value: rounded.2)
        let memory = try OperandMemory(problem, layout: layout, q: rounded.0, k: rounded.1, v: rounded.2)
        defer { memory.deallocate() }
        var lse = [Float](repeating: .nan, count: problem.lseShape.reduce(1, *))
        var failure: AttentionError?
        lse.withUnsafeMutableBufferPointer { lseBuffer in
            do throws(AttentionError) {
                try backend.forward(problem, memory.buffers(logSumExp: lseBuffer))
            } catch {
                failure = error
            }
        }
        if let failure { throw failure }
        output = memory.readOutput()
        logSumExp = lse
        outputPaddingIntact = memory.outputPaddingIntact()
        report = output.withUnsafeBufferPointer { out in
            lse.withUnsafeBufferPointer { l in
                AccuracyReport(
                    output: out, logSumExp: l, reference: reference.output, referenceLSE: reference.logSumExp,
                    valueDim: problem.valueDim, outputType: storage.output)
            }
        }
    }
}

extension Tensor {
    /// This tensor with every element rounded to `type` (and widened back to fp32).
    public func rounded(to type: StorageType) throws(AttentionError) -> Tensor {
        try Tensor(shape: shape, storage: storage.map(type.rounded))
    }
}

/// The four operands of one call written into freshly allocated, NaN-filled memory in a layout and
/// in the problem's storage types; `deallocate()` when done.
public struct OperandMemory: @unchecked Sendable {
    struct Region {
        let memory: UnsafeMutableRawPointer
        let bytes: Int
        let type: StorageType
        func deallocate() { memory.deallocate() }
    }

    public let problem: AttentionProblem
    let regions: [Region]
    public let q: TensorView, k: TensorView, v: TensorView, o: TensorView

    /// Lays out Q, K, V (logical [B, H, N, D] fp32 tensors, rounded to the problem's storage types as
    /// they are written) and an output buffer.
    public init(_ p: AttentionProblem, layout: OperandLayout, q: Tensor, k: Tensor, v: Tensor) throws(AttentionError) {
        problem = p
        let t = p.storage
        let (qs, ks, vs, os) = (p.queryShape, p.keyShape, p.valueShape, p.outputShape)
        var regions: [Region] = []
        func region(elements: Int, _ type: StorageType) -> Region {
            let r = Region(
                memory: .allocate(byteCount: elements * type.byteSize, alignment: 64), bytes: elements * type.byteSize,
                type: type)
            r.fill()
            regions.append(r)
            return r
        }
        func view(_ r: Region, offset: Int = 0, _ strides: Strides, capacity: Int) -> TensorView {
            TensorView(
                address: r.memory + offset * r.type.byteSize, storage: r.type, strides: strides, capacity: capacity)
        }
        func dense(_ shape: [Int], _ type: StorageType, _ order: TensorLayout) -> TensorView {
            let n = shape.reduce(1, *)
            return view(region(elements: n, type), order.strides(shape), capacity: n)
        }
        switch layout {
        case .bhsd, .bshd:
            let order: TensorLayout = layout == .bhsd ? .bhsd : .bshd
            (self.q, self.k, self.v, self.o) = (
                dense(qs, t.query, order), dense(ks, t.keyValue, order), dense(vs, t.keyValue, order),
                dense(os, t.output, order)
            )
        case .cacheView:
            let capacity = p.keyLength + 13
            func cache(_ shape: [Int]) -> TensorView {
                let n = shape[0] * shape[1] * capacity * shape[3]
                let s = Strides(batch: shape[1] * capacity * shape[3], head: capacity * shape[3], sequence: shape[3])
                return view(region(elements: n, t.keyValue), s, capacity: n)
            }
            let rowStride = os[3] + 3
            let on = os[0] * os[1] * os[2] * rowStride
            let oStrides = Strides(batch: os[1] * os[2] * rowStride, head: os[2] * rowStride, sequence: rowStride)
            (self.q, self.k, self.v, self.o) = (
                dense(qs, t.query, .bhsd), cache(ks), cache(vs),
                view(region(elements: on, t.output), oStrides, capacity: on)
            )
        case .packedQKV:
            let (hq, hkv, d, dv, n) = (p.queryHeads, p.keyValueHeads, p.headDim, p.valueDim, p.queryLength)
            let width = hq * d + hkv * d + hkv * dv
            let total = p.batch * n * width
            let fused = region(elements: total, t.query)
            (self.q, self.k, self.v) = (
                view(fused, Strides(batch: n * width, head: d, sequence: width), capacity: total),
                view(
                    fused, offset: hq * d, Strides(batch: n * width, head: d, sequence: width), capacity: total - hq * d
                ),
                view(
                    fused, offset: hq * d + hkv * d, Strides(batch: n * width, head: dv, sequence: width),
                    capacity: total - hq * d - hkv * d)
            )
            self.o = dense(os, t.output, .bshd)
        }
        self.regions = regions
        write(q, into: self.q, shape: qs)
        write(k, into: self.k, shape: ks)
        write(v, into: self.v, shape: vs)
    }

    public func deallocate() { for r in regions { r.deallocate() } }

    public func buffers(logSumExp: UnsafeMutableBufferPointer<Float>?) -> AttentionBuffers {
        AttentionBuffers(query: q, key: k, value: v, output: o, logSumExp: logSumExp)
    }

    private func write(_ tensor: Tensor, into view: TensorView, shape: [Int]) {
        let s = view.strides(for: shape)
        var index = 0
        for b in 0..<shape[0] {
            for h in 0..<shape[1] {
                for n in 0..<shape[2] {
                    for d in 0..<shape[3] {
                        view.store(tensor.storage[index], s, b, h, n, d)
                        index += 1
                    }
                }
            }
        }
    }

    /// O in logical order, widened to fp32.
    public func readOutput() -> [Float] {
        let shape = problem.outputShape
        let s = o.strides(for: shape)
        var out: [Float] = []
        out.reserveCapacity(shape.reduce(1, *))
        for b in 0..<shape[0] {
            for h in 0..<shape[1] {
                for n in 0..<shape[2] {
                    for d in 0..<shape[3] { out.append(o.load(s, b, h, n, d)) }
                }
            }
        }
        return out
    }

    /// Whether the output region still holds NaN everywhere outside O's elements.
    public func outputPaddingIntact() -> Bool {
        guard let region = regions.last(where: { $0.memory == o.address }) else { return true }
        let shape = problem.outputShape
        let s = o.strides(for: shape)
        let elements = region.bytes / region.type.byteSize
        var isElement = [Bool](repeating: false, count: elements)
        for b in 0..<shape[0] {
            for h in 0..<shape[1] {
                for n in 0..<shape[2] {
                    let start = s.offset(batch: b, head: h, position: n)
                    for d in 0..<shape[3] { isElement[start + d] = true }
                }
            }
        }
        return (0..<elements).allSatisfy { isElement[$0] || region.isNaNPattern(at: $0) }
    }
}

extension OperandMemory.Region {
    /// The pattern a region starts with: NaN in its storage type.
    static func nanBits(_ type: StorageType) -> UInt32 {
        switch type {
        case .f32: return 0x7FC0_0000
        case .f16: return 0x7E00
        case .bf16: return 0x7FC0
        }
    }

    func fill() {
        let bits = Self.nanBits(type)
        if type == .f32 {
            memory.initializeMemory(as: UInt32.self, repeating: bits, count: bytes / 4)
        } else {
            memory.initializeMemory(as: UInt16.self, repeating: UInt16(bits), count: bytes / 2)
        }
    }

    func isNaNPattern(at i: Int) -> Bool {
        let bits = Self.nanBits(type)
        if type == .f32 { return memory.load(fromByteOffset: 4 * i, as: UInt32.self) == bits }
        return memory.load(fromByteOffset: 2 * i, as: UInt16.self) == UInt16(bits)
    }
}
