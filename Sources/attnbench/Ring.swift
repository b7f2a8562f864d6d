import ArgumentParser
import AttentionBLAS
import AttentionDistributed
import AttentionKit
import Foundation
import NumPyIO

extension RingPlan.Sharding: ExpressibleByArgument {}

struct Ring: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Context-parallel attention across ranks: MPI ranks under mpirun, or threads of this process.",
        discussion: """
            Rank 0 reads the .npy files (Q [B, Hq, Nq, D], K [B, Hkv, Nk, D], V [B, Hkv, Nk, Dv], bhsd), sends \
            every rank its shard, and writes O and the log-sum-exp, which equal a single-process `attnbench run` \
            within the fp32 tolerance.

            Nq = Nk: ring attention. Each rank holds a shard of the sequence's Q, K and V rows (--sharding \
            zigzag: chunks r and 2P-1-r, equal causal work; contiguous: one block), and the K/V shards travel \
            around the ring, each exchange overlapped with the compute of the step before.
            Nq != Nk: decode against a sharded cache. Every rank holds all queries and 1/P of the keys; one \
            all-gather of the partial results and an LSE merge give every rank the full result.

            Under MPI (attnbench built with `--traits MPI`, started by `mpirun -np N`), ranks are processes; \
            a rank that fails ends every rank (MPI_Abort) with its reason on stderr. Otherwise --ranks N runs \
            N ranks as threads of this process over the same protocol.
            Per rank it prints compute time, the communication compute did not hide (exposed), the same \
            exchanges timed alone, and the fraction hidden.
            """
    )

    @Option(name: .customLong("q"), help: "Query .npy file, [B, Hq, Nq, D].") var queryPath: String
    @Option(name: .customLong("k"), help: "Key .npy file, [B, Hkv, Nk, D].") var keyPath: String
    @Option(name: .customLong("v"), help: "Value .npy file, [B, Hkv, Nk, Dv].") var valuePath: String
    @Flag(help: "Causal masking (bottom-right aligned).") var causal = false
    @Option(help: ArgumentHelp("Sliding window L,R (-1 = unbounded side).", valueName: "L,R"))
    var window: AttentionWindow?
    @Option(help: "Score scale (default 1/sqrt(D)).") var scale: Float?
    @Option(help: "Softcap c > 0.") var softcap: Float?
    @Option(help: "Storage of K and V (rounded to nearest even; they travel the ring in it): f32, f16 or bf16.")
    var kvDtype: StorageType = .f32
    @Option(help: "How the sequence is sharded across ranks (ring attention): zigzag or contiguous.")
    var sharding: RingPlan.Sharding = .zigzag
    @Option(help: "Backend for each rank's blocks: auto, naive, blas, opencl or opencl:N.")
    var backend: BackendChoice = .auto
    @Option(help: "CPU threads per rank for --backend blas (default: all cores; under mpirun give cores / ranks).")
    var threads: Int?
    @Option(
        name: .customLong("cu-seqlens"),
        help: ArgumentHelp(
            "Packed sequences: S + 1 offsets (.npy, int32 or int64); Q/K/V files are then [total, H, D], "
                + "O is written [total, Hq, Dv] and the LSE [total, Hq]. Each sequence is its own problem, "
                + "sharded on its own."))
    var cuSeqlens: String?
    @Option(help: "Ranks as threads of this process (ignored under mpirun with more than one MPI rank).")
    var ranks: Int = 2
    @Option(name: .customLong("out"), help: "Output .npy file for O (written by rank 0).") var outPath: String
    @Option(name: .customLong("lse"), help: "Output .npy file for the log-sum-exp (written by rank 0).")
    var lsePath: String?
    @Option(help: .hidden) var failRank: Int?

    func validate() throws {
        guard ranks >= 1 else { throw ValidationError("--ranks must be at least 1") }
        if let threads, threads < 1 { throw ValidationError("--threads must be at least 1") }
    }

    func run() throws {
        #if MPI
            let world = try MPICommunicator.world()
            if world.size > 1 {
                do {
                    let report = try RingJob(command: self).run(on: world)
                    if world.rank == 0 { print(report) }
                    world.finalize()
                } catch {
                    FileHandle.standardError.write(Data("attnbench ring: rank \(world.rank): \(error)\n".utf8))
                    world.abort()
                }
                return
            }
        #endif
        let ring = LocalRing(size: ranks)
        let job = RingJob(command: self)
        let report = Report()
        do {
            try ring.run { (communicator) throws(AttentionError) in
                let text = try job.run(on: communicator)
                if communicator.rank == 0 { report.text = text }
            }
        } catch {
            throw CLIError("\(error)")
        }
        print(report.text)
    }

    final class Report: @unchecked Sendable {
        var text = ""
    }
}

