// Shared per-step math of the first-order linear recurrence h_t = a_t * h_{t-1} + x_t, used by
// the CPU loops (linear_recurrence_cpu.cpp) and the CUDA kernels (linear_recurrence_cuda.cu).
// Derivation of the backward pass: csrc/scan/README.md.
#pragma once

#include <cstdint>

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

}  // namespace retain::scan
