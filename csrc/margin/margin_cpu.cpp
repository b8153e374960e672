// CPU kernels of the margin family: one pass over h per call, rows of [B, L, D] split over
// threads; per-row partial sums keep the result independent of the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/dtype.h"
#include "common/isa.h"
#include "common/parallel.h"
#include "margin/margin.h"
#include "margin/kl.h"
#include "margin/tm_loss.h"

namespace retain::margin {
namespace {

// Packed labels are decoded a row at a time into int8 through a 256-entry table: one byte of four
// 2-bit codes becomes four int8 labels in one 32-bit store, and the loss loops stay the
// vectorised int8 ones.
struct UnpackTable {
  uint32_t word[256];
  UnpackTable() {
    for (int b = 0; b < 256; ++b) {
      uint32_t w = 0;
      for (int i = 0; i < 4; ++i) {
        const int code = (b >> (2 * i)) & 3;
        const int8_t label = static_cast<int8_t>((code == 1) - (code == 2));
        w |= static_cast<uint32_t>(static_cast<uint8_t>(label)) << (8 * i);  // little-endian: label i at byte i
      }
      word[b] = w;
    }
  }
};
const UnpackTable kUnpack;

// Row r's labels as int8: the row itself, or the packed row decoded into `scratch` (>= D + 3 bytes).
RETAIN_FORCE_INLINE const int8_t* row_labels(const int8_t* labels, int64_t label_row, int64_t r, int64_t, int8_t*) {
  return labels + r * label_row;
}
RETAIN_FORCE_INLINE const int8_t* row_labels(const uint8_t* labels, int64_t label_row, int64_t r, int64_t,
                                             int8_t* scratch) {
  const uint8_t* row = labels + r * label_row;
  for (int64_t q = 0; q < label_row; ++q) std::memcpy(scratch + 4 * q, &kUnpack.word[row[q]], 4);
  return scratch;
}

template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void fwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, double* __restrict row_sum,
                                  int64_t* __restrict row_count, int64_t r0, int64_t r1) {
  std::vector<int8_t> scratch(std::is_same_v<Lab, uint8_t> ? D + 4 : 0);
  for (int64_t r = r0; r < r1; ++r) {
    if (mask && !mask[r]) {
      row_sum[r] = 0.0, row_count[r] = 0;
      continue;
    }
    const int64_t b = r / L;
    const A* __restrict p = per_sample ? pos + b * D : pos;
    const A* __restrict n = per_sample ? neg + b * D : neg;
    const T* __restrict hr = h + r * D;
    const int8_t* __restrict lr = row_labels(labels, label_row, r, D, scratch.data());
    A sum = 0, count = 0;  // a float count stays exact up to 2^24 elements a row, and vectorises
#pragma omp simd reduction(+ : sum, count)
    for (int64_t d = 0; d < D; ++d) {
      const A e = tm_element(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]);
      sum += e;
      count += e > A(0) ? A(1) : A(0);
    }
    row_sum[r] = static_cast<double>(sum);
    row_count[r] = static_cast<int64_t>(count);
  }
}