/// One rank's part of `attnbench ring`, over any communicator: rank 0 reads and scatters, every rank
/// computes, rank 0 gathers, writes and reports.
struct RingJob: Sendable {
    let command: Ring

    /// The problem's sizes as rank 0 read them: B, Hq, Hkv, Nq, Nk, D, Dv.
    private func sizes(_ q: [Int], _ k: [Int], _ v: [Int]) throws(AttentionError) -> [Int] {
        guard q.count == 4, k.count == 4, v.count == 4 else {
            throw .invalidRank(tensor: "ring inputs", expected: "4-D [B, H, N, D] files", actual: q)
        }
        return [q[0], q[1], k[1], q[2], k[2], q[3], v[3]]
    }

    func problem(_ s: [Int]) throws(AttentionError) -> AttentionProblem {
        try AttentionProblem(
            query: [s[0], s[1], s[3], s[5]], key: [s[0], s[2], s[4], s[5]], value: [s[0], s[2], s[4], s[6]],
            options: AttentionOptions(
                scale: command.scale, softcap: command.softcap, causal: command.causal, window: command.window),
            storage: StorageTypes(keyValue: command.kvDtype))
    }

    private func load(_ path: String, _ role: String) throws(AttentionError) -> Tensor {
        do {
            let array = try NPYArray.read(contentsOf: path)
            guard let values = array.floats else {
                throw AttentionError.fileError(path: path, reason: "the \(role) must be floating point")
            }
            return try Tensor(shape: array.shape, storage: values, name: "\(role) (\(path))")
        } catch let error as AttentionError {
            throw error
        } catch {
            // NPYIO's errors name the file already.
            let text = "\(error)"
            throw .fileError(
                path: path, reason: text.hasPrefix(path + ": ") ? String(text.dropFirst(path.count + 2)) : text)
        }
    }

    /// A packed [total, H, D] file as the logical [1, H, total, D] tensor.
    private func unpack(_ t: Tensor) throws(AttentionError) -> Tensor {
        guard t.shape.count == 3 else {
            throw .invalidRank(
                tensor: "packed operand", expected: "3 ([total, H, D]) with --cu-seqlens", actual: t.shape)
        }
        let (n, h, d) = (t.shape[0], t.shape[1], t.shape[2])
        return try Tensor(shape: [1, h, n, d], storage: permuteHeadsAndPositions(t.storage, [1, n, h, d]))
    }

    /// S + 1 offsets from 0, non-decreasing, as S lengths.
    private func loadLengths(_ path: String) throws(AttentionError) -> [Int] {
        let offsets: [Int64]
        do {
            let array = try NPYArray.read(contentsOf: path)
            guard let values = array.integers, array.shape.count == 1, values.count >= 2 else {
                throw AttentionError.fileError(path: path, reason: "expected 1-D int32 or int64 offsets, S + 1 >= 2")
            }
            offsets = values.map { Int64($0) }
        } catch let error as AttentionError {
            throw error
        } catch {
            throw .fileError(path: path, reason: "\(error)")
        }
        guard offsets[0] == 0 else {
            throw .invalidSequenceOffsets(name: "--cu-seqlens", index: 0, reason: "offsets must start at 0")
        }
        for i in 1..<offsets.count where offsets[i] < offsets[i - 1] {
            throw .invalidSequenceOffsets(name: "--cu-seqlens", index: i, reason: "offsets must not decrease")
        }
        return (1..<offsets.count).map { Int(offsets[$0] - offsets[$0 - 1]) }
    }

