// Moments of gradients summed into state lists: fisher_accumulate_ (F <- decay F + scale sum_s g^2),
// mas_accumulate_ (sum_s |g|) and rank1_accumulate_ (sum_s g and sum_s g^2 together). Derivation:
// csrc/fisher/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"
#include "fisher/tensor_table.h"

namespace retain::fisher {

// The second moment's term of one gradient element: g^2 (P = 2, Fisher) or |g| (P = 1, MAS); a NaN
// stays NaN.
template <int P, typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A moment_term(A g) {
  if constexpr (P == 2) {
    return g * g;
  } else {
    return g < A(0) ? -g : g;
  }
}

// Table slots (fisher/tensor_table.h): 0 the gradients (T; `samples` rows of numel each, one per
// sample), 1 `first` (S, optional), 2 `second` (S, optional). Per element:
//   first  <- decay * first  + scale * sum_s g_s
//   second <- decay * second + scale * sum_s moment_term<power>(g_s)
template <CpuCapability C, typename T, typename S>
void grad_moments_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double decay, double scale,
                      int power, int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T, typename S>
void grad_moments_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double decay,
                       double scale, int power, std::uintptr_t stream);
#endif

}  // namespace retain::fisher