template <typename T, typename Lab, typename A>
RETAIN_FORCE_INLINE void bwd_rows(const T* __restrict h, const Lab* __restrict labels, int64_t label_row,
                                  const A* __restrict pos, const A* __restrict neg, bool per_sample,
                                  const uint8_t* __restrict mask, int64_t L, int64_t D, A scale,
                                  T* __restrict grad, int64_t r0, int64_t r1) {
  std::vector<int8_t> scratch(std::is_same_v<Lab, uint8_t> ? D + 4 : 0);
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
    const int8_t* __restrict lr = row_labels(labels, label_row, r, D, scratch.data());
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

namespace retain::margin {
namespace {

template <typename T>
RETAIN_FORCE_INLINE void kl_fwd_rows(const T* __restrict z, const T* __restrict z_ref, const uint8_t* __restrict mask,
                                     int64_t V, double inv_t, double* __restrict loss, double* __restrict lse,
                                     double* __restrict lse_ref, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  const A it = static_cast<A>(inv_t);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict zr = z + r * V;
    const T* __restrict qr = z_ref + r * V;
    A m = -INFINITY, mr = -INFINITY;
#pragma omp simd reduction(max : m, mr)
    for (int64_t v = 0; v < V; ++v) {
      const A a = load_as<A>(zr[v]) * it, b = load_as<A>(qr[v]) * it;
      m = a > m ? a : m;
      mr = b > mr ? b : mr;
    }
    A s = 0, sr = 0, w = 0;  // sum exp(z/T - m), sum exp(z_ref/T - mr), sum exp(z_ref/T - mr) (z_ref - z)/T
#pragma omp simd reduction(+ : s, sr, w)
    for (int64_t v = 0; v < V; ++v) {
      const A a = load_as<A>(zr[v]) * it;
      const A b = load_as<A>(qr[v]) * it;
      const A eb = exp_vec(b - mr);
      s += exp_vec(a - m);
      sr += eb;
      w += eb * (b - a);
    }
    const A l = lse_of(m, s), lr = lse_of(mr, sr);
    lse[r] = l;
    lse_ref[r] = lr;
    loss[r] = (mask && !mask[r]) ? 0.0 : static_cast<double>(w / sr - lr + l);
  }
}

template <typename T>
RETAIN_FORCE_INLINE void kl_bwd_rows(const T* __restrict z, const T* __restrict z_ref, const double* __restrict g,
                                     const double* __restrict loss, const double* __restrict lse,
                                     const double* __restrict lse_ref, int64_t V, double inv_t, T* __restrict grad_z,
                                     T* __restrict grad_z_ref, int64_t r0, int64_t r1) {
  using A = Acc<T>;
  const A it = static_cast<A>(inv_t);
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict zr = z + r * V;
    const T* __restrict qr = z_ref + r * V;
    const A gr = static_cast<A>(g[r]) * it, l = static_cast<A>(lse[r]), lr = static_cast<A>(lse_ref[r]);
    const A kl = static_cast<A>(loss[r]);
    if (grad_z) {
      T* __restrict gz = grad_z + r * V;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const A lp = load_as<A>(zr[v]) * it - l, lq = load_as<A>(qr[v]) * it - lr;
        store_as(gz[v], gr * (exp_vec(lp) - exp_vec(lq)));
      }
    }
    if (grad_z_ref) {
      T* __restrict gq = grad_z_ref + r * V;
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) {
        const A lp = load_as<A>(zr[v]) * it - l, lq = load_as<A>(qr[v]) * it - lr;
        store_as(gq[v], gr * exp_vec(lq) * (lq - lp - kl));
      }
    }
  }
}

#define RETAIN_KL_KERNELS(T)                                                                                   \
  RETAIN_ISA_CLONES void kl_fwd_rows_isa(const T* z, const T* z_ref, const uint8_t* mask, int64_t V,           \
                                         double inv_t, double* loss, double* lse, double* lse_ref, int64_t r0, \
                                         int64_t r1) {                                                         \
    kl_fwd_rows<T>(z, z_ref, mask, V, inv_t, loss, lse, lse_ref, r0, r1);                                      \
  }                                                                                                            \
  RETAIN_ISA_CLONES void kl_bwd_rows_isa(const T* z, const T* z_ref, const double* g, const double* loss,      \
                                         const double* lse, const double* lse_ref, int64_t V, double inv_t,    \
                                         T* grad_z, T* grad_z_ref, int64_t r0, int64_t r1) {                   \
    kl_bwd_rows<T>(z, z_ref, g, loss, lse, lse_ref, V, inv_t, grad_z, grad_z_ref, r0, r1);                     \
  }
RETAIN_KL_KERNELS(float)
RETAIN_KL_KERNELS(double)
RETAIN_KL_KERNELS(bf16_t)
RETAIN_KL_KERNELS(f16_t)
#undef RETAIN_KL_KERNELS

}  // namespace

template <typename T>
void kl_imitation_fwd_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                          double* loss, double* lse, double* lse_ref, int nthreads) {
  parallel_for(N, V * 16, nthreads, [&](int64_t r0, int64_t r1) {
    kl_fwd_rows_isa(z, z_ref, mask, V, inv_t, loss, lse, lse_ref, r0, r1);
  });
}

template <typename T>
void kl_imitation_bwd_cpu(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                          const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                          int nthreads) {
  parallel_for(N, V * 16, nthreads, [&](int64_t r0, int64_t r1) {
    kl_bwd_rows_isa(z, z_ref, g, loss, lse, lse_ref, V, inv_t, grad_z, grad_z_ref, r0, r1);
  });
}

#define RETAIN_INSTANTIATE(T)                                                                                  \
  template void kl_imitation_fwd_cpu<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, double, double*,  \
                                        double*, double*, int);                                                \
  template void kl_imitation_bwd_cpu<T>(const T*, const T*, const double*, const double*, const double*,        \
                                        const double*, int64_t, int64_t, double, T*, T*, int);
RETAIN_INSTANTIATE(float)
RETAIN_INSTANTIATE(double)
RETAIN_INSTANTIATE(bf16_t)
RETAIN_INSTANTIATE(f16_t)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
