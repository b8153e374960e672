// CUDA kernels of the margin family (tm_loss, kl_imitation, feature_imitation). One block per row
// (token): its threads stride over the row's D (or V) elements, so every load is coalesced, and a
// fixed-shape block reduction (warp shuffles, then one warp over the warps' partials) combines the
// per-thread partials. The order of every sum depends only on the row length, never on timing:
// results are deterministic run to run. Rows beyond the grid are taken grid-stride, so int64 row
// counts work. The per-element math is the CPU's (tm_loss.h, feature.h, kl.h); derivations and
// the design are in csrc/margin/README.md.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "common/dtype.h"
#include "margin/feature_imitation.h"
#include "margin/kl_imitation.h"
#include "margin/margin.h"
#include "margin/tm_loss.h"

namespace retain::margin {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;

// Threads per row: a power of two in [32, 256], about one per 8 elements. Whole warps, so the
// shuffles need no bounds checks; short rows do not leave most of a 256-thread block idle.
int row_threads(int64_t n) {
  int t = 32;
  while (t < 256 && int64_t{t} * 8 < n) t <<= 1;
  return t;
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(std::min(rows, kMaxBlocks)); }

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

// Block-wide reduction of a partial R (R::combine, R::identity, R::down(offset) = the value of the
// lane `offset` above). The result is valid in thread 0. Every thread of the block must call it.
template <typename R>
__device__ __forceinline__ R warp_reduce(R v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = R::combine(v, v.down(off));
  return v;
}

template <typename R>
__device__ R block_reduce(R v) {
  __shared__ R warp_part[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v);
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? warp_part[lane] : R::identity();
    v = warp_reduce(v);
  }
  __syncthreads();  // warp_part is reused by the block's next row
  return v;
}

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

struct Sum {  // feature_imitation: a row's distance
  double sum;
  __device__ static Sum identity() { return {0.0}; }
  __device__ static Sum combine(const Sum& x, const Sum& y) { return {x.sum + y.sum}; }
  __device__ Sum down(int off) const { return {__shfl_down_sync(kFullMask, sum, off)}; }
};

// kl_imitation: running max m and sum s of exp(a - m) over a = z/T, and for b = z_ref/T its max
// mr, sum sr of exp(b - mr) and w = sum exp(b - mr) (b - a). A -inf maximum marks a partial without
// a finite (or +inf) logit: its sums are 0, or NaN when it saw a NaN logit (NaN never raises the
// max). Two such partials add their sums (no -inf - (-inf)); otherwise the -inf one is weighted
// by exp(-inf) = 0, which keeps a NaN sum NaN instead of dropping it.
template <typename A>
struct KlPart {
  A m, s, mr, sr, w;
  __device__ static KlPart identity() { return {-INFINITY, A(0), -INFINITY, A(0), A(0)}; }
  __device__ static KlPart combine(const KlPart& x, const KlPart& y) {
    KlPart o;
    if (x.m == -INFINITY && y.m == -INFINITY) {
      o.m = x.m, o.s = x.s + y.s;
    } else {
      o.m = x.m > y.m ? x.m : y.m;
      o.s = x.s * dev_exp(x.m - o.m) + y.s * dev_exp(y.m - o.m);
    }
    if (x.mr == -INFINITY && y.mr == -INFINITY) {
      o.mr = x.mr, o.sr = x.sr + y.sr, o.w = x.w + y.w;
    } else {
      o.mr = x.mr > y.mr ? x.mr : y.mr;
      const A cx = dev_exp(x.mr - o.mr), cy = dev_exp(y.mr - o.mr);
      o.sr = x.sr * cx + y.sr * cy;
      o.w = x.w * cx + y.w * cy;
    }
    return o;
  }
  __device__ KlPart down(int off) const {
    return {__shfl_down_sync(kFullMask, m, off), __shfl_down_sync(kFullMask, s, off),
            __shfl_down_sync(kFullMask, mr, off), __shfl_down_sync(kFullMask, sr, off),
            __shfl_down_sync(kFullMask, w, off)};
  }
  // One logit pair: online max / rescaled sums (the sums are rescaled only when the max grows). A
  // -inf logit adds exactly 0; a NaN one reaches the sums and makes the row NaN.
  __device__ void add(A a, A b) {
    if (a > m) {
      s = s * dev_exp(m - a) + A(1);
      m = a;
    } else if (a != -INFINITY) {
      s += dev_exp(a - m);
    }
    if (b > mr) {
      const A c = dev_exp(mr - b);
      sr = sr * c + A(1);
      w = w * c + (b - a);
      mr = b;
    } else if (b != -INFINITY) {
      const A e = dev_exp(b - mr);
      sr += e;
      w += e * (b - a);
    }
  }
};

// tm_loss ------------------------------------------------------------------------------------

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
    const int64_t b = r / L;
    const A* p = per_sample ? pos + b * D : pos;
    const A* n = per_sample ? neg + b * D : neg;
    const T* hr = h + r * D;
    const Lab* lr = labels + r * label_row;
    SumCount<A> part = SumCount<A>::identity();
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      const A e = tm_element(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]);
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
    const int64_t b = r / L;
    const A* p = per_sample ? pos + b * D : pos;
    const A* n = per_sample ? neg + b * D : neg;
    const T* hr = h + r * D;
    const Lab* lr = labels + r * label_row;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      store_as(gr[d], sc * tm_slope(load_as<A>(hr[d]), label_at(lr, d), p[d], n[d]));
    }
  }
}

