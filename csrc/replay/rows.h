// Row copies between a buffer's storage tensors and a batch, all fields in one call:
// gather (batch[j] = storage[idx[j]]) and scatter (storage[idx[j]] = batch[j]; idx -1 skips the
// row, the last of repeated indices wins). Byte copies, so any dtype. The table lists, per field,
// the storage pointer, the batch pointer and the bytes per row (int64 [fields, 3]).
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"

namespace retain::replay {

// Returns the number of out-of-range indices (nothing is copied when there is one): [0, capacity)
// for gathers, [-1, capacity) for scatters.
template <CpuCapability C>
int64_t rows_copy_cpu(const int64_t* table, int64_t fields, const int64_t* idx, int64_t k, int64_t capacity,
                      bool scatter, int nthreads);

#ifdef RETAIN_WITH_CUDA
// Indices must be in range (checked on the device by the caller); for scatters they must be distinct
// apart from -1 (the caller replaces all but the last of repeated indices with -1).
void rows_copy_cuda(const int64_t* table, int64_t fields, const int64_t* idx, int64_t k, bool scatter,
                    std::uintptr_t stream);
#endif

}  // namespace retain::replay
