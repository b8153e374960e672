// The CUDA side of the fisher kernels' chunked lists (fisher/tensor_table.h): one block per chunk
// (grid-stride over chunks), and the partial sums of a reduction combined in chunk order by one
// small block, so a sum's order depends only on the list's shapes.
#pragma once

#include <algorithm>
#include <cstdint>

#include <cuda_runtime.h>

#include "common/cuda_utils.cuh"
#include "fisher/tensor_table.h"

namespace retain::fisher {

constexpr int kChunkThreads = 256;

inline unsigned chunk_blocks(int64_t chunks) { return static_cast<unsigned>(std::min<int64_t>(chunks, 1 << 20)); }

// The chunk range of block-stride iteration c.
__device__ __forceinline__ ChunkRange device_chunk(const TensorTable& tab, int64_t c) {
  return chunk_range(tab, c, tab.tensor_of(c));
}

namespace {  // each CUDA source its own copy: no kernel symbol shared between objects

__global__ void sum_partials_kernel(const double* __restrict__ partials, int64_t chunks, int64_t R,
                                    double* __restrict__ out) {
  for (int64_t r = threadIdx.x; r < R; r += blockDim.x) {
    double s = 0.0;
    for (int64_t c = 0; c < chunks; ++c) s += partials[c * R + r];
    out[r] = s;
  }
}

inline void sum_partials_cuda(const double* partials, int64_t chunks, int64_t R, double* out, cudaStream_t stream,
                              const char* op) {
  sum_partials_kernel<<<1, 256, 0, stream>>>(partials, chunks, R, out);
  cuda_check(cudaGetLastError(), op);
}

}  // namespace

}  // namespace retain::fisher
