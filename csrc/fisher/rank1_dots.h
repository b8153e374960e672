// Projections of per-sample gradients on the mean gradient, mu^T g_s over every tensor of a list:
// the numerator of the rank-1 Fisher's coefficient c* = E[(mu^T g)^2] / |mu|^4
// (rank1_coefficient). Derivation: csrc/fisher/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "fisher/tensor_table.h"

namespace retain::fisher {

// Table slots: 0 mu (S, numel per tensor), 1 the gradients (T, `samples` rows of numel).
// dots[s] = sum over tensors and elements of mu * g_s, from per-chunk partials [chunks, samples]
// summed in chunk order.
template <CpuCapability C, typename T, typename S>
void rank1_dots_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double* partials, double* dots,
                    int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T, typename S>
void rank1_dots_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double* partials,
                     double* dots, std::uintptr_t stream);
#endif

}  // namespace retain::fisher
