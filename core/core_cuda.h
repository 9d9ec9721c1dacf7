// core/core_cuda.h: error checks for .cu files. Every CUDA runtime call and
// every kernel launch is checked; a failure becomes a q_err naming the call,
// the file and the line, and the enclosing function returns -1.
#ifndef QLORA_CORE_CUDA_H
#define QLORA_CORE_CUDA_H

#include <cuda_runtime.h>

#include "core.h"

#define Q_CUDA_CHECK(call, err)                                                          \
    do {                                                                                 \
        cudaError_t e_ = (call);                                                         \
        if (e_ != cudaSuccess)                                                           \
            return q_err_set((err), "%s failed: %s (%s:%d)", #call, cudaGetErrorString(e_), \
                             __FILE__, __LINE__);                                        \
    } while (0)

// After a launch: catches bad configurations now, faults at the next sync.
#define Q_CUDA_CHECK_LAUNCH(name, err) Q_CUDA_CHECK(cudaGetLastError(), err)

#endif
