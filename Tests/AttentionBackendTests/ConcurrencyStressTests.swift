import AttentionBLAS
import AttentionCore
import AttentionKit
import AttentionMachine
import AttentionOpenCL
import AttentionVerification
import Foundation
import Testing

/// 64 concurrent calls mixing backends, shapes, storage types, layouts and KV-cache appends, each
/// result bitwise equal to the same call made alone. No timing assertions: a deadlock would hang the
/// suite (CI's time limit catches it), a race shows as a differing bit.
@Suite struct ConcurrencyStress {
    /// One job: a backend on a case in a layout and storage combination, or a KV-cache sequence
    /// growing by appends and attended to after each.
    enum Job: Sendable {
        case layout(any AttentionBackend, VerificationCase, OperandLayout, StorageTypes)
        case cache(sequence: Int, appends: [Int], seed: UInt64)
    }

    /// Outputs and log-sum-exps as bit patterns (NaN-safe equality).
    struct Bits: Equatable, Sendable {
        var values: [UInt32]
        init(_ arrays: [[Float]]) { values = arrays.flatMap { $0.map(\.bitPattern) } }
    }

    static let jobCount = 64

    static func jobs() -> [Job] {
        var backends: [any AttentionBackend] = [BLASBackend(), NaiveBackend()]
        backends += CPUISA.supported.filter { $0 != CPUISA.best }.map { BLASBackend(isa: $0) }
        backends += OpenCLRuntime.availableDevices.indices.map { OpenCLBackend(device: $0) }
        let cases = StorageSweep.cases.filter { $0.work <= 2_000_000 }
        let storages = StorageSweep.combinations
        var jobs: [Job] = []
        var i = 0
        while jobs.count < jobCount {
            if i % 4 == 3 {
                jobs.append(.cache(sequence: jobs.count, appends: [1 + i % 7, 17, 1, 3 + i % 40], seed: UInt64(i)))
            } else {
                let c = cases[i % cases.count]
                let layout = OperandLayout.allCases[i % OperandLayout.allCases.count]
                let storage = storages[(i / 3) % storages.count]
                // The naive backend computes in float64: keep it to the small cases.
                var backend = backends[i % backends.count]
                if backend.id == .naive && c.work > 200_000 { backend = backends[0] }
                if layout.fits(c, storage) { jobs.append(.layout(backend, c, layout, storage)) }
            }
            i += 1
        }
        return jobs
    }

    /// The shared cache every cache job appends to (each to its own sequence).
    static func makeCache() throws -> KVCache {
        try KVCache(keyValueHeads: 2, headDim: 32, pageSize: 16, pageCapacity: 4096, storage: .f16)
    }

    static func run(_ job: Job, cache: KVCache, sequences: [Int: KVCache.SequenceID]) throws -> Bits {
        switch job {
        case .layout(let backend, let c, let layout, let storage):
            let run = try LayoutRun(backend, c, layout: layout, storage: storage)
            #expect(run.report.passed, "\(backend.name) \(layout) \(storage) on \(c): \(run.report)")
            return Bits([run.output, run.logSumExp])
        case .cache(let index, let appends, let seed):
            guard let id = sequences[index] else { throw AttentionError.unknownSequence(index) }
            var results: [[Float]] = []
            for (step, count) in appends.enumerated() {
                let seed = seed &* 1000 &+ UInt64(step)
                let keys = try Tensor.random(shape: [count, 2, 32], seed: seed)
                let values = try Tensor.random(shape: [count, 2, 32], seed: seed &+ 500)
                try cache.append(sequence: id, keys: keys, values: values)
                let query = try Tensor.random(shape: [1, 4, 1, 32], seed: seed &+ 700)
                let result = try cache.attention(
                    query: query, sequences: [id], options: .init(causal: true), backend: BLASBackend())
                results += [result.output.storage, result.logSumExp.storage]
            }
            return Bits(results)
        }
    }

    @Test func concurrentCallsEqualSerialCalls() async throws {
        let jobs = Self.jobs()
        let cacheJobs = jobs.indices.filter { if case .cache = jobs[$0] { return true } else { return false } }
        let shared = try Self.makeCache()
        var sharedIDs: [Int: KVCache.SequenceID] = [:]
        for index in cacheJobs { sharedIDs[index] = shared.addSequence() }
        let ids = sharedIDs

        let concurrent = try await withThrowingTaskGroup(of: (Int, Bits).self) { group in
            for (index, job) in jobs.enumerated() {
                group.addTask { (index, try Self.run(job, cache: shared, sequences: ids)) }
            }
            var results = [Bits?](repeating: nil, count: jobs.count)
            for try await (index, bits) in group { results[index] = bits }
            return results
        }

        // The same jobs one at a time, each cache sequence in a cache of its own.
        for (index, job) in jobs.enumerated() {
            let alone = try Self.makeCache()
            var aloneIDs: [Int: KVCache.SequenceID] = [:]
            if case .cache = job { aloneIDs[index] = alone.addSequence() }
            let serial = try Self.run(job, cache: alone, sequences: aloneIDs)
            #expect(concurrent[index] == serial, "job \(index) (\(job)) differs when run concurrently")
        }
        // The mix is real: several backends, layouts and storage combinations, and cache sequences.
        var names = Set<String>()
        var layouts = Set<String>()
        var storages = Set<String>()
        for job in jobs {
            if case .layout(let backend, _, let layout, let storage) = job {
                names.insert(backend.name)
                layouts.insert(layout.description)
                storages.insert(storage.description)
            }
        }
        #expect(jobs.count == Self.jobCount)
        #expect(cacheJobs.count >= 8)
        #expect(names.count >= 2 + OpenCLRuntime.availableDevices.count, "backends: \(names)")
        #expect(layouts.count >= 3 && storages.count >= 3, "layouts \(layouts), storage \(storages)")
    }
}
