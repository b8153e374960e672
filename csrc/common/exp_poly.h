// The core of the fast float exp, written once for its scalar form (margin::exp_vec<float>,
// margin/kl_imitation.h) and its vector form (vexp, common/vec.h) so that both agree to the bit.
// With x = n ln2 + r: n = round(x log2 e) by adding and removing 1.5 * 2^23 (exact for
// |x log2 e| < 2^22, and a vector needs no floor for it), r = x - n ln2 with ln2 in two parts,
// e^r by a degree-6 polynomial (Cephes coefficients). The caller clamps x to [-87, 88] first and
// scales by 2^n through the exponent bits.
#pragma once

#include "common/host_device.h"

namespace retain {

// e^r, and n; V is float or a vector of floats (GCC/Clang vector extensions).
template <typename V>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE V exp_poly(V x, V& n) {
  const V magic = V{} + 12582912.0f;
  n = (x * 1.44269504088896341f + magic) - magic;
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

}  // namespace retain
