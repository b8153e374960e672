// CUDA kernels of feature_imitation: one block per token (common/cuda_rows.cuh), its threads
// striding over the row's D features; the forward reduces each row's distance in a fixed order
// (deterministic). The per-element math is the CPU's (feature_imitation.h); derivations and the
// design are in csrc/margin/README.md.
#include <cstdint>

#include "common/cuda_rows.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "margin/feature_imitation.h"

namespace retain::margin {
namespace {

struct Sum {  // feature_imitation: a row's distance
  double sum;
  __device__ static Sum identity() { return {0.0}; }
  __device__ static Sum combine(const Sum& x, const Sum& y) { return {x.sum + y.sum}; }
  __device__ Sum down(int off) const { return {__shfl_down_sync(kFullMask, sum, off)}; }
};

template <typename T, int P>
__global__ void feature_fwd_kernel(const T* __restrict__ h, const T* __restrict__ h_ref,
                                   const uint8_t* __restrict__ mask, int64_t N, int64_t D,
                                   double* __restrict__ loss) {
  using A = Acc<T>;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    if (mask && !mask[r]) {
      if (threadIdx.x == 0) loss[r] = 0.0;
      continue;
    }
    const T* hr = h + r * D;
    const T* qr = h_ref + r * D;
    A s = 0;  // a thread's D / blockDim terms in the accumulation type, the block tree in double
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      s += feature_element<P>(load_as<A>(hr[d]) - load_as<A>(qr[d]));
    }
    const Sum total = block_reduce(Sum{static_cast<double>(s)});
    if (threadIdx.x == 0) loss[r] = total.sum;
  }
}

template <typename T, int P>
__global__ void feature_bwd_kernel(const T* __restrict__ h, const T* __restrict__ h_ref, const double* __restrict__ g,
                                   const uint8_t* __restrict__ mask, int64_t N, int64_t D, T* __restrict__ grad_h,
                                   T* __restrict__ grad_ref) {
  using A = Acc<T>;
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const bool on = !mask || mask[r];  // masked rows: explicit zeros, whatever h holds there
    const A gr = on ? static_cast<A>(g[r]) : A(0);
    const T* hr = h + r * D;
    const T* qr = h_ref + r * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A v = on ? gr * feature_slope<P>(load_as<A>(hr[d]) - load_as<A>(qr[d])) : A(0);
      if (grad_h) store_as(grad_h[r * D + d], v);
      if (grad_ref) store_as(grad_ref[r * D + d], on ? -v : A(0));  // +0 on masked rows, as the CPU
    }
  }
}

}  // namespace

template <typename T>
void feature_imitation_fwd_cuda(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                double* loss, std::uintptr_t stream) {
  if (N == 0) return;
  if (p == 1) {
    feature_fwd_kernel<T, 1><<<row_blocks(N), row_threads(D), 0, as_stream(stream)>>>(h, h_ref, mask, N, D, loss);
  } else {
    feature_fwd_kernel<T, 2><<<row_blocks(N), row_threads(D), 0, as_stream(stream)>>>(h, h_ref, mask, N, D, loss);
  }
  cuda_check(cudaGetLastError(), "retain::feature_imitation (CUDA forward)");
}

template <typename T>
void feature_imitation_bwd_cuda(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                                int64_t D, int p, T* grad_h, T* grad_h_ref, std::uintptr_t stream) {
  if (N == 0 || D == 0 || (!grad_h && !grad_h_ref)) return;
  if (p == 1) {
    feature_bwd_kernel<T, 1><<<row_blocks(N), row_threads(D), 0, as_stream(stream)>>>(h, h_ref, g, mask, N, D,
                                                                                      grad_h, grad_h_ref);
  } else {
    feature_bwd_kernel<T, 2><<<row_blocks(N), row_threads(D), 0, as_stream(stream)>>>(h, h_ref, g, mask, N, D,
                                                                                      grad_h, grad_h_ref);
  }
  cuda_check(cudaGetLastError(), "retain::feature_imitation (CUDA backward)");
}

#define RETAIN_INSTANTIATE(T)                                                                                  \
  template void feature_imitation_fwd_cuda<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, int,        \
                                              double*, std::uintptr_t);                                        \
  template void feature_imitation_bwd_cuda<T>(const T*, const T*, const double*, const uint8_t*, int64_t,       \
                                              int64_t, int, T*, T*, std::uintptr_t);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
