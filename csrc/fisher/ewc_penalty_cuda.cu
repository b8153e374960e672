// CUDA kernels of the EWC penalty (fisher/ewc_penalty.h): a block per chunk; the forward's two sums
// (and the backward's optional diagonal sum) by block reductions into per-chunk partials summed in
// chunk order (deterministic); the gradient elementwise.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "fisher/ewc_penalty.h"
#include "fisher/fisher_cuda.cuh"
#include "fisher/tensor_table.cuh"

namespace retain::fisher {
namespace {

template <typename T, typename S>
__global__ void ewc_fwd_kernel(TensorTable tab, int64_t chunks, double* __restrict__ partials) {
  using A = FisherAcc<T, S>;
  const bool has_f = tab.has(kDiag), has_mu = tab.has(kMu);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    const EwcTensors<T, S> e(tab, r.tensor);
    const T *p = e.p, *q = e.q;
    const S *f = e.f, *mu = e.mu;
    A af = 0, am = 0;
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
      const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
      if (has_f) af += static_cast<A>(f[j]) * d * d;
      if (has_mu) am += static_cast<A>(mu[j]) * d;
    }
    const Sums<2> total = block_reduce(Sums<2>{{static_cast<double>(af), static_cast<double>(am)}});
    if (threadIdx.x == 0) {
      partials[2 * c] = total.v[0];
      partials[2 * c + 1] = total.v[1];
    }
  }
}

template <typename T, typename S>
__global__ void ewc_bwd_kernel(TensorTable tab, int64_t chunks, const double* __restrict__ coef, bool accumulate,
                               double* __restrict__ partials) {
  using A = FisherAcc<T, S>;
  const bool has_f = tab.has(kDiag), has_mu = tab.has(kMu);
  const A a = static_cast<A>(coef[0]), b = static_cast<A>(coef[1]);
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    const ChunkRange r = device_chunk(tab, c);
    const EwcTensors<T, S> e(tab, r.tensor);
    const T *p = e.p, *q = e.q;
    const S *f = e.f, *mu = e.mu;
    T* g = tab.ptr<T>(kGrad, r.tensor);
    A af = 0;
    for (int64_t j = r.begin + threadIdx.x; j < r.end; j += blockDim.x) {
      const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
      const A fj = has_f ? static_cast<A>(f[j]) : A(0);
      const A mj = has_mu ? static_cast<A>(mu[j]) : A(0);
      A v = ewc_grad_element(d, fj, mj, a, b, has_f, has_mu);
      if (accumulate) v += load_as<A>(g[j]);
      store_as(g[j], v);
      af += fj * d * d;
    }
    if (partials) {  // uniform across the block: every thread reaches the reduction
      const Sums<1> total = block_reduce(Sums<1>{{static_cast<double>(af)}});
      if (threadIdx.x == 0) {
        partials[2 * c] = total.v[0];
        partials[2 * c + 1] = 0.0;
      }
    }
  }
}

}  // namespace

template <typename T, typename S>
void ewc_penalty_fwd_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double* partials,
                          double* sums, std::uintptr_t stream) {
  const TensorTable tab{table, n};
  if (chunks > 0) {
    ewc_fwd_kernel<T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(tab, chunks, partials);
    cuda_check(cudaGetLastError(), "retain::ewc_penalty (CUDA forward)");
  }
  sum_partials_cuda(partials, chunks, 2, sums, as_stream(stream), "retain::ewc_penalty (CUDA sum)");
}

template <typename T, typename S>
void ewc_penalty_bwd_cuda(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, const double* coef,
                          bool accumulate, double* partials, double* sums, std::uintptr_t stream) {
  const TensorTable tab{table, n};
  if (chunks > 0) {
    ewc_bwd_kernel<T, S><<<chunk_blocks(chunks), kChunkThreads, 0, as_stream(stream)>>>(tab, chunks, coef,
                                                                                       accumulate, partials);
    cuda_check(cudaGetLastError(), "retain::ewc_penalty (CUDA backward)");
  }
  if (partials) sum_partials_cuda(partials, chunks, 2, sums, as_stream(stream), "retain::ewc_penalty (CUDA sum)");
}

#define RETAIN_INSTANTIATE(T, S)                                                                                   \
  template void ewc_penalty_fwd_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, double*, double*,         \
                                           std::uintptr_t);                                                        \
  template void ewc_penalty_bwd_cuda<T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, const double*, bool,      \
                                           double*, double*, std::uintptr_t);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
