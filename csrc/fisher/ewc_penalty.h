// The EWC penalty lam/2 [sum F (theta - theta*)^2 + c (mu^T (theta - theta*))^2] over lists of
// parameters: its two sums (forward) and its gradient lam [F delta + c (mu^T delta) mu], written
// or added into .grad (backward, ewc_penalty_grad_). Derivation: csrc/fisher/README.md.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"
#include "fisher/tensor_table.h"

namespace retain::fisher {

// Table slots of both directions: 0 params (T), 1 anchors (T), 2 diag (S, optional), 3 mu (S,
// optional); the backward also 4 grad (T).
enum EwcSlot : int { kParams = 0, kAnchors = 1, kDiag = 2, kMu = 3, kGrad = 4 };

// Tensor i of the lists (an absent diag or mu: null).
template <typename T, typename S>
struct EwcTensors {
  const T* p;
  const T* q;
  const S* f;
  const S* mu;
  RETAIN_HOST_DEVICE EwcTensors(const TensorTable& tab, int64_t i)
      : p(tab.ptr<const T>(kParams, i)),
        q(tab.ptr<const T>(kAnchors, i)),
        f(tab.has(kDiag) ? tab.ptr<const S>(kDiag, i) : nullptr),
        mu(tab.has(kMu) ? tab.ptr<const S>(kMu, i) : nullptr) {}
};

// One element of the gradient: a F delta + b mu (a = lam * upstream, b = a * c * mu^T delta); an
// absent F or mu contributes nothing.
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A ewc_grad_element(A delta, A f, A m, A a, A b, bool has_f, bool has_mu) {
  A v = has_f ? a * f * delta : A(0);
  if (has_mu) v += b * m;
  return v;
}

// sums[0] = sum F delta^2 (0 without diag), sums[1] = sum mu delta (0 without mu); partials
// [chunks, 2].
template <CpuCapability C, typename T, typename S>
void ewc_penalty_fwd_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double* partials, double* sums, int nthreads);

// grad = (accumulate ? grad : 0) + a F delta + b mu, (a, b) = coef[0], coef[1] (device memory for CUDA:
// they come from the forward's sums without a host round trip); when partials is not null also sums[0] =
// sum F delta^2 (ewc_penalty_grad_ without mu: penalty and gradient in one pass).
template <CpuCapability C, typename T, typename S>
void ewc_penalty_bwd_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, const double* coef,
                         bool accumulate, double* partials, double* sums, int nthreads);

#ifdef RETAIN_WITH_CUDA
template <typename T, typename S>
void ewc_penalty_fwd_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double* partials,
                          double* sums, std::uintptr_t stream);
template <typename T, typename S>
void ewc_penalty_bwd_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, const double* coef,
                          bool accumulate, double* partials, double* sums, std::uintptr_t stream);
#endif

}  // namespace retain::fisher
