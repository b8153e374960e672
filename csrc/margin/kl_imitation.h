// Per-row pieces of the fused KL imitation loss, KL(softmax(z_ref/T) || softmax(z/T)), shared by
// the CPU loops and (later) the CUDA kernels. Derivation: csrc/margin/README.md.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/host_device.h"

namespace retain::margin {

// exp that vectorises: libm's expf is an opaque call inside the row loops. float: x = n ln2 + r,
// |r| <= ln2/2, e^r by a degree-6 polynomial (Cephes coefficients), 2^n through the exponent
// bits; within 2 ulp of expf for x in [-87, 88], inputs below are clamped (exp(-87) ~ 1e-38 where
// the true value underflows: negligible against the row's largest term, which is 1).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A exp_vec(A x) {
  return std::exp(x);
}
template <>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE float exp_vec<float>(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x log2 e) by adding and removing 1.5 * 2^23 (as retain::vexp, csrc/common/vec.h)
  const float magic = 12582912.0f;
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// log-sum-exp of x/T from its running max m and sum s of exp(x/T - m).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A lse_of(A m, A s) {
  return m + std::log(s);
}

}  // namespace retain::margin
