// feature_imitation (distance between current and reference hidden states): the per-element math
// shared by the CPU loops (feature_imitation_cpu.cpp) and the CUDA kernels
// (feature_imitation_cuda.cu), and their launchers. Derivation: csrc/margin/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"

namespace retain::margin {

// Distance term of one element of x = h - h_ref: |x| (P = 1) or x^2 (P = 2).
template <int P, typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A feature_element(A x) {
  static_assert(P == 1 || P == 2, "feature imitation: p is 1 or 2");
  if constexpr (P == 1) {
    return x < A(0) ? -x : x;
  } else {
    return x * x;
  }
}

// d element / d h: sign(x) with sign(0) = 0 (and 0 for NaN, as torch.abs's backward) for P = 1;
// 2x for P = 2. d element / d h_ref is its negation.
template <int P, typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A feature_slope(A x) {
  if constexpr (P == 1) {
    return (x > A(0) ? A(1) : A(0)) - (x < A(0) ? A(1) : A(0));
  } else {
    return A(2) * x;
  }
}

// Launchers, one row of D features per token: loss[n] = sum_d |h - h_ref| (p = 1) or
// sum_d (h - h_ref)^2 (p = 2), 0 where mask is 0. CPU launchers: one build per CPU capability C
// (call through retain::cpu_dispatch).
template <CpuCapability C, typename T>
void feature_imitation_fwd_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                               double* loss, int nthreads);

// grad_h = g[n] * sign(h - h_ref) (p = 1) or g[n] * 2 (h - h_ref) (p = 2); grad_h_ref = -grad_h; rows whose
// mask is 0 get 0. Either output may be null.
template <CpuCapability C, typename T>
void feature_imitation_bwd_cpu(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                               int64_t D, int p, T* grad_h, T* grad_h_ref, int nthreads);

// The forward with the gradient of a reduced loss fused in: the distances, and
// grad_h = grad_scale * slope (0 on masked rows), grad_h_ref = -grad_h (either may be null).
template <CpuCapability C, typename T>
void feature_imitation_fwd_grad_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                    double grad_scale, double* loss, T* grad_h, T* grad_h_ref, int nthreads);

#ifdef RETAIN_WITH_CUDA
// CUDA launchers: the CPU launchers' outputs, every pointer in device memory, enqueued on `stream`.
template <typename T>
void feature_imitation_fwd_cuda(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                double* loss, std::uintptr_t stream);

template <typename T>
void feature_imitation_bwd_cuda(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                                int64_t D, int p, T* grad_h, T* grad_h_ref, std::uintptr_t stream);
#endif

}  // namespace retain::margin
