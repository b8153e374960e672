// linear_recurrence, the first-order linear recurrence h_t = a_t * h_{t-1} + x_t: the per-step
// math shared by the CPU loops (linear_recurrence_cpu.cpp) and the CUDA kernels
// (linear_recurrence_cuda.cu), and their launchers. Derivation of the backward pass:
// csrc/scan/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "common/host_device.h"

namespace retain::scan {

// One step of the recurrence, in the accumulation type. The backward pass runs the same step
// in reverse: lambda_t = a_{t+1} * lambda_{t+1} + dL/dh_t.
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A linear_step(A a, A h, A x) {
  return a * h + x;
}

// Row offset (in elements) of the p-th step in scan order for sequence b of a contiguous
// [B, T, D] tensor: reverse scans walk t = T-1 .. 0.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int64_t step_offset(int64_t b, int64_t p, int64_t T, int64_t D,
                                                           bool reverse) {
  const int64_t t = reverse ? T - 1 - p : p;
  return (b * T + t) * D;
}

// Launchers. Contiguous [B, T, D] tensors, raw pointers, int64 sizes. initial / grad_a /
// grad_initial may be null (no initial state, gradient not wanted).
// CPU launchers: one build per CPU capability C (call through retain::cpu_dispatch).
template <CpuCapability C, typename T>
void linear_recurrence_fwd_cpu(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn,
                               int64_t D, bool reverse, int nthreads);

template <CpuCapability C, typename T>
void linear_recurrence_bwd_cpu(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x,
                               T* grad_a, T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse,
                               int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T>
void linear_recurrence_fwd_cuda(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn,
                                int64_t D, bool reverse, std::uintptr_t stream);

template <typename T>
void linear_recurrence_bwd_cuda(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x,
                                T* grad_a, T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse,
                                std::uintptr_t stream);
#endif

}  // namespace retain::scan
