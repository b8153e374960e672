// The core of the fast float exp, written once for its scalar form (margin::exp_vec<float>,
// margin/kl_imitation.h) and its vector form (vexp, common/vec.h) so that both agree to the bit.
// With x = n ln2 + r: n = round(x log2 e) by adding and removing 1.5 * 2^23 (exact for
// |x log2 e| < 2^22, and a vector needs no floor for it), r = x - n ln2 with ln2 in two parts,
// e^r by a degree-6 polynomial (Cephes coefficients). The caller clamps x to [-87, 88] first and
// scales by 2^n through the exponent bits, taken from `biased` = n + 127 + 1.5 * 2^23: its low
// mantissa bits hold n + 127 (n = round(x log2 e) as before, but for exact ties, where either
// neighbour is a valid reduction: |r| <= ln2/2 both ways), so
// bits(biased) << 23, modulo 2^32, is 2^n's bit pattern (the constant's own bits shift out) with
// no float-to-int conversion and no separate bias.
#pragma once

#include "common/host_device.h"

namespace retain {

// e^r, and n + 127 + 1.5 * 2^23; V is float or a vector of floats (GCC/Clang vector extensions).
template <typename V>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE V exp_poly(V x, V& biased) {
  const V magic = V{} + (12582912.0f + 127.0f);
  biased = x * 1.44269504088896341f + magic;
  const V n = biased - magic;
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
