#if MPI
    import AttentionCore
    import CMPI
    import Foundation

    /// `MPI_COMM_WORLD` as a `RingCommunicator` (package trait "MPI"). MPI is initialised with
    /// `MPI_THREAD_SERIALIZED`: the ring's exchange thread and the calling thread never call MPI at once.
    ///
    /// Failure: MPI's default error handler aborts the whole job on a transport error, and a rank that
    /// dies makes `mpirun` stop the others; `abort(_:)` ends every rank with a reason (what `attnbench
    /// ring` does on any error), so nothing waits forever for a rank that is gone.
    public final class MPICommunicator: RingCommunicator, @unchecked Sendable {
        public let rank: Int
        public let size: Int

        /// Initialises MPI (once per process) and returns the world communicator.
        public static func world() throws(AttentionError) -> MPICommunicator {
            var initialized: Int32 = 0
            MPI_Initialized(&initialized)
            if initialized == 0 {
                var provided: Int32 = 0
                let required = attentionkit_mpi_thread_serialized()
                guard MPI_Init_thread(nil, nil, required, &provided) == attentionkit_mpi_success() else {
                    throw .backendFailure(backend: "mpi", message: "MPI_Init_thread failed")
                }
                guard provided >= required else {
                    throw .backendFailure(
                        backend: "mpi", message: "this MPI provides thread level \(provided), the ring needs SERIALIZED"
                    )
                }
            }
            var rank: Int32 = 0
            var size: Int32 = 0
            MPI_Comm_rank(attentionkit_mpi_comm_world(), &rank)
            MPI_Comm_size(attentionkit_mpi_comm_world(), &size)
            return MPICommunicator(rank: Int(rank), size: Int(size))
        }

        private init(rank: Int, size: Int) {
            self.rank = rank
            self.size = size
        }

        /// Ends MPI for this process (after the last collective).
        public func finalize() { MPI_Finalize() }

        /// Ends every rank of the job with exit code `code`; the caller prints the reason first.
        public func abort(code: Int32 = 1) -> Never {
            MPI_Abort(attentionkit_mpi_comm_world(), code)
            exit(code)
        }

        /// MPI counts are Int32: larger messages go in pieces of at most 1 GiB.
        private static let piece = 1 << 30

        private func check(_ code: Int32, _ what: String) throws(AttentionError) {
            guard code == attentionkit_mpi_success() else {
                throw .backendFailure(backend: "mpi", message: "\(what) failed on rank \(rank) (MPI error \(code))")
            }
        }

        /// Non-blocking receive and send (`MPI_Irecv`, `MPI_Isend`) completed by `MPI_Waitall`. The ring calls
        /// this on its exchange thread while the calling thread computes: MPI implementations progress
        /// non-blocking transfers inside MPI calls, so the thread waiting in `MPI_Waitall` keeps them moving
        /// while the compute makes none.
        public func sendReceive(
            _ send: UnsafeRawBufferPointer, to destination: Int, _ receive: UnsafeMutableRawBufferPointer,
            from source: Int
        ) throws(AttentionError) {
            var offset = 0
            // Both sides cut their messages the same way only if the sizes agree piece by piece, so the
            // pieces are counted over the larger of the two.
            let total = max(send.count, receive.count)
            repeat {
                let sendCount = max(0, min(Self.piece, send.count - offset))
                let receiveCount = max(0, min(Self.piece, receive.count - offset))
                try check(
                    attentionkit_mpi_exchange(
                        send.baseAddress.map { $0 + offset }, Int32(sendCount), Int32(destination),
                        receive.baseAddress.map { $0 + offset }, Int32(receiveCount), Int32(source), 7),
                    "MPI_Irecv/MPI_Isend/MPI_Waitall")
                offset += Self.piece
            } while offset < total
        }

        public func allGather(_ local: UnsafeRawBufferPointer, into all: UnsafeMutableRawBufferPointer)
            throws(AttentionError)
        {
            guard local.count <= Self.piece else {
                // Rank by rank, in pieces.
                for root in 0..<size {
                    let slot = UnsafeMutableRawBufferPointer(
                        rebasing: all[(root * local.count)..<((root + 1) * local.count)])
                    if root == rank { slot.copyMemory(from: local) }
                    var offset = 0
                    while offset < local.count {
                        let count = min(Self.piece, local.count - offset)
                        try check(
                            MPI_Bcast(
                                slot.baseAddress! + offset, Int32(count), attentionkit_mpi_byte(), Int32(root),
                                attentionkit_mpi_comm_world()), "MPI_Bcast")
                        offset += count
                    }
                }
                return
            }
            try check(
                MPI_Allgather(
                    local.baseAddress, Int32(local.count), attentionkit_mpi_byte(), all.baseAddress, Int32(local.count),
                    attentionkit_mpi_byte(), attentionkit_mpi_comm_world()), "MPI_Allgather")
        }

        public func send(_ bytes: UnsafeRawBufferPointer, to destination: Int) throws(AttentionError) {
            var offset = 0
            repeat {
                let count = max(0, min(Self.piece, bytes.count - offset))
                try check(
                    MPI_Send(
                        bytes.baseAddress.map { $0 + offset }, Int32(count), attentionkit_mpi_byte(),
                        Int32(destination),
                        11, attentionkit_mpi_comm_world()), "MPI_Send")
                offset += Self.piece
            } while offset < bytes.count
        }

        public func receive(_ bytes: UnsafeMutableRawBufferPointer, from source: Int) throws(AttentionError) {
            var offset = 0
            repeat {
                let count = max(0, min(Self.piece, bytes.count - offset))
                try check(
                    MPI_Recv(
                        bytes.baseAddress.map { $0 + offset }, Int32(count), attentionkit_mpi_byte(), Int32(source), 11,
                        attentionkit_mpi_comm_world(), attentionkit_mpi_status_ignore()), "MPI_Recv")
                offset += Self.piece
            } while offset < bytes.count
        }

        public func maximum(_ value: Double) throws(AttentionError) -> Double {
            var local = value
            var result = 0.0
            try check(
                MPI_Allreduce(
                    &local, &result, 1, attentionkit_mpi_double(), attentionkit_mpi_max(), attentionkit_mpi_comm_world()
                ),
                "MPI_Allreduce")
            return result
        }
    }
#endif
