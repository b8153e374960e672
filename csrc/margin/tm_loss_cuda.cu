// CUDA kernels of tm_loss: one block per (b, l) row (common/cuda_rows.cuh), its threads striding
// over the row's D elements; the forward reduces each row's loss and violation count in a fixed
// order (deterministic). The per-element math is the CPU's (tm_loss.h); derivations and the
// design are in csrc/margin/README.md.
#include <cstdint>

#include "common/cuda_rows.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "margin/tm_loss.h"

namespace retain::margin {
namespace {

template <typename A>
struct SumCount {  // tm_loss: a row's loss and its number of violations
  A sum;
  long long count;
  __device__ static SumCount identity() { return {A(0), 0}; }
  __device__ static SumCount combine(const SumCount& x, const SumCount& y) {
    return {x.sum + y.sum, x.count + y.count};
  }
  __device__ SumCount down(int off) const {
    return {__shfl_down_sync(kFullMask, sum, off), __shfl_down_sync(kFullMask, count, off)};
  }
};

// Row r of tm_loss's inputs: its h and labels, and its thresholds (per sample: those of sample
// r / L); the loss and slope of element d are the CPU's (tm_element, tm_slope).
template <typename T, typename Lab, typename A>
struct TmRow {
  const T* h;
  const Lab* lab;
  const A* pos;
  const A* neg;
  __device__ TmRow(const T* h_, const Lab* labels, int64_t label_row, const A* pos_, const A* neg_, bool per_sample,
                   int64_t r, int64_t L, int64_t D) {
    const int64_t b = r / L;
    pos = per_sample ? pos_ + b * D : pos_;
    neg = per_sample ? neg_ + b * D : neg_;
    h = h_ + r * D;
    lab = labels + r * label_row;
  }
  __device__ A loss(int64_t d) const { return tm_element(load_as<A>(h[d]), label_at(lab, d), pos[d], neg[d]); }
  __device__ A slope(int64_t d) const { return tm_slope(load_as<A>(h[d]), label_at(lab, d), pos[d], neg[d]); }
};

template <typename T, typename Lab, typename A>
__global__ void tm_fwd_kernel(const T* __restrict__ h, const Lab* __restrict__ labels, int64_t label_row,
                              const A* __restrict__ pos, const A* __restrict__ neg, bool per_sample,
                              const uint8_t* __restrict__ mask, int64_t rows, int64_t L, int64_t D,
                              double* __restrict__ row_sum, int64_t* __restrict__ row_count) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    if (mask && !mask[r]) {
      if (threadIdx.x == 0) row_sum[r] = 0.0, row_count[r] = 0;
      continue;
    }
    const TmRow<T, Lab, A> row(h, labels, label_row, pos, neg, per_sample, r, L, D);
    SumCount<A> part = SumCount<A>::identity();
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A e = row.loss(d);
      part.sum += e;
      part.count += e > A(0) ? 1 : 0;
    }
    part = block_reduce(part);
    if (threadIdx.x == 0) row_sum[r] = static_cast<double>(part.sum), row_count[r] = part.count;
  }
}

template <typename T, typename Lab, typename A>
__global__ void tm_bwd_kernel(const T* __restrict__ h, const Lab* __restrict__ labels, int64_t label_row,
                              const A* __restrict__ pos, const A* __restrict__ neg, bool per_sample,
                              const uint8_t* __restrict__ mask, int64_t rows, int64_t L, int64_t D,
                              const double* __restrict__ scale, T* __restrict__ grad) {
  const A sc = static_cast<A>(*scale);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T* gr = grad + r * D;
    if (mask && !mask[r]) {
      for (int64_t d = threadIdx.x; d < D; d += blockDim.x) store_as(gr[d], A(0));
      continue;
    }
    const TmRow<T, Lab, A> row(h, labels, label_row, pos, neg, per_sample, r, L, D);
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) store_as(gr[d], scaled_slope(sc, row.slope(d)));
  }
}

}  // namespace

template <typename T, typename Lab, typename A>
void tm_loss_fwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      double* row_sum, int64_t* row_count, std::uintptr_t stream) {
  const int64_t rows = B * L;
  if (rows == 0) return;
  tm_fwd_kernel<T, Lab, A><<<row_blocks(rows), row_threads(D), 0, as_stream(stream)>>>(
      h, labels, label_row, pos, neg, per_sample_thresholds, mask, rows, L, D, row_sum, row_count);
  cuda_check(cudaGetLastError(), "retain::tm_loss (CUDA forward)");
}

template <typename T, typename Lab, typename A>
void tm_loss_bwd_cuda(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                      bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                      const double* scale, T* grad_h, std::uintptr_t stream) {
  const int64_t rows = B * L;
  if (rows == 0 || D == 0) return;
  tm_bwd_kernel<T, Lab, A><<<row_blocks(rows), row_threads(D), 0, as_stream(stream)>>>(
      h, labels, label_row, pos, neg, per_sample_thresholds, mask, rows, L, D, scale, grad_h);
  cuda_check(cudaGetLastError(), "retain::tm_loss (CUDA backward)");
}

#define RETAIN_INSTANTIATE(T, Lab)                                                                             \
  template void tm_loss_fwd_cuda<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                 bool, const uint8_t*, int64_t, int64_t, int64_t, double*,      \
                                                 int64_t*, std::uintptr_t);                                     \
  template void tm_loss_bwd_cuda<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                 bool, const uint8_t*, int64_t, int64_t, int64_t, const double*, \
                                                 T*, std::uintptr_t);
#define RETAIN_INSTANTIATE_LABELS(T) RETAIN_INSTANTIATE(T, int8_t) RETAIN_INSTANTIATE(T, uint8_t)
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE_LABELS)
#undef RETAIN_INSTANTIATE_LABELS
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
