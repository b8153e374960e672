// Per-element math of feature imitation (distance between current and reference hidden states),
// shared by the CPU loops (feature_cpu.cpp) and the CUDA kernels (margin_cuda.cu).
// Derivation: csrc/margin/README.md.
#pragma once

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

}  // namespace retain::margin
