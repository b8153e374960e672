// CPU kernels of kl_imitation: rows of [N, V] logits split over threads, two passes over a row
// (its maxima, then the sums of exps with the row in L2); per-row results keep the loss
// independent of the thread count.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/buffer.h"
#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream_store.h"
#include "common/vec.h"
#include "margin/kl_imitation.h"

namespace retain::margin {
namespace {

// Rows of the KL loss. float/bfloat16/float16 rows run in explicit native-width float vectors
// (the auto-vectoriser left the exp loops scalar); a scalar tail handles the rest. double stays
// scalar.
template <typename T>
constexpr bool kVectorRows = !std::is_same_v<T, double>;

// max and min of z/T and z_ref/T over a row (T > 0: of z, then scaled). Selects ignore a NaN.
template <typename A>
struct KlRange {
  A m = -INFINITY, mr = -INFINITY, lo = INFINITY, lor = INFINITY;
};
template <typename T, typename A = Acc<T>>
RETAIN_FORCE_INLINE KlRange<A> kl_row_range(const T* __restrict zr, const T* __restrict qr, int64_t V, A it) {
  KlRange<A> k;
  int64_t Vv = 0;
  if constexpr (kVectorRows<T>) {
    Vv = V / kFloatLanes * kFloatLanes;
    VF vm = vsplat(-INFINITY), vmr = vm, vlo = vsplat(INFINITY), vlor = vlo;
    for (int64_t v = 0; v < Vv; v += kFloatLanes) {
      const VF a = vload_f(zr + v), b = vload_f(qr + v);
      vm = a > vm ? a : vm;
      vmr = b > vmr ? b : vmr;
      vlo = a < vlo ? a : vlo;
      vlor = b < vlor ? b : vlor;
    }
    k.m = vmax_lanes<float>(vm);
    k.mr = vmax_lanes<float>(vmr);
    k.lo = -vmax_lanes<float>(-vlo);
    k.lor = -vmax_lanes<float>(-vlor);
  }
  for (int64_t v = Vv; v < V; ++v) {
    const A a = load_as<A>(zr[v]), b = load_as<A>(qr[v]);
    k.m = a > k.m ? a : k.m;
    k.mr = b > k.mr ? b : k.mr;
    k.lo = a < k.lo ? a : k.lo;
    k.lor = b < k.lor ? b : k.lor;
  }
  k.m *= it, k.mr *= it, k.lo *= it, k.lor *= it;
  return k;
}

// Pass 2 of a row, with its maxima m and mr: s = sum exp(z/T - m), sr = sum exp(z_ref/T - mr)
// and w = sum exp(z_ref/T - mr) (z_ref - z)/T (accumulated without the 1/T, applied once). The
// pass is compute-bound (the row is in L2), so it fetches the next row (nz, nq) meanwhile for
// the memory-bound max pass, one prefetch per cache line. Keep: the exps are also stored,
// exp(z/T - m) to ea and exp(z_ref/T - mr) to eb.
template <typename A>
struct KlSums {
  A s = 0, sr = 0, w = 0;
};
// InRange: every z/T - m and z_ref/T - mr of the row is within [-86, 0] (kl_row_range), typical
// of logits, so the exps need no clamp and no z_ref is -inf (no guard on w): the same values in
// about four instructions fewer per vector, which is what the exp-bound AVX2 loop needs.
template <bool Keep, bool InRange, typename T, typename A>
RETAIN_FORCE_INLINE KlSums<A> kl_row_sums(const T* __restrict zr, const T* __restrict qr, const T* nz, const T* nq,
                                          int64_t V, A it, A m, A mr, A* __restrict ea, A* __restrict eb) {
  KlSums<A> k;
  const int64_t Vv = kVectorRows<T> ? V / kFloatLanes * kFloatLanes : 0;
  if constexpr (kVectorRows<T>) {
    VF vs{}, vsr{}, vw{};
    const VF zero{}, vit = vsplat<float>(it), vm = vsplat<float>(m), vmr = vsplat<float>(mr);
    const auto step = [&](int64_t v) __attribute__((always_inline)) {
      const VF a = vload_f(zr + v), b = vload_f(qr + v);
      const VF xa = InRange ? vexp_in_range(a * vit - vm) : vexp<true>(a * vit - vm);
      const VF xb = InRange ? vexp_in_range(b * vit - vmr) : vexp<true>(b * vit - vmr);
      if constexpr (Keep) {
        vstore(ea + v, xa);
        vstore(eb + v, xb);
      }
      vs += xa;
      vsr += xb;
      if constexpr (InRange) {
        vw += xb * (b - a);
      } else {
        vw += b > -INFINITY ? xb * (b - a) : zero;  // p_ref = 0 adds 0, not 0 * -inf
      }
    };
    // a cache line of T per prefetch (at least one vector)
    constexpr int64_t kLine = 64 / int64_t{sizeof(T)} > kFloatLanes ? 64 / int64_t{sizeof(T)} : kFloatLanes;
    int64_t v = 0;
    for (; v + kLine <= Vv; v += kLine) {
      __builtin_prefetch(nz + v);
      __builtin_prefetch(nq + v);
#pragma GCC unroll 16
      for (int64_t j = 0; j < kLine; j += kFloatLanes) step(v + j);
    }
    for (; v < Vv; v += kFloatLanes) step(v);
    k.s = vsum<float>(vs);
    k.sr = vsum<float>(vsr);
    k.w = vsum<float>(vw);
  }
  for (int64_t v = Vv; v < V; ++v) {
    const A a = load_as<A>(zr[v]), b = load_as<A>(qr[v]);
    const A xa = exp_vec(a * it - m), xb = exp_vec(b * it - mr);
    if constexpr (Keep) ea[v] = xa, eb[v] = xb;
    k.s += xa;
    k.sr += xb;
    k.w += b > -INFINITY ? xb * (b - a) : A(0);
  }
  k.w *= it;
  return k;
}

// Forward rows: m = max z/T (pass 1), then s = sum exp(z/T - m), sr = sum exp(z_ref/T - mr) and
// w = sum exp(z_ref/T - mr) (z_ref - z)/T (pass 2, the row is in L2 by then):
// KL = w / sr - lse_ref + lse.
// Grad: the gradient of the reduced loss fused in (kl_imitation_fwd_grad_cpu): pass 2 keeps
// exp(z/T - m) and exp(z_ref/T - mr) in `scratch` (2 V accumulation-type values, L2-resident next
// to the row), pass 3 turns them into p and p_ref and writes the gradients (streamed past the
// caches when `stream`).
template <bool Grad, typename T>
RETAIN_FORCE_INLINE void kl_fwd_rows(const T* __restrict z, const T* __restrict z_ref, const uint8_t* __restrict mask,
                                     int64_t V, double inv_t, double grad_scale, double* __restrict loss,
                                     double* __restrict lse, double* __restrict lse_ref, T* __restrict grad_z,
                                     T* __restrict grad_z_ref, bool stream, Acc<T>* __restrict scratch, int64_t r0,
                                     int64_t r1) {
  using A = Acc<T>;
  const A it = static_cast<A>(inv_t);
  // float32 gradients: exp(z/T - m) goes straight into the gradient row, which pass 3 turns into
  // the gradient in place (the row's read-for-ownership happens during the compute-bound exp
  // pass, and its write-back whenever the line leaves the cache, instead of a separate streaming
  // phase after it); other dtypes go through the scratch row and store_row
  constexpr bool kInPlace = std::is_same_v<T, A>;
  A* __restrict eb = Grad ? scratch + V : nullptr;
  for (int64_t r = r0; r < r1; ++r) {
    const T* __restrict zr = z + r * V;
    const T* __restrict qr = z_ref + r * V;
    A* __restrict ea = scratch;
    if constexpr (Grad && kInPlace) {
      if (grad_z) ea = reinterpret_cast<A*>(grad_z + r * V);
    }
    const KlRange<A> range = kl_row_range(zr, qr, V, it);
    const A m = range.m, mr = range.mr;
    const T* nz = r + 1 < r1 ? zr + V : zr;
    const T* nq = r + 1 < r1 ? qr + V : qr;
    // -86, not -87, and |z/T| < 2^20: the loop's a/T - m (one fused rounding) then differs from
    // lo - m by far less than 1; false for an infinite bound (which takes the clamped, guarded loop)
    constexpr A kBig = A(1 << 20);
    const bool in_range = range.lo - m >= A(-86) && range.lor - mr >= A(-86) && range.lo > -kBig &&
                          range.lor > -kBig && m < kBig && mr < kBig;
    const auto [s, sr, w] = in_range ? kl_row_sums<Grad, true>(zr, qr, nz, nq, V, it, m, mr, ea, eb)
                                     : kl_row_sums<Grad, false>(zr, qr, nz, nq, V, it, m, mr, ea, eb);
    const A l = lse_of(m, s), lr = lse_of(mr, sr);
    const bool off = mask && !mask[r];
    const A kl = w / sr - lr + l;
    lse[r] = l;
    lse_ref[r] = lr;
    loss[r] = off ? 0.0 : static_cast<double>(kl);
    if constexpr (Grad) {
      const A c = off ? A(0) : static_cast<A>(grad_scale) * it;
      const A is = A(1) / s, isr = A(1) / sr;
      if (grad_z) {
        // p - p_ref from the kept exps, written over ea (grad_z_ref below needs only eb)
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) ea[v] = c * (ea[v] * is - eb[v] * isr);
        if (!kInPlace) store_row(grad_z + r * V, ea, V, stream);
      }
      if (grad_z_ref) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) {
          const A lp = load_as<A>(zr[v]) * it - l, lq = load_as<A>(qr[v]) * it - lr;
          eb[v] = lq > -INFINITY ? c * (eb[v] * isr) * (lq - lp - kl) : A(0);
        }
        store_row(grad_z_ref + r * V, eb, V, stream);
      }
    }
  }
  stream_fence(stream);
}

