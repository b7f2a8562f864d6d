// The system's MPI (Debian: libopenmpi-dev or libmpich-dev, found through pkg-config as mpi-c), for
// AttentionDistributed. Only built with the package trait "MPI".
//
// MPI's handles are macros (Open MPI: addresses of library globals; MPICH: integer constants) that
// Swift cannot import; these functions return them.
#pragma once
#include <mpi.h>

static inline MPI_Comm attentionkit_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype attentionkit_mpi_byte(void) { return MPI_BYTE; }
static inline MPI_Datatype attentionkit_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype attentionkit_mpi_int(void) { return MPI_INT; }
static inline MPI_Op attentionkit_mpi_max(void) { return MPI_MAX; }
static inline MPI_Status *attentionkit_mpi_status_ignore(void) { return MPI_STATUS_IGNORE; }
static inline int attentionkit_mpi_thread_serialized(void) { return MPI_THREAD_SERIALIZED; }
static inline int attentionkit_mpi_success(void) { return MPI_SUCCESS; }

// One ring step's exchange: the receive and the send posted as non-blocking requests (MPI_Irecv, then
// MPI_Isend), completed together by MPI_Waitall. MPI_Request is a pointer in Open MPI and an int in MPICH,
// so the requests stay on this side.
static inline int attentionkit_mpi_exchange(const void *send, int sendCount, int destination, void *receive,
                                            int receiveCount, int source, int tag) {
    MPI_Request requests[2];
    int status = MPI_Irecv(receive, receiveCount, MPI_BYTE, source, tag, MPI_COMM_WORLD, &requests[0]);
    if (status != MPI_SUCCESS) return status;
    status = MPI_Isend(send, sendCount, MPI_BYTE, destination, tag, MPI_COMM_WORLD, &requests[1]);
    if (status != MPI_SUCCESS) {
        MPI_Cancel(&requests[0]);
        MPI_Request_free(&requests[0]);
        return status;
    }
    return MPI_Waitall(2, requests, MPI_STATUSES_IGNORE);
}
