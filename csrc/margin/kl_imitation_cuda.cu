// CUDA kernels of kl_imitation: one block per token (common/cuda_rows.cuh), its threads striding
// over the row's V logits; the forward is one pass (online maxima and rescaled sums, merged in a
// fixed order: deterministic). The per-row pieces are the CPU's (kl_imitation.h); derivations
// and the design are in csrc/margin/README.md.
#include <cmath>
#include <cstdint>

#include "common/cuda_rows.cuh"
#include "common/cuda_utils.cuh"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "margin/kl_imitation.h"

namespace retain::margin {
namespace {

__device__ __forceinline__ float dev_exp(float x) { return expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }

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

}  // namespace

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

#define RETAIN_INSTANTIATE(T)                                                                                  \
  template void kl_imitation_fwd_cuda<T>(const T*, const T*, const uint8_t*, int64_t, int64_t, double, double*, \
                                         double*, double*, std::uintptr_t);                                    \
  template void kl_imitation_bwd_cuda<T>(const T*, const T*, const double*, const double*, const double*,       \
                                         const double*, int64_t, int64_t, double, T*, T*, std::uintptr_t);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
