// CPU kernels of feature imitation: rows of [N, D] split over threads, one pass over h and h_ref
// per call; per-row results keep the loss independent of the thread count.
#include <algorithm>
#include <cstdint>

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream_store.h"
#include "margin/feature_imitation.h"

namespace retain::margin {
namespace {

// A row is summed in blocks of kBlock elements in the accumulation type (a vectorised reduction,
// so each SIMD lane adds kBlock / width terms) and the block sums in double: the float32 error of
// a 4096-wide row stays at a few ulp instead of growing with D.
constexpr int64_t kBlock = 256;

// The distance of one row.
template <int P, typename T>
RETAIN_FORCE_INLINE double row_distance(const T* __restrict hr, const T* __restrict qr, int64_t D) {
  using A = Acc<T>;
  double total = 0.0;
  for (int64_t d0 = 0; d0 < D; d0 += kBlock) {
    const int64_t n = std::min(kBlock, D - d0);
    A s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < n; ++d) s += feature_element<P>(load_as<A>(hr[d0 + d]) - load_as<A>(qr[d0 + d]));
    total += static_cast<double>(s);
  }
  return total;
}

template <typename T, int P>
RETAIN_FORCE_INLINE void feature_fwd_rows(const T* __restrict h, const T* __restrict h_ref,
                                          const uint8_t* __restrict mask, int64_t D, double* __restrict loss,
                                          int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) loss[r] = (mask && !mask[r]) ? 0.0 : row_distance<P>(h + r * D, h_ref + r * D, D);
}

template <typename T, int P>
RETAIN_FORCE_INLINE void feature_bwd_rows(const T* __restrict h, const T* __restrict h_ref, const double* __restrict g,
                                          const uint8_t* __restrict mask, int64_t D, T* __restrict grad_h,
                                          T* __restrict grad_ref, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  for (int64_t r = r0; r < r1; ++r) {
    T* __restrict gh = grad_h ? grad_h + r * D : nullptr;
    T* __restrict gq = grad_ref ? grad_ref + r * D : nullptr;
    if (mask && !mask[r]) {  // explicit zeros: g is 0 there, but h may hold Inf/NaN padding
      if (gh) std::fill(gh, gh + D, T{});
      if (gq) std::fill(gq, gq + D, T{});
      continue;
    }
    const T* __restrict hr = h + r * D;
    const T* __restrict qr = h_ref + r * D;
    const A gr = static_cast<A>(g[r]);
    if (gh && gq) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        const A v = gr * feature_slope<P>(load_as<A>(hr[d]) - load_as<A>(qr[d]));
        store_as(gh[d], v);
        store_as(gq[d], -v);
      }
    } else if (gh) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) store_as(gh[d], gr * feature_slope<P>(load_as<A>(hr[d]) - load_as<A>(qr[d])));
    } else if (gq) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) store_as(gq[d], -(gr * feature_slope<P>(load_as<A>(hr[d]) - load_as<A>(qr[d]))));
    }
  }
}

// The forward with the gradient of a reduced loss fused in: per row the distance and
// grad_h = c * slope (c = grad_scale, 0 on masked rows), grad_ref = -grad_h, from one read of h
// and h_ref; gradient rows streamed past the caches when `stream`.
template <typename T, int P>
RETAIN_FORCE_INLINE void feature_fwd_grad_rows(const T* __restrict h, const T* __restrict h_ref,
                                               const uint8_t* __restrict mask, int64_t D, double grad_scale,
                                               double* __restrict loss, T* __restrict grad_h, T* __restrict grad_ref,
                                               bool stream, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  Buffer<A> row(D);
  for (int64_t r = r0; r < r1; ++r) {
    const bool off = mask && !mask[r];
    const T* __restrict hr = h + r * D;
    const T* __restrict qr = h_ref + r * D;
    const A c = off ? A(0) : static_cast<A>(grad_scale);
    A* __restrict g = row.data();
    loss[r] = off ? 0.0 : row_distance<P>(hr, qr, D);
    if (!grad_h && !grad_ref) continue;
    // the gradient from the rows just read (in cache); explicit zeros on masked rows, which may
    // hold Inf/NaN padding
    if (off) {
      std::fill(g, g + D, A(0));
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) g[d] = c * feature_slope<P>(load_as<A>(hr[d]) - load_as<A>(qr[d]));
    }
    if (grad_h) store_row(grad_h + r * D, g, D, stream);
    if (grad_ref) {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) g[d] = -g[d];
      store_row(grad_ref + r * D, g, D, stream);
    }
  }
  stream_fence(stream);
}

}  // namespace

template <CpuCapability C, typename T>
void feature_imitation_fwd_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                               double* loss, int nthreads) {
  parallel_for(N, D * 2, nthreads, [&](int64_t r0, int64_t r1) {
    if (p == 1) feature_fwd_rows<T, 1>(h, h_ref, mask, D, loss, r0, r1);
    else feature_fwd_rows<T, 2>(h, h_ref, mask, D, loss, r0, r1);
  });
}

template <CpuCapability C, typename T>
void feature_imitation_bwd_cpu(const T* h, const T* h_ref, const double* g, const uint8_t* mask, int64_t N,
                               int64_t D, int p, T* grad_h, T* grad_h_ref, int nthreads) {
  parallel_for(N, D * 3, nthreads, [&](int64_t r0, int64_t r1) {
    if (p == 1) feature_bwd_rows<T, 1>(h, h_ref, g, mask, D, grad_h, grad_h_ref, r0, r1);
    else feature_bwd_rows<T, 2>(h, h_ref, g, mask, D, grad_h, grad_h_ref, r0, r1);
  });
}

template <CpuCapability C, typename T>
void feature_imitation_fwd_grad_cpu(const T* h, const T* h_ref, const uint8_t* mask, int64_t N, int64_t D, int p,
                                    double grad_scale, double* loss, T* grad_h, T* grad_h_ref, int nthreads) {
  const bool stream = N * D * int64_t{sizeof(T)} >= (int64_t{16} << 20) && (D * int64_t{sizeof(T)}) % 64 == 0;
  parallel_for(N, D * 3, nthreads, [&](int64_t r0, int64_t r1) {
    if (p == 1) feature_fwd_grad_rows<T, 1>(h, h_ref, mask, D, grad_scale, loss, grad_h, grad_h_ref, stream, r0, r1);
    else feature_fwd_grad_rows<T, 2>(h, h_ref, mask, D, grad_scale, loss, grad_h, grad_h_ref, stream, r0, r1);
  });
}

#define RETAIN_INSTANTIATE(T)                                                                                  \
  template void feature_imitation_fwd_grad_cpu<kThisCpu, T>(const T*, const T*, const uint8_t*, int64_t, int64_t, int,     \
                                                  double, double*, T*, T*, int);                               \
  template void feature_imitation_fwd_cpu<kThisCpu, T>(const T*, const T*, const uint8_t*, int64_t, int64_t, int, double*, \
                                             int);                                                             \
  template void feature_imitation_bwd_cpu<kThisCpu, T>(const T*, const T*, const double*, const uint8_t*, int64_t, int64_t, \
                                             int, T*, T*, int);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
