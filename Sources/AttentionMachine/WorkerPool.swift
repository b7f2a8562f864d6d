import Foundation

/// A process-wide pool of helper threads for fork-join loops.
///
/// `DispatchQueue.concurrentPerform` on Linux often starts its second iteration only after the first
/// has finished (measured here: median 1.9 ms until a second worker starts, on 2 ms iterations), which
/// serialises short attention calls. This pool keeps its threads parked on a condition variable and
/// wakes them per job; the calling thread takes part as worker 0. Helper threads are created on first
/// use, as many as the largest job asked for, and live for the rest of the process.
package final class WorkerPool: @unchecked Sendable {
    package static let shared = WorkerPool()

    private let condition = NSCondition()
    /// Serialises jobs: one fork-join at a time.
    private let submission = NSLock()
    // Guarded by `condition`.
    private var job: (@Sendable (Int) -> Void)?
    private var jobWorkers = 0
    private var generation = 0
    private var remaining = 0
    private var helpers = 0

    /// Runs `body(0)` ... `body(workers - 1)` concurrently and returns when all have returned.
    package func run(workers: Int, _ body: @escaping @Sendable (Int) -> Void) {
        guard workers > 1 else {
            body(0)
            return
        }
        submission.lock()
        defer { submission.unlock() }
        condition.lock()
        while helpers < workers - 1 {
            helpers += 1
            let index = helpers
            let thread = Thread { [unowned self] in self.helperLoop(index: index) }
            thread.name = "AttentionKit worker \(index)"
            thread.start()
        }
        job = body
        jobWorkers = workers
        remaining = workers - 1
        generation += 1
        condition.broadcast()
        condition.unlock()

        body(0)

        condition.lock()
        while remaining > 0 { condition.wait() }
        job = nil
        condition.unlock()
    }

    private func helperLoop(index: Int) {
        var seen = 0
        condition.lock()
        while true {
            while generation == seen { condition.wait() }
            seen = generation
            guard index < jobWorkers, let body = job else { continue }
            condition.unlock()
            body(index)
            condition.lock()
            remaining -= 1
            if remaining == 0 { condition.broadcast() }
        }
    }
}
