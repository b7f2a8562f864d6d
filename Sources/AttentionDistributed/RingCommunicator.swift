import AttentionCore
import Foundation

/// What ring attention needs from the ranks it runs on: point-to-point exchange with neighbours and an
/// all-gather, on raw bytes. `MPICommunicator` (trait "MPI") is one; `LocalRing` runs ranks as threads
/// of one process.
///
/// Every rank calls the same sequence of operations (collective order); a call that cannot complete
/// (a peer failed, the transport broke) throws `AttentionError.backendFailure(backend: "ring", ...)`
/// rather than hanging where the transport can tell.
public protocol RingCommunicator: Sendable {
    /// This rank, in 0..<size.
    var rank: Int { get }
    /// How many ranks.
    var size: Int { get }
    /// Sends `send` to rank `destination` and receives exactly `receive.count` bytes from `source`,
    /// returning when both are done. May be called from a thread other than the one that calls
    /// the other operations, but never concurrently with them.
    func sendReceive(
        _ send: UnsafeRawBufferPointer, to destination: Int, _ receive: UnsafeMutableRawBufferPointer, from source: Int
    ) throws(AttentionError)
    /// Every rank's `local` (the same byte count on each) into `all`, in rank order.
    func allGather(_ local: UnsafeRawBufferPointer, into all: UnsafeMutableRawBufferPointer) throws(AttentionError)
    /// Sends `bytes` to `destination` (blocking until the buffer may be reused).
    func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws(AttentionError)
    /// Receives exactly `bytes.count` bytes from `source`.
    func receive(_ bytes: UnsafeMutableRawBufferPointer, from source: Int) throws(AttentionError)
    /// The largest of every rank's `value` (also a barrier: a rank that failed before it makes it throw).
    func maximum(_ value: Double) throws(AttentionError) -> Double
}

/// Ranks as threads of one process: `LocalRing(size: 3).communicators` are three connected ranks.
/// For tests, and for `attnbench ring --ranks N` where no MPI is wanted. Messages are copied through
/// per-pair mailboxes; `fail(_:)` (or any rank's error through `run`) makes every waiting rank throw.
public final class LocalRing: @unchecked Sendable {
    public let size: Int
    private let condition = NSCondition()
    /// Guarded by `condition`: queued messages by (source, destination); the first failure.
    private var mailboxes: [[[UInt8]]]
    private var failure: String?

    public init(size: Int) {
        self.size = max(size, 1)
        mailboxes = Array(repeating: [], count: self.size * self.size)
    }

    /// One communicator per rank.
    public var communicators: [LocalCommunicator] { (0..<size).map { LocalCommunicator(ring: self, rank: $0) } }

    /// Makes every rank's pending and future operations throw `reason`.
    public func fail(_ reason: String) {
        condition.lock()
        if failure == nil { failure = reason }
        condition.broadcast()
        condition.unlock()
    }

    /// Runs `body(communicator)` for every rank on its own thread; the first error (by rank) fails the
    /// ring, so the other ranks stop instead of waiting for it, and is rethrown.
    public func run(_ body: @escaping @Sendable (LocalCommunicator) throws(AttentionError) -> Void)
        throws(AttentionError)
    {
        let firstError = FirstError()
        let group = DispatchGroup()
        for communicator in communicators {
            group.enter()
            let thread = Thread {
                do throws(AttentionError) {
                    try body(communicator)
                } catch {
                    firstError.record(error)
                    self.fail("rank \(communicator.rank) failed: \(error)")
                }
                group.leave()
            }
            thread.name = "AttentionKit ring rank \(communicator.rank)"
            thread.start()
        }
        group.wait()
        if let error = firstError.value { throw error }
    }

    func post(_ bytes: UnsafeRawBufferPointer, from source: Int, to destination: Int) throws(AttentionError) {
        condition.lock()
        defer { condition.unlock() }
        if let failure { throw .backendFailure(backend: "ring", message: failure) }
        mailboxes[source * size + destination].append(Array(bytes))
        condition.broadcast()
    }

    func take(into bytes: UnsafeMutableRawBufferPointer, from source: Int, to destination: Int) throws(AttentionError) {
        condition.lock()
        defer { condition.unlock() }
        let box = source * size + destination
        while mailboxes[box].isEmpty {
            if let failure { throw .backendFailure(backend: "ring", message: failure) }
            condition.wait()
        }
        let message = mailboxes[box].removeFirst()
        guard message.count == bytes.count else {
            let reason = "rank \(destination) expected \(bytes.count) bytes from rank \(source), got \(message.count)"
            if failure == nil { failure = reason }
            condition.broadcast()
            throw .backendFailure(backend: "ring", message: reason)
        }
        message.withUnsafeBytes { bytes.copyMemory(from: $0) }
    }
}

/// One rank of a `LocalRing`.
public struct LocalCommunicator: RingCommunicator {
    let ring: LocalRing
    public let rank: Int
    public var size: Int { ring.size }

    public func sendReceive(
        _ send: UnsafeRawBufferPointer, to destination: Int, _ receive: UnsafeMutableRawBufferPointer, from source: Int
    ) throws(AttentionError) {
        try ring.post(send, from: rank, to: destination)
        try ring.take(into: receive, from: source, to: rank)
    }

    public func allGather(_ local: UnsafeRawBufferPointer, into all: UnsafeMutableRawBufferPointer)
        throws(AttentionError)
    {
        for other in 0..<size where other != rank { try ring.post(local, from: rank, to: other) }
        let n = local.count
        for other in 0..<size {
            let slot = UnsafeMutableRawBufferPointer(rebasing: all[(other * n)..<((other + 1) * n)])
            if other == rank {
                slot.copyMemory(from: local)
            } else {
                try ring.take(into: slot, from: other, to: rank)
            }
        }
    }

    public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws(AttentionError) {
        try ring.post(bytes, from: rank, to: destination)
    }

    public func receive(_ bytes: UnsafeMutableRawBufferPointer, from source: Int) throws(AttentionError) {
        try ring.take(into: bytes, from: source, to: rank)
    }

    public func maximum(_ value: Double) throws(AttentionError) -> Double {
        var all = [Double](repeating: 0, count: size)
        let mine = [value]
        try mine.withUnsafeBufferPointer { (local) throws(AttentionError) in
            try all.withUnsafeMutableBufferPointer { (target) throws(AttentionError) in
                try allGather(UnsafeRawBufferPointer(local), into: UnsafeMutableRawBufferPointer(target))
            }
        }
        return all.max() ?? value
    }
}

/// The first error any rank recorded: a rank records its own error before it fails the ring, so
/// errors the failure causes in other ranks come later and are dropped.
final class FirstError: @unchecked Sendable {
    private let lock = NSLock()
    private var error: AttentionError?

    func record(_ error: AttentionError) { lock.withLock { if self.error == nil { self.error = error } } }

    var value: AttentionError? { lock.withLock { error } }
}
