import AttentionKit
import AttentionVerification
import Foundation
import NumPyIO

extension Run {
    /// `run` with `--cu-seqlens-q/k` (varlen), `--cache-lengths` and/or `--page-size`: one call on
    /// a batch of sequences; outputs in the files' form and layout.
    func runBatch() throws {
        let varlen = cuSeqlensQ != nil || cuSeqlensK != nil
        guard !varlen || (cuSeqlensQ != nil && cuSeqlensK != nil) else {
            throw CLIError("--cu-seqlens-q and --cu-seqlens-k go together")
        }
        guard !(varlen && cacheLengthsPath != nil) else {
            throw CLIError("--cu-seqlens-q/k (packed sequences) and --cache-lengths (caches) exclude each other")
        }
        guard varlen || cacheLengthsPath != nil else {
            throw CLIError("--page-size needs --cu-seqlens-q/k or --cache-lengths (the sequences to page)")
        }
        guard maskPath == nil else { throw CLIError("--mask cannot be used with a batch of sequences") }
        guard !resident else { throw CLIError("--resident cannot be used with a batch of sequences") }
        guard !(varlen && layout == .bshd) else {
            throw CLIError("--layout does not apply to packed sequences ([total, H, D] files)")
        }
        let (q, k, v) = (try loadRaw(queryPath, "query"), try loadRaw(keyPath, "key"), try loadRaw(valuePath, "value"))
        let storage = StorageTypes(
            query: dtype ?? (q.isHalf ? .f16 : .f32),
            keyValue: kvDtype ?? dtype ?? (k.isHalf || v.isHalf ? .f16 : .f32),
            output: outDtype)
        let options = AttentionOptions(scale: scale, softcap: softcap, causal: causal, window: window)
        let base: ServingOperands
        do {
            if let cuSeqlensQ, let cuSeqlensK {
                base = try ServingOperands(
                    packedQuery: q.values, q.shape, key: k.values, k.shape, value: v.values, v.shape,
                    queryOffsets: try loadOffsets(cuSeqlensQ, "--cu-seqlens-q"),
                    keyOffsets: try loadOffsets(cuSeqlensK, "--cu-seqlens-k"), options: options, storage: storage)
            } else {
                func logical(_ shape: [Int]) -> [Int] {
                    layout == .bshd && shape.count == 4 ? [shape[0], shape[2], shape[1], shape[3]] : shape
                }
                base = try ServingOperands(
                    cachedQuery: q.values, logical(q.shape), key: k.values, logical(k.shape), value: v.values,
                    logical(v.shape), layout: layout,
                    lengths: try loadOffsets(cacheLengthsPath ?? "", "--cache-lengths"),
                    options: options, storage: storage)
            }
        } catch let error as AttentionError {
            throw CLIError("\(error) (query: \(queryPath), key: \(keyPath), value: \(valuePath))")
        }
        defer { base.deallocate() }
        let operands = try pageSize.map { size in try base.paged(pageSize: size, seed: 1) } ?? base
        defer { if pageSize != nil { operands.deallocate() } }
        let batch = operands.batch

        let selection = try batchSelection(batch)
        let runner = selection.backend
        var lse = [Float](repeating: 0, count: batch.logSumExpCount)
        let run = try lse.withUnsafeMutableBufferPointer { buffer in
            try selection.run(batch: batch, operands.buffers(logSumExp: buffer))
        }
        let outputShape: [Int]
        if varlen {
            outputShape = [q.shape[0], batch.queryHeads, batch.valueDim]
            if pageSize != nil { lse = packedLogSumExp(lse, batch) }
        } else {
            outputShape = layout.storedShape(batch.outputShape)
        }
        let values = operands.readOutput()
        if outDtype == .f16 {
            try NPYArray(shape: outputShape, halfBits: values.map(StorageType.encodeHalf)).write(to: outPath)
        } else {
            try NPYArray(shape: outputShape, floats: values).write(to: outPath)
        }
        if let lsePath {
            let shape = varlen ? [q.shape[0], batch.queryHeads] : Array(batch.outputShape.dropLast())
            try NPYArray(shape: shape, floats: lse).write(to: lsePath)
        }
        let form = pageSize.map { "paged (page size \($0)) from \(base.batch.layout.name)" } ?? batch.layout.name
        printError(
            "\(run.backend) (\(selection.reason)): \(batch.count) sequences, \(form), O \(outputShape) [\(storage)] "
                + "written to \(outPath)")
        if run.fellBack { printError("warning: ran on \(run)") }
        if let repetitions {
            let buffers = operands.buffers(logSumExp: nil)
            // With --backend auto every timed call decides again, as a caller of the dispatcher pays.
            let call: () throws -> Void =
                backend == .auto
                ? { try Dispatcher.process.decide(batch).chosen.forward(batch, buffers) }
                : { try runner.forward(batch, buffers) }
            let times = try timeCalls(repetitions: repetitions, budget: .infinity, call)
            let median = times[times.count / 2]
            let sgemm = MachineProbes.measureSGEMM()
            let bandwidth = MachineProbes.measureReadBandwidth()
            let gflops = batch.flops / median / 1e9
            let rate = batch.keyValueBytes / median / 1e9
            printError(
                "\(runner.name): median \(format(median * 1e3)) ms (\(format(median * 1e6)) us) over \(repetitions) runs, \(format(gflops)) GFLOP/s "
                    + "= \(format(gflops / sgemm)) x SGEMM (\(format(sgemm)) measured now), K/V read \(format(rate)) "
                    + "GB/s = \(format(rate / bandwidth)) x memory read bandwidth (\(format(bandwidth)) GB/s measured now)"
            )
        }
    }