    func run(on comm: some RingCommunicator) throws(AttentionError) -> String {
        let (rank, size) = (comm.rank, comm.size)
        // Rank 0 reads; its sizes (or its error) reach every rank before anything else.
        var inputs: (Tensor, Tensor, Tensor)?
        var lengths: [Int] = []
        var header = [Int64](repeating: 0, count: 8)
        var readError: AttentionError?
        if rank == 0 {
            do throws(AttentionError) {
                var loaded = (
                    try load(command.queryPath, "query"), try load(command.keyPath, "key"),
                    try load(command.valuePath, "value")
                )
                if let path = command.cuSeqlens {
                    lengths = try loadLengths(path)
                    loaded = (try unpack(loaded.0), try unpack(loaded.1), try unpack(loaded.2))
                    let total = lengths.reduce(0, +)
                    guard loaded.0.shape[2] == total, loaded.1.shape[2] == total else {
                        throw .shapeMismatch(
                            "--cu-seqlens: the sequences hold \(total) positions, the files \(loaded.0.shape[2]) "
                                + "queries and \(loaded.1.shape[2]) keys")
                    }
                }
                let s = try sizes(loaded.0.shape, loaded.1.shape, loaded.2.shape)
                _ = try problem(s)
                inputs = loaded
                header = [1] + s.map(Int64.init)
            } catch {
                readError = error
            }
        }
        var all = [Int64](repeating: 0, count: 8 * size)
        try gather(comm, header, into: &all)
        if let readError { throw readError }
        guard all[0] == 1 else {
            // Rank 0 reports why; in-process the others just stop, under MPI they fail too (every rank
            // exits non-zero).
            if comm is LocalCommunicator { return "" }
            throw .backendFailure(backend: "ring", message: "rank 0 could not read its input")
        }
        let s = all[1..<8].map { Int($0) }
        let problem = try problem(s)
        var sequenceLengths: [Int]?
        if command.cuSeqlens != nil {
            // Rank 0's sequence lengths, to everyone: their count first, then the lengths.
            var count = [Int64](repeating: 0, count: size)
            try gather(comm, [Int64(lengths.count)], into: &count)
            var local = [Int64](repeating: 0, count: Int(count[0]))
            if rank == 0 { local = lengths.map(Int64.init) }
            var every = [Int64](repeating: 0, count: local.count * size)
            try gather(comm, local, into: &every)
            sequenceLengths = every[0..<local.count].map { Int($0) }
        }
        let chosen: (any AttentionBackend)?
        switch command.backend {
        case .auto:
            chosen = nil
            _ = Dispatcher.process.candidates  // built before the timed part
        case .backend(.blas) where command.threads != nil: chosen = BLASBackend(threads: command.threads)
        case .backend(let id): chosen = try Dispatcher.process.backend(id)
        }
        if problem.queryLength == problem.keyLength {
            return try ringAttention(comm, problem, sequenceLengths, inputs, chosen)
        }
        return try shardedDecode(comm, problem, inputs, chosen)
    }

    private func gather(_ comm: some RingCommunicator, _ local: [Int64], into all: inout [Int64]) throws(AttentionError)
    {
        try local.withUnsafeBufferPointer { (l) throws(AttentionError) in
            try all.withUnsafeMutableBufferPointer { (a) throws(AttentionError) in
                try comm.allGather(UnsafeRawBufferPointer(l), into: UnsafeMutableRawBufferPointer(a))
            }
        }
    }

    private func ringAttention(
        _ comm: some RingCommunicator, _ problem: AttentionProblem, _ sequenceLengths: [Int]?,
        _ inputs: (Tensor, Tensor, Tensor)?, _ backend: (any AttentionBackend)?
    ) throws(AttentionError) -> String {
        let ring = try RingAttention(
            problem: problem, sequenceLengths: sequenceLengths, ranks: comm.size, sharding: command.sharding,
            backend: backend)
        let plan = ring.plan
        let shapes = ring.localShapes(rank: comm.rank)
        // Shards: rank 0 sends each rank its Q (fp32) and K, V (in the K/V storage type).
        let operands = try scatter(
            comm, shapes: [shapes.query, shapes.key, shapes.value], keyValue: problem.storage.keyValue,
            inputs: inputs
        ) { (target, q, k, v) throws(AttentionError) in
            (try plan.shard(q, rank: target), try plan.shard(k, rank: target), try plan.shard(v, rank: target))
        }
        let started = DispatchTime.now().uptimeNanoseconds
        let (timings, output, lse) = try withRankBuffers(
            operands, outputCount: shapes.output.reduce(1, *), logSumExpCount: shapes.logSumExp.reduce(1, *)
        ) { (q, k, v, o, l) throws(AttentionError) in
            try ring.run(on: comm, query: q, key: k, value: v, output: o, logSumExp: l)
        }
        let wall = Double(DispatchTime.now().uptimeNanoseconds - started) * 1e-9
        let alone = try ring.measureCommunication(on: comm)
        // O and LSE rows to rank 0.
        var result: (Tensor, Tensor)?
        if comm.rank == 0 {
            var outputs = [try Tensor(shape: shapes.output, storage: output)]
            var lses = [try Tensor(shape: shapes.logSumExp, storage: lse)]
            for source in 1..<comm.size {
                let local = ring.localShapes(rank: source)
                var o = [Float](repeating: 0, count: local.output.reduce(1, *))
                var l = [Float](repeating: 0, count: local.logSumExp.reduce(1, *))
                try receive(comm, &o, from: source)
                try receive(comm, &l, from: source)
                outputs.append(try Tensor(shape: local.output, storage: o))
                lses.append(try Tensor(shape: local.logSumExp, storage: l))
            }
            result = (try plan.assemble(outputs), try plan.assemble(lses))
        } else {
            try send(comm, output, to: 0)
            try send(comm, lse, to: 0)
        }
        let packed = sequenceLengths.map { ", \($0.count) packed sequences" } ?? ""
        return try report(
            comm, problem: problem, result: result, timings: timings, wall: wall, alone: alone,
            mode: "ring attention, \(command.sharding) shards (\(shapes.query[2]) rows on rank 0)\(packed)")
    }

