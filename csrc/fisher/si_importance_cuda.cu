// CUDA kernels of Synaptic Intelligence (fisher/si_importance.h): elementwise, a block per chunk.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "fisher/si_importance.h"
#include "fisher/tensor_table.cuh"

namespace retain::fisher {
namespace {

template <typename T, typename S>
__global__ void si_accumulate_kernel(TensorTable tab, int64_t chunks) {
  using A = FisherAcc<T, S>;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    S* w = tab.ptr<S>(0, r.tensor);
    const T* g = tab.ptr<const T>(1, r.tensor);
    const T* p0 = tab.ptr<const T>(2, r.tensor);
    const T* p1 = tab.ptr<const T>(3, r.tensor);
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
      w[j] = static_cast<S>(si_step(static_cast<A>(w[j]), load_as<A>(g[j]), load_as<A>(p0[j]), load_as<A>(p1[j])));
    }
  }
}

template <typename T, typename S>
__global__ void si_consolidate_kernel(TensorTable tab, int64_t chunks, double xi, bool reset) {
  using A = FisherAcc<T, S>;
  const A x = static_cast<A>(xi);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    S* big = tab.ptr<S>(0, r.tensor);
    S* w = tab.ptr<S>(1, r.tensor);
    const T* p = tab.ptr<const T>(2, r.tensor);
    const T* q = tab.ptr<const T>(3, r.tensor);
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
      const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
      big[j] = static_cast<S>(si_importance(static_cast<A>(big[j]), static_cast<A>(w[j]), d, x));
      if (reset) w[j] = S(0);
    }
  }
}

}  // namespace

template <typename T, typename S>
void si_accumulate_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, std::uintptr_t stream) {
  if (chunks == 0) return;
  si_accumulate_kernel<T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(TensorTable{table, n},
                                                                                           chunks);
  cuda_check(cudaGetLastError(), "retain::si_accumulate_ (CUDA)");
}

template <typename T, typename S>
void si_consolidate_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double xi, bool reset,
                         std::uintptr_t stream) {
  if (chunks == 0) return;
  si_consolidate_kernel<T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(TensorTable{table, n},
                                                                                            chunks, xi, reset);
  cuda_check(cudaGetLastError(), "retain::si_consolidate_ (CUDA)");
}

#define RETAIN_INSTANTIATE(T, S)                                                                                 \
  template void si_accumulate_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, std::uintptr_t);         \
  template void si_consolidate_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, double, bool,           \
                                          std::uintptr_t);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