    /// `--backend` for a batch: the dispatcher's choice (auto) or the named backend.
    private func batchSelection(_ batch: SequenceBatch) throws -> BackendSelection {
        switch backend {
        case .auto:
            return try BackendSelection.select(.auto, for: batch)
        case .backend(let id):
            var id = id
            if case .opencl = id, let device { id = .opencl(device: device) }
            if id == .blas, let threads {
                return BackendSelection(backend: BLASBackend(threads: threads, tiling: tiling), reason: "requested")
            }
            return try BackendSelection.select(.backend(id), for: batch)
        }
    }

    /// A file's values and stored shape (as stored: no reordering), and whether it held fp16.
    private func loadRaw(_ path: String, _ role: String) throws -> (values: [Float], shape: [Int], isHalf: Bool) {
        let (tensor, isHalf) = try loadOperand(path, role: role, layout: .bhsd)
        return (tensor.storage, tensor.shape, isHalf)
    }

    /// A 1-D int32/int64 file as int32 values.
    private func loadOffsets(_ path: String, _ flag: String) throws -> [Int32] {
        let array = try NPYArray.read(contentsOf: path)
        guard let values = array.integers, array.shape.count == 1 else {
            throw CLIError(
                "\(flag) \(path): expected a 1-D int32 or int64 array, got \(array.fileDType.rawValue) \(array.shape)")
        }
        return try values.enumerated().map { (i, x) in
            guard let value = Int32(exactly: x) else {
                throw CLIError("\(flag) \(path): value \(x) at \(i) exceeds int32")
            }
            return value
        }
    }

    /// [B, Hq, Nq] log-sum-exps of a paged run of packed sequences, back in packed [totalQ, Hq] order.
    private func packedLogSumExp(_ lse: [Float], _ batch: SequenceBatch) -> [Float] {
        let (hq, nq) = (batch.queryHeads, batch.outputShape[2])
        var packed = lse
        for b in 0..<batch.count {
            for h in 0..<hq {
                for i in 0..<nq { packed[(b * nq + i) * hq + h] = lse[(b * hq + h) * nq + i] }
            }
        }
        return packed
    }
}
