// Synaptic Intelligence: the path integral omega <- omega - g (theta_after - theta_before) over one
// optimiser step (si_accumulate_) and its consolidation at the end of a task,
// Omega <- Omega + omega / ((theta - theta*)^2 + xi), omega <- 0 (si_consolidate_).
// Derivation: csrc/fisher/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"
#include "fisher/tensor_table.h"

namespace retain::fisher {

template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A si_step(A omega, A g, A before, A after) {
  return omega - g * (after - before);
}

template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A si_importance(A big_omega, A omega, A delta, A xi) {
  return big_omega + omega / (delta * delta + xi);
}

// Slots: 0 omega (S), 1 grads (T), 2 params before the step (T), 3 params after it (T).
template <CpuCapability C, typename T, typename S>
void si_accumulate_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int nthreads);

// Slots: 0 Omega (S), 1 omega (S; zeroed when reset), 2 params (T), 3 anchors (T).
template <CpuCapability C, typename T, typename S>
void si_consolidate_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double xi, bool reset, int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T, typename S>
void si_accumulate_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, std::uintptr_t stream);
template <typename T, typename S>
void si_consolidate_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double xi, bool reset,
                         std::uintptr_t stream);
#endif

}  // namespace retain::fisher