    private func shardedDecode(
        _ comm: some RingCommunicator, _ problem: AttentionProblem, _ inputs: (Tensor, Tensor, Tensor)?,
        _ backend: (any AttentionBackend)?
    ) throws(AttentionError) -> String {
        let sharded = try ShardedKVAttention(problem: problem, ranks: comm.size, backend: backend)
        let keys = sharded.keys(of: comm.rank)
        let p = problem
        let operands = try scatter(
            comm,
            shapes: [
                p.queryShape, [p.batch, p.keyValueHeads, keys.count, p.headDim],
                [p.batch, p.keyValueHeads, keys.count, p.valueDim],
            ], keyValue: p.storage.keyValue, inputs: inputs
        ) { (target, q, k, v) throws(AttentionError) in
            let range = sharded.keys(of: target)
            return (q, try ShardedKVAttention.slice(k, keys: range), try ShardedKVAttention.slice(v, keys: range))
        }
        let started = DispatchTime.now().uptimeNanoseconds
        let (timings, output, lse) = try withRankBuffers(
            operands, outputCount: p.outputShape.reduce(1, *), logSumExpCount: p.lseShape.reduce(1, *)
        ) { (q, k, v, o, l) throws(AttentionError) in
            try sharded.run(on: comm, query: q, key: k, value: v, output: o, logSumExp: l)
        }
        let wall = Double(DispatchTime.now().uptimeNanoseconds - started) * 1e-9
        let result =
            comm.rank == 0
            ? (try Tensor(shape: p.outputShape, storage: output), try Tensor(shape: p.lseShape, storage: lse)) : nil
        return try report(
            comm, problem: p, result: result, timings: timings, wall: wall, alone: timings.exposedCommunicationSeconds,
            mode: "sharded-K/V decode (\(keys.count) keys on rank 0, one all-gather)")
    }

    /// Rank 0 cuts every rank's Q (sent as fp32), K and V (in the K/V storage type) out of the inputs
    /// with `cut(target, q, k, v)` and sends them; the other ranks receive theirs, of `shapes`. Then the
    /// `--fail-rank` hook. Returns this rank's operands.
    private func scatter(
        _ comm: some RingCommunicator, shapes: [[Int]], keyValue: StorageType, inputs: (Tensor, Tensor, Tensor)?,
        cut: (Int, Tensor, Tensor, Tensor) throws(AttentionError) -> (Tensor, Tensor, Tensor)
    ) throws(AttentionError) -> (StoredOperand, StoredOperand, StoredOperand) {
        var operands = (
            StoredOperand(shape: shapes[0], type: .f32), StoredOperand(shape: shapes[1], type: keyValue),
            StoredOperand(shape: shapes[2], type: keyValue)
        )
        if comm.rank == 0, let (q, k, v) = inputs {
            for target in (0..<comm.size).reversed() {
                let (tq, tk, tv) = try cut(target, q, k, v)
                let parts = (
                    StoredOperand(tq, as: .f32), StoredOperand(tk, as: keyValue), StoredOperand(tv, as: keyValue)
                )
                if target == 0 {
                    operands = parts
                } else {
                    for part in [parts.0, parts.1, parts.2] { try part.send(comm, to: target) }
                }
            }
        } else {
            try operands.0.receive(comm, from: 0)
            try operands.1.receive(comm, from: 0)
            try operands.2.receive(comm, from: 0)
        }
        if command.failRank == comm.rank { try fail(comm) }
        return operands
    }

