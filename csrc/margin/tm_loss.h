// Shared per-element math of the margin family (GeRe's threshold-based margin loss), used by the
// CPU loops and (later) the CUDA kernels. Derivations: csrc/margin/README.md.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace retain::margin {

// Label of feature d of one row: int8 labels in {-1, 0, 1}, or packed 2-bit codes (four a byte,
// feature d at bits 2*(d % 4) of byte d / 4; code 1 = +1, code 2 = -1, 0 = 0).
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int label_at(const int8_t* row, int64_t d) { return row[d]; }
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int label_at(const uint8_t* row, int64_t d) {
  const int code = (row[d >> 2] >> ((d & 3) * 2)) & 3;
  return (code == 1) - (code == 2);
}

// Loss of one element: label +1: max(0, pos - h); -1: max(0, h - neg); 0: max(0, h - pos) + max(0, neg - h).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A tm_element(A h, int label, A pos, A neg) {
  const A below_pos = pos > h ? pos - h : A(0);
  const A above_neg = h > neg ? h - neg : A(0);
  const A above_pos = h > pos ? h - pos : A(0);
  const A below_neg = neg > h ? neg - h : A(0);
  return label > 0 ? below_pos : (label < 0 ? above_neg : above_pos + below_neg);
}

// d loss / d h of one element (0 on the thresholds themselves, where the loss is 0).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A tm_slope(A h, int label, A pos, A neg) {
  const A s_pos = h < pos ? A(-1) : A(0);
  const A s_neg = h > neg ? A(1) : A(0);
  const A s_zero = (h > pos ? A(1) : A(0)) - (h < neg ? A(1) : A(0));
  return label > 0 ? s_pos : (label < 0 ? s_neg : s_zero);
}

}  // namespace retain::margin
