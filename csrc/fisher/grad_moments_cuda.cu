// CUDA kernel of the gradient moments (fisher/grad_moments.h): a block per chunk of one tensor,
// its threads striding over the chunk; each thread sums its element's samples, then updates the
// state. Elementwise: no reduction, nothing depends on the launch geometry.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "fisher/grad_moments.h"
#include "fisher/tensor_table.cuh"

namespace retain::fisher {
namespace {

template <int P, typename T, typename S>
__global__ void moments_kernel(TensorTable tab, int64_t chunks, int64_t samples, double decay, double scale) {
  using A = FisherAcc<T, S>;
  const bool has1 = tab.has(1), has2 = tab.has(2);
  const A dk = static_cast<A>(decay), sc = static_cast<A>(scale);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    const int64_t numel = tab.numel(r.tensor);
    const T* g = tab.ptr<const T>(0, r.tensor);
    S* first = tab.ptr<S>(1, r.tensor);
    S* second = tab.ptr<S>(2, r.tensor);
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
      A s1 = 0, s2 = 0;
      for (int64_t s = 0; s < samples; ++s) {
        const A v = load_as<A>(g[s * numel + j]);
        s1 += v;
        s2 += moment_term<P>(v);
      }
      if (has1) first[j] = static_cast<S>(dk * static_cast<A>(first[j]) + sc * s1);
      if (has2) second[j] = static_cast<S>(dk * static_cast<A>(second[j]) + sc * s2);
    }
  }
}

}  // namespace

template <typename T, typename S>
void grad_moments_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double decay,
                       double scale, int power, std::uintptr_t stream) {
  if (chunks == 0) return;
  const TensorTable tab{table, n};
  if (power == 2) {
    moments_kernel<2, T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(tab, chunks, samples,
                                                                                          decay, scale);
  } else {
    moments_kernel<1, T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(tab, chunks, samples,
                                                                                          decay, scale);
  }
  cuda_check(cudaGetLastError(), "retain::grad_moments (CUDA)");
}

#define RETAIN_INSTANTIATE(T, S)                                                                                \
  template void grad_moments_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, int64_t, double, double, int, \
                                        std::uintptr_t);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
