// CPU kernels of the margin family: one pass over h per call, rows of [B, L, D] split over
// threads; per-row partial sums keep the result independent of the thread count.
#include <cstdint>

#include "common/dtype.h"
#include "common/isa.h"
#include "common/parallel.h"
#include "margin/margin.h"
#include "margin/tm_loss.h"

namespace retain::margin {
namespace {

template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void fwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, double* __restrict row_sum,
                                  int64_t* __restrict row_count, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    if (mask && !mask[r]) {
      row_sum[r] = 0.0, row_count[r] = 0;
      continue;
    }
    const int64_t b = r / L;
    const A* __restrict p = per_sample ? pos + b * D : pos;
    const A* __restrict n = per_sample ? neg + b * D : neg;
    const T* __restrict hr = h + r * D;
    const Lab* __restrict lr = labels + r * label_row;
    A sum = 0;
    int64_t count = 0;
#pragma omp simd reduction(+ : sum, count)
    for (int64_t d = 0; d < D; ++d) {
      const A e = tm_element(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]);
      sum += e;
      count += e > A(0);
    }
    row_sum[r] = static_cast<double>(sum);
    row_count[r] = count;
  }
}

template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void bwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, A scale,
                                  T* __restrict grad, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict gr = grad + r * D;
    if (mask && !mask[r]) {
      for (int64_t d = 0; d < D; ++d) store_as(gr[d], A(0));
      continue;
    }
    const int64_t b = r / L;
    const A* __restrict p = per_sample ? pos + b * D : pos;
    const A* __restrict n = per_sample ? neg + b * D : neg;
    const T* __restrict hr = h + r * D;
    const Lab* __restrict lr = labels + r * label_row;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) store_as(gr[d], scale * tm_slope(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]));
  }
}

#define RETAIN_ROW_KERNELS(T, Lab)                                                                              \
  RETAIN_ISA_CLONES void fwd_rows_isa(const T* h, const Lab* labels, int64_t label_row, const Acc<T>* pos,       \
                                      const Acc<T>* neg, bool per_sample, const uint8_t* mask, int64_t L,        \
                                      int64_t D, double* row_sum, int64_t* row_count, int64_t r0, int64_t r1) {  \
    fwd_rows<T, Lab, Acc<T>>(h, labels, label_row, pos, neg, per_sample, mask, L, D, row_sum, row_count, r0, r1); \
  }                                                                                                             \
  RETAIN_ISA_CLONES void bwd_rows_isa(const T* h, const Lab* labels, int64_t label_row, const Acc<T>* pos,       \
                                      const Acc<T>* neg, bool per_sample, const uint8_t* mask, int64_t L,        \
                                      int64_t D, Acc<T> scale, T* grad, int64_t r0, int64_t r1) {                \
    bwd_rows<T, Lab, Acc<T>>(h, labels, label_row, pos, neg, per_sample, mask, L, D, scale, grad, r0, r1);      \
  }
RETAIN_ROW_KERNELS(float, int8_t)
RETAIN_ROW_KERNELS(float, uint8_t)
RETAIN_ROW_KERNELS(double, int8_t)
RETAIN_ROW_KERNELS(double, uint8_t)
RETAIN_ROW_KERNELS(bf16_t, int8_t)
RETAIN_ROW_KERNELS(bf16_t, uint8_t)
RETAIN_ROW_KERNELS(f16_t, int8_t)
RETAIN_ROW_KERNELS(f16_t, uint8_t)
#undef RETAIN_ROW_KERNELS

}  // namespace

template <typename T, typename Lab, typename A>
void tm_loss_fwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D,
                     double* row_sum, int64_t* row_count, int nthreads) {
  parallel_for(B * L, D * 4, nthreads, [&](int64_t r0, int64_t r1) {
    fwd_rows_isa(h, labels, label_row, pos, neg, per_sample_thresholds, mask, L, D, row_sum, row_count, r0, r1);
  });
}

template <typename T, typename Lab, typename A>
void tm_loss_bwd_cpu(const T* h, const Lab* labels, int64_t label_row, const A* pos, const A* neg,
                     bool per_sample_thresholds, const uint8_t* mask, int64_t B, int64_t L, int64_t D, double scale,
                     T* grad_h, int nthreads) {
  parallel_for(B * L, D * 4, nthreads, [&](int64_t r0, int64_t r1) {
    bwd_rows_isa(h, labels, label_row, pos, neg, per_sample_thresholds, mask, L, D, static_cast<A>(scale), grad_h,
                 r0, r1);
  });
}

#define RETAIN_INSTANTIATE(T, Lab)                                                                            \
  template void tm_loss_fwd_cpu<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                bool, const uint8_t*, int64_t, int64_t, int64_t, double*,       \
                                                int64_t*, int);                                                \
  template void tm_loss_bwd_cpu<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                bool, const uint8_t*, int64_t, int64_t, int64_t, double, T*, int);
RETAIN_INSTANTIATE(float, int8_t)
RETAIN_INSTANTIATE(float, uint8_t)
RETAIN_INSTANTIATE(double, int8_t)
RETAIN_INSTANTIATE(double, uint8_t)
RETAIN_INSTANTIATE(bf16_t, int8_t)
RETAIN_INSTANTIATE(bf16_t, uint8_t)
RETAIN_INSTANTIATE(f16_t, int8_t)
RETAIN_INSTANTIATE(f16_t, uint8_t)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
