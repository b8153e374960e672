// CUDA kernel of the rank-1 projections (fisher/rank1_dots.h): a block per chunk, one block
// reduction per sample into the chunk's partials, then the partials summed in chunk order
// (fisher/tensor_table.cuh): deterministic.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "fisher/fisher_cuda.cuh"
#include "fisher/rank1_dots.h"
#include "fisher/tensor_table.cuh"

namespace retain::fisher {
namespace {

template <typename T, typename S>
__global__ void dots_kernel(TensorTable tab, int64_t chunks, int64_t samples, double* __restrict__ partials) {
  using A = FisherAcc<T, S>;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    const int64_t numel = tab.numel(r.tensor);
    const S* mu = tab.ptr<const S>(0, r.tensor);
    const T* g = tab.ptr<const T>(1, r.tensor);
    for (int64_t s = 0; s < samples; ++s) {
      A acc = 0;
      for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
        acc += static_cast<A>(mu[j]) * load_as<A>(g[s * numel + j]);
      }
      const Sums<1> total = block_reduce(Sums<1>{{static_cast<double>(acc)}});
      if (threadIdx.x == 0) partials[c * samples + s] = total.v[0];
    }
  }
}

}  // namespace

template <typename T, typename S>
void rank1_dots_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double* partials,
                     double* dots, std::uintptr_t stream) {
  if (samples == 0) return;
  const TensorTable tab{table, n};
  if (chunks > 0) {
    dots_kernel<T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(tab, chunks, samples, partials);
    cuda_check(cudaGetLastError(), "retain::rank1_dots (CUDA)");
  }
  sum_partials_cuda(partials, chunks, samples, dots, as_stream(stream), "retain::rank1_dots (CUDA sum)");
}

#define RETAIN_INSTANTIATE(T, S)                                                                               \
  template void rank1_dots_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, int64_t, double*, double*, \
                                      std::uintptr_t);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