// grad_z = g/T (p - p_ref), grad_z_ref = g/T p_ref (log p_ref - log p - KL): one loop per row
// for whichever are wanted, sharing the exps when both are.
template <typename T, bool WantZ, bool WantRef>
RETAIN_FORCE_INLINE void kl_bwd_row(const T* __restrict zr, const T* __restrict qr, int64_t V, float it, float gr,
                                    float l, float lr, float kl, T* __restrict gz, T* __restrict gq) {
  const VF vit = vsplat(it), vgr = vsplat(gr), vl = vsplat(l), vlr = vsplat(lr), vkl = vsplat(kl);
  const int64_t Vv = V / kFloatLanes * kFloatLanes;
  for (int64_t v = 0; v < Vv; v += kFloatLanes) {
    const VF lp = vload_f(zr + v) * vit - vl, lq = vload_f(qr + v) * vit - vlr;
    const VF eq = vexp<true>(lq);
    if constexpr (WantZ) vstore_f(gz + v, vgr * (vexp<true>(lp) - eq));
    if constexpr (WantRef) vstore_f(gq + v, lq > -INFINITY ? vgr * eq * (lq - lp - vkl) : VF{});
  }
  for (int64_t v = Vv; v < V; ++v) {
    const float lp = load_as<float>(zr[v]) * it - l, lq = load_as<float>(qr[v]) * it - lr;
    const float eq = exp_vec(lq);
    if constexpr (WantZ) store_as(gz[v], gr * (exp_vec(lp) - eq));
    if constexpr (WantRef) store_as(gq[v], lq > -INFINITY ? gr * eq * (lq - lp - kl) : 0.0f);
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
    T* gz = grad_z ? grad_z + r * V : nullptr;
    T* gq = grad_z_ref ? grad_z_ref + r * V : nullptr;
    if constexpr (kVectorRows<T>) {
      if (gz && gq) kl_bwd_row<T, true, true>(zr, qr, V, it, gr, l, lr, kl, gz, gq);
      else if (gz) kl_bwd_row<T, true, false>(zr, qr, V, it, gr, l, lr, kl, gz, gq);
      else if (gq) kl_bwd_row<T, false, true>(zr, qr, V, it, gr, l, lr, kl, gz, gq);
    } else {
      for (int64_t v = 0; v < V; ++v) {
        const A lp = load_as<A>(zr[v]) * it - l, lq = load_as<A>(qr[v]) * it - lr;
        const A eq = exp_vec(lq);
        if (gz) store_as(gz[v], gr * (exp_vec(lp) - eq));
        if (gq) store_as(gq[v], lq > -INFINITY ? gr * eq * (lq - lp - kl) : A(0));
      }
    }
  }
}

}  // namespace