    /// The test hook `--fail-rank R`: under MPI that rank dies (SIGKILL) as a crashed process would;
    /// in-process it throws, as a rank whose input is bad would.
    private func fail(_ comm: some RingCommunicator) throws(AttentionError) {
        #if MPI
            if comm is MPICommunicator { kill(getpid(), SIGKILL) }
        #endif
        throw .backendFailure(backend: "ring", message: "rank \(comm.rank) failed on request (--fail-rank)")
    }

    private func send(_ comm: some RingCommunicator, _ values: [Float], to target: Int) throws(AttentionError) {
        try values.withUnsafeBufferPointer { (p) throws(AttentionError) in
            try comm.send(UnsafeRawBufferPointer(p), to: target)
        }
    }

    private func receive(_ comm: some RingCommunicator, _ values: inout [Float], from source: Int)
        throws(AttentionError)
    {
        try values.withUnsafeMutableBufferPointer { (p) throws(AttentionError) in
            try comm.receive(UnsafeMutableRawBufferPointer(p), from: source)
        }
    }

    /// Rank 0 writes the files; everyone's timings reach rank 0, which formats the report.
    private func report(
        _ comm: some RingCommunicator, problem: AttentionProblem, result: (Tensor, Tensor)?, timings: RingTimings,
        wall: Double, alone: Double, mode: String
    ) throws(AttentionError) -> String {
        if let (output, lse) = result {
            do {
                if command.cuSeqlens != nil {
                    // Back to packed [total, Hq, Dv] and [total, Hq].
                    let (h, n, dv) = (output.shape[1], output.shape[2], output.shape[3])
                    try NPYArray(shape: [n, h, dv], floats: permuteHeadsAndPositions(output.storage, output.shape))
                        .write(to: command.outPath)
                    if let path = command.lsePath {
                        try NPYArray(shape: [n, h], floats: permuteHeadsAndPositions(lse.storage, [1, h, n, 1]))
                            .write(to: path)
                    }
                } else {
                    try NPYArray(shape: output.shape, floats: output.storage).write(to: command.outPath)
                    if let path = command.lsePath {
                        try NPYArray(shape: lse.shape, floats: lse.storage).write(to: path)
                    }
                }
            } catch {
                throw .fileError(path: command.outPath, reason: "\(error)")
            }
        }
        let mine: [Double] = [
            wall, timings.computeSeconds, timings.exposedCommunicationSeconds, alone, Double(timings.bytesSent),
            Double(timings.blocks),
        ]
        var all = [Double](repeating: 0, count: mine.count * comm.size)
        try mine.withUnsafeBufferPointer { (l) throws(AttentionError) in
            try all.withUnsafeMutableBufferPointer { (a) throws(AttentionError) in
                try comm.allGather(UnsafeRawBufferPointer(l), into: UnsafeMutableRawBufferPointer(a))
            }
        }
        guard comm.rank == 0 else { return "" }
        let p = problem
        var lines = [
            "ring: \(comm.size) ranks (\(comm is LocalCommunicator ? "threads" : "MPI processes")), \(mode)",
            "problem: B\(p.batch) Hq\(p.queryHeads) Hkv\(p.keyValueHeads) Nq\(p.queryLength) Nk\(p.keyLength) "
                + "D\(p.headDim) Dv\(p.valueDim)\(p.options.causal ? " causal" : "") K/V \(p.storage.keyValue)",
            "rank  wall ms  compute ms  exposed comm ms  comm alone ms  hidden  MB sent  blocks",
        ]
        for r in 0..<comm.size {
            let t = Array(all[(r * mine.count)..<((r + 1) * mine.count)])
            let hidden = t[3] > 0 ? max(0, min(1, 1 - t[2] / t[3])) : 1
            lines.append(
                String(
                    format: "%4d  %7.2f  %10.2f  %15.2f  %13.2f  %5.0f%%  %7.2f  %6d", r, t[0] * 1e3, t[1] * 1e3,
                    t[2] * 1e3, t[3] * 1e3, hidden * 100, t[4] / 1e6, Int(t[5])))
        }
        lines.append("wrote \(command.outPath)" + (command.lsePath.map { " and \($0)" } ?? ""))
        return lines.joined(separator: "\n")
    }
}