// kl_imitation -------------------------------------------------------------------------------

template <typename T>
__global__ void kl_fwd_kernel(const T* __restrict__ z, const T* __restrict__ z_ref, const uint8_t* __restrict__ mask,
                              int64_t N, int64_t V, double inv_t, double* __restrict__ loss,
                              double* __restrict__ lse, double* __restrict__ lse_ref) {
  using A = Acc<T>;
  const A it = static_cast<A>(inv_t);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T* zr = z + r * V;
    const T* qr = z_ref + r * V;
    KlPart<A> part = KlPart<A>::identity();
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) part.add(load_as<A>(zr[v]) * it, load_as<A>(qr[v]) * it);
    part = block_reduce(part);
    if (threadIdx.x == 0) {
      // lse for masked rows too: the backward reads it (with a zero incoming gradient), as on the CPU
      const A l = lse_of(part.m, part.s), lr = lse_of(part.mr, part.sr);
      lse[r] = l;
      lse_ref[r] = lr;
      loss[r] = (mask && !mask[r]) ? 0.0 : static_cast<double>(part.w / part.sr - lr + l);
    }
  }
}

template <typename T>
__global__ void kl_bwd_kernel(const T* __restrict__ z, const T* __restrict__ z_ref, const double* __restrict__ g,
                              const double* __restrict__ loss, const double* __restrict__ lse,
                              const double* __restrict__ lse_ref, int64_t N, int64_t V, double inv_t,
                              T* __restrict__ grad_z, T* __restrict__ grad_z_ref) {
  using A = Acc<T>;
  const A it = static_cast<A>(inv_t);
  for (int64_t r = blockIdx.x; r < N; r += gridDim.x) {
    const T* zr = z + r * V;
    const T* qr = z_ref + r * V;
    const A gr = static_cast<A>(g[r]) * it, l = static_cast<A>(lse[r]), lr = static_cast<A>(lse_ref[r]);
    const A kl = static_cast<A>(loss[r]);
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const A lp = load_as<A>(zr[v]) * it - l, lq = load_as<A>(qr[v]) * it - lr;
      const A eq = dev_exp(lq);
      if (grad_z) store_as(grad_z[r * V + v], gr * (dev_exp(lp) - eq));
      // p_ref = 0 at a -inf reference logit: gradient 0, not 0 * -inf
      if (grad_z_ref) store_as(grad_z_ref[r * V + v], lq > -INFINITY ? gr * eq * (lq - lp - kl) : A(0));
    }
  }
}

// feature_imitation --------------------------------------------------------------------------

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

template <typename T>
void kl_imitation_fwd_cuda(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                           double* loss, double* lse, double* lse_ref, std::uintptr_t stream) {
  if (N == 0) return;
  kl_fwd_kernel<T><<<row_blocks(N), row_threads(V), 0, as_stream(stream)>>>(z, z_ref, mask, N, V, inv_t, loss, lse,
                                                                            lse_ref);
  cuda_check(cudaGetLastError(), "retain::kl_imitation (CUDA forward)");
}

template <typename T>
void kl_imitation_bwd_cuda(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                           const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                           std::uintptr_t stream) {
  if (N == 0 || V == 0 || (!grad_z && !grad_z_ref)) return;
  kl_bwd_kernel<T><<<row_blocks(N), row_threads(V), 0, as_stream(stream)>>>(z, z_ref, g, loss, lse, lse_ref, N, V,
                                                                            inv_t, grad_z, grad_z_ref);
  cuda_check(cudaGetLastError(), "retain::kl_imitation (CUDA backward)");
}

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

#define RETAIN_INSTANTIATE_TM(T, Lab)                                                                          \
  template void tm_loss_fwd_cuda<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                 bool, const uint8_t*, int64_t, int64_t, int64_t, double*,      \
                                                 int64_t*, std::uintptr_t);                                     \
  template void tm_loss_bwd_cuda<T, Lab, Acc<T>>(const T*, const Lab*, int64_t, const Acc<T>*, const Acc<T>*,   \
                                                 bool, const uint8_t*, int64_t, int64_t, int64_t, const double*, \
                                                 T*, std::uintptr_t);
#define RETAIN_INSTANTIATE(T)                                                                                  \
  RETAIN_INSTANTIATE_TM(T, int8_t)                                                                             \
  RETAIN_INSTANTIATE_TM(T, uint8_t)                                                                            \
  template void kl_imitation_fwd_cuda<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, double, double*, \
                                         double*, double*, std::uintptr_t);                                    \
  template void kl_imitation_bwd_cuda<T>(const T*, const T*, const double*, const double*, const double*,       \
                                         const double*, int64_t, int64_t, double, T*, T*, std::uintptr_t);     \
  template void feature_imitation_fwd_cuda<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, int,        \
                                              double*, std::uintptr_t);                                        \
  template void feature_imitation_bwd_cuda<T>(const T*, const T*, const double*, const uint8_t*, int64_t,       \
                                              int64_t, int, T*, T*, std::uintptr_t);
RETAIN_INSTANTIATE(float)
RETAIN_INSTANTIATE(double)
RETAIN_INSTANTIATE(bf16_t)
RETAIN_INSTANTIATE(f16_t)
#undef RETAIN_INSTANTIATE
#undef RETAIN_INSTANTIATE_TM

}  // namespace retain::margin
