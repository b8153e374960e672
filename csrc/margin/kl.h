// Per-row pieces of the fused KL imitation loss, KL(softmax(z_ref/T) || softmax(z/T)), shared by
// the CPU loops and (later) the CUDA kernels. Derivation: csrc/margin/README.md.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace retain::margin {

// log-sum-exp of x/T from its running max m and sum s of exp(x/T - m).
template <typename A>
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE A lse_of(A m, A s) {
  return m + std::log(s);
}

}  // namespace retain::margin
