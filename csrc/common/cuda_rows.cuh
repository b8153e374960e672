// One block per row: the launch geometry and the deterministic block reduction of the row-wise
// CUDA kernels (tm_loss_cuda.cu, kl_imitation_cuda.cu, feature_imitation_cuda.cu). A block's
// threads stride over the row's elements, so every load is coalesced; the per-thread partials
// are combined by warp shuffles, then one warp over the warps' partials: the order of every sum
// depends only on the row length, never on timing. Rows beyond the grid are taken grid-stride,
// so int64 row counts work. Design: csrc/margin/README.md.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

namespace retain {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxRowBlocks = int64_t{1} << 20;

// Threads per row: a power of two in [32, 256], about one per 8 elements. Whole warps, so the
// shuffles need no bounds checks; short rows do not leave most of a 256-thread block idle.
inline int row_threads(int64_t n) {
  int t = 32;
  while (t < 256 && int64_t{t} * 8 < n) t <<= 1;
  return t;
}

inline unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxRowBlocks)); }

// Block-wide reduction of a partial R (R::combine, R::identity, R::down(offset) = the value of the
// lane `offset` above). The result is valid in thread 0. Every thread of the block must call it.
template <typename R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = R::combine(v, v.down(off));
  return v;
}

template <typename R>
__device__ R block_reduce(R v) {
  __shared__ R warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_part[lane] : R::identity();
    v = warp_reduce(v);
  }
  __syncthreads();  // warp_part is reused by the block's next row
  return v;
}

}  // namespace retain