template <CpuCapability C, typename T>
void kl_imitation_fwd_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                          double* loss, double* lse, double* lse_ref, int nthreads) {
  parallel_for(N, V * 16, nthreads, [&](int64_t r0, int64_t r1) {
    kl_fwd_rows<false>(z, z_ref, mask, V, inv_t, 0.0, loss, lse, lse_ref, static_cast<T*>(nullptr),
                       static_cast<T*>(nullptr), false, static_cast<Acc<T>*>(nullptr), r0, r1);
  });
}

template <CpuCapability C, typename T>
void kl_imitation_bwd_cpu(const T* z, const T* z_ref, const double* g, const double* loss, const double* lse,
                          const double* lse_ref, int64_t N, int64_t V, double inv_t, T* grad_z, T* grad_z_ref,
                          int nthreads) {
  parallel_for(N, V * 16, nthreads, [&](int64_t r0, int64_t r1) {
    kl_bwd_rows<T>(z, z_ref, g, loss, lse, lse_ref, V, inv_t, grad_z, grad_z_ref, r0, r1);
  });
}

template <CpuCapability C, typename T>
void kl_imitation_fwd_grad_cpu(const T* z, const T* z_ref, const uint8_t* mask, int64_t N, int64_t V, double inv_t,
                               double grad_scale, double* loss, double* lse, double* lse_ref, T* grad_z,
                               T* grad_z_ref, int nthreads) {
  // stream the gradients when they are far larger than the caches (and a row starts aligned)
  const bool stream = N * V * int64_t{sizeof(T)} >= (int64_t{16} << 20) && (V * int64_t{sizeof(T)}) % 64 == 0;
  parallel_for(N, V * 24, nthreads, [&](int64_t r0, int64_t r1) {
    Buffer<Acc<T>> scratch(2 * V);
    kl_fwd_rows<true>(z, z_ref, mask, V, inv_t, grad_scale, loss, lse, lse_ref, grad_z, grad_z_ref, stream,
                      scratch.data(), r0, r1);
  });
}

#define RETAIN_INSTANTIATE(T)                                                                                  \
  template void kl_imitation_fwd_grad_cpu<kThisCpu, T>(const T*, const T*, const uint8_t*, int64_t, int64_t, double,       \
                                             double, double*, double*, double*, T*, T*, int);                  \
  template void kl_imitation_fwd_cpu<kThisCpu, T>(const T*, const T*, const uint8_t*, int64_t, int64_t, double, double*,  \
                                        double*, double*, int);                                                \
  template void kl_imitation_bwd_cpu<kThisCpu, T>(const T*, const T*, const double*, const double*, const double*,        \
                                        const double*, int64_t, int64_t, double, T*, T*, int);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::margin
