// What the fisher family's CUDA kernels share beyond the chunk table (fisher/tensor_table.cuh):
// the double-precision partial sums their block reductions combine (common/cuda_rows.cuh).
#pragma once

#include "common/cuda_rows.cuh"

namespace retain::fisher {

template <int R>
struct Sums {  // R partial sums reduced together
  double v[R];
  __device__ static Sums identity() {
    Sums s;
#pragma unroll
    for (int i = 0; i < R; ++i) s.v[i] = 0.0;
    return s;
  }
  __device__ static Sums combine(const Sums& x, const Sums& y) {
    Sums s;
#pragma unroll
    for (int i = 0; i < R; ++i) s.v[i] = x.v[i] + y.v[i];
    return s;
  }
  __device__ Sums down(int off) const {
    Sums s;
#pragma unroll
    for (int i = 0; i < R; ++i) s.v[i] = __shfl_down_sync(kFullMask, v[i], off);
    return s;
  }
};

}  // namespace retain::fisher
