// kl_imitation, the fused KL(softmax(z_ref/T) || softmax(z/T)) of every token's logits: per-row
// pieces shared by the CPU loops (kl_imitation_cpu.cpp) and the CUDA kernels
// (kl_imitation_cuda.cu), and their launchers. Derivation: csrc/margin/README.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_capability.h"
#include "common/exp_poly.h"
#include "common/host_device.h"

namespace retain::margin {

// exp that vectorises: libm's expf is an opaque call inside the row loops. float: x = n ln2 + r,
// |r| <= ln2/2, e^r by a degree-6 polynomial (common/exp_poly.h), 2^n through the exponent bits;
// within 2 ulp of expf for x in [-87, 88], inputs below are clamped (exp(-87) ~ 1e-38 where the
// true value underflows: negligible against the row's largest term, which is 1).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A exp_vec(A x) {
  return std::exp(x);
}
template <>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE float exp_vec<float>(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  float biased;
  const float p = exp_poly(x, biased);  // as retain::vexp (common/vec.h)
  uint32_t e;
  memcpy(&e, &biased, sizeof(e));
  e <<= 23;  // 2^n (common/exp_poly.h)
  float scale;
  memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// log-sum-exp of x/T from its running max m and sum s of exp(x/T - m).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A lse_of(A m, A s) {
  return m + std::log(s);
}

// Launchers, one row of V logits per token: loss[n] = KL(softmax(z_ref/T) || softmax(z/T)),
// lse[n], lse_ref[n] the log-sum-exps of z/T and z_ref/T (saved for the backward). Rows whose
// mask is 0 get loss 0. CPU launchers: one build per CPU capability C (call through
// retain::cpu_dispatch).
template <CpuCapability C, typename T>
void kl_imitation_fwd_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                          double* loss, double* lse, double* lse_ref, int nthreads);

// grad_z = g[n] / T * (p - p_ref); grad_z_ref = g[n] / T * p_ref * (log p_ref - log p - loss[n])
// (either may be null); g is the incoming gradient of each row's loss (0 where masked).
template <CpuCapability C, typename T>
void kl_imitation_bwd_cpu(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                          const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                          int nthreads);

// The forward with the gradient of a reduced loss fused in (for loss.backward() on 'mean'/'sum'):
// kl_imitation_fwd_cpu's outputs, and the backward's grad_z / grad_z_ref for g[n] = grad_scale
// where mask is 1 and 0 elsewhere (either may be null). The exps of the sums are kept in a
// per-thread row buffer, so the gradient costs no exp of its own.
template <CpuCapability C, typename T>
void kl_imitation_fwd_grad_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                               double grad_scale, double* loss, double* lse, double* lse_ref, T* grad_z,
                               T* grad_z_ref, int nthreads);

#ifdef RETAIN_WITH_CUDA
// CUDA launchers: the CPU launchers' outputs, every pointer in device memory, enqueued on `stream`.
template <typename T>
void kl_imitation_fwd_cuda(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                           double* loss, double* lse, double* lse_ref, std::uintptr_t stream);

template <typename T>
void kl_imitation_bwd_cuda(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                           const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                           std::uintptr_t stream);
#endif

}  // namespace retain::margin
