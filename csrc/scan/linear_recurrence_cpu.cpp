// CPU kernels of the scan family. The recurrence is sequential in T, so work is split over
// (sequence, feature block) units; inside a unit the state of one feature block lives in a
// stack buffer and the inner loop over features vectorises.
#include <algorithm>
#include <type_traits>

#include "common/cpu_capability.h"
#include "common/dispatch.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "common/stream_store.h"
#include "scan/linear_recurrence.h"

namespace retain::scan {
namespace {

constexpr int64_t kMaxBlock = 1024;  // features per unit: the state buffer stays in L1
constexpr int64_t kMinBlock = 64;    // smaller blocks waste the hardware prefetcher

// Features per unit: whole rows when there are enough sequences to feed every thread,
// otherwise halve the block until there are about four units per thread.
int64_t feature_block(int64_t B, int64_t D, int nthreads) {
  int64_t block = std::min(D, kMaxBlock);
  while (B * ((D + block - 1) / block) < 4 * int64_t{nthreads} && block > kMinBlock) {
    block = std::max(kMinBlock, ((block / 2 + 15) / 16) * 16);
  }
  return std::max<int64_t>(block, 1);
}

// Outputs larger than the caches are written with non-temporal stores: no read-for-ownership
// of lines that will be overwritten whole, a quarter less memory traffic in the forward.
template <typename T>
bool streaming_stores(int64_t numel) {
  return (std::is_same_v<T, float> || std::is_same_v<T, double>) && numel * int64_t{sizeof(T)} >= (int64_t{16} << 20);
}

// Forward of units [u0, u1): (sequence, feature block) pairs.
template <typename T>
RETAIN_FORCE_INLINE void fwd_units(const T* __restrict a, const T* __restrict x, const T* __restrict initial,
                                   T* __restrict h, int64_t Tn, int64_t D, bool reverse, int64_t block,
                                   bool stream, int64_t u0, int64_t u1) {
  using A = Acc<T>;
  const int64_t nblocks = (D + block - 1) / block;
  A state[kMaxBlock];
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / nblocks;
    const int64_t d0 = (u % nblocks) * block;
    const int64_t n = std::min(block, D - d0);
    for (int64_t i = 0; i < n; ++i) state[i] = initial ? load_as<A>(initial[b * D + d0 + i]) : A(0);
    for (int64_t p = 0; p < Tn; ++p) {
      const int64_t off = step_offset(b, p, Tn, D, reverse) + d0;
      const T* __restrict ap = a + off;
      const T* __restrict xp = x + off;
      T* __restrict hp = h + off;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) state[i] = linear_step(load_as<A>(ap[i]), state[i], load_as<A>(xp[i]));
      store_row(hp, state, n, stream);
    }
  }
  stream_fence(stream);
}

// Backward of units [u0, u1).
template <typename T>
RETAIN_FORCE_INLINE void bwd_units(const T* __restrict a, const T* __restrict h, const T* __restrict initial,
                                   const T* __restrict grad_h, T* __restrict grad_x, T* __restrict grad_a,
                                   T* __restrict grad_initial, int64_t Tn, int64_t D, bool reverse, int64_t block,
                                   bool stream, int64_t u0, int64_t u1) {
  using A = Acc<T>;
  const int64_t nblocks = (D + block - 1) / block;
  A lambda[kMaxBlock];  // dL/dx_t = dL/dh_t + a_{t+1} * lambda_{t+1}
  A a_next[kMaxBlock];  // a of the step after this one in scan order (0 past the end)
  A ga[kMaxBlock];
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t b = u / nblocks;
    const int64_t d0 = (u % nblocks) * block;
    const int64_t n = std::min(block, D - d0);
    for (int64_t i = 0; i < n; ++i) lambda[i] = a_next[i] = A(0);
    for (int64_t p = Tn - 1; p >= 0; --p) {
      const int64_t off = step_offset(b, p, Tn, D, reverse) + d0;
      const T* __restrict ap = a + off;
      const T* __restrict ghp = grad_h + off;
      T* __restrict gxp = grad_x + off;
      // dL/da_t = lambda_t * h_{t-1}, with h before the first step = initial (or 0)
      const T* __restrict hprev = p > 0 ? h + step_offset(b, p - 1, Tn, D, reverse) + d0
                                        : (initial ? initial + b * D + d0 : nullptr);
      if (hprev) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const A l = linear_step(a_next[i], lambda[i], load_as<A>(ghp[i]));
          lambda[i] = l;
          ga[i] = l * load_as<A>(hprev[i]);
          a_next[i] = load_as<A>(ap[i]);
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          lambda[i] = linear_step(a_next[i], lambda[i], load_as<A>(ghp[i]));
          ga[i] = A(0);
          a_next[i] = load_as<A>(ap[i]);
        }
      }
      store_row(gxp, lambda, n, stream);
      if (grad_a) store_row(grad_a + off, ga, n, stream);
    }
    if (grad_initial) {
      for (int64_t i = 0; i < n; ++i) store_as(grad_initial[b * D + d0 + i], a_next[i] * lambda[i]);
    }
  }
  stream_fence(stream);
}

}  // namespace

template <CpuCapability C, typename T>
void linear_recurrence_fwd_cpu(const T* a, const T* x, const T* initial, T* h, int64_t B, int64_t Tn, int64_t D,
                               bool reverse, int nthreads) {
  const int64_t block = feature_block(B, D, nthreads);
  const int64_t nblocks = (D + block - 1) / block;
  parallel_for(B * nblocks, Tn * block, nthreads, [&](int64_t u0, int64_t u1) {
    fwd_units(a, x, initial, h, Tn, D, reverse, block, streaming_stores<T>(B * Tn * D), u0, u1);
  });
}

template <CpuCapability C, typename T>
void linear_recurrence_bwd_cpu(const T* a, const T* h, const T* initial, const T* grad_h, T* grad_x, T* grad_a,
                               T* grad_initial, int64_t B, int64_t Tn, int64_t D, bool reverse, int nthreads) {
  const int64_t block = feature_block(B, D, nthreads);
  const int64_t nblocks = (D + block - 1) / block;
  parallel_for(B * nblocks, Tn * block * 2, nthreads, [&](int64_t u0, int64_t u1) {
    bwd_units(a, h, initial, grad_h, grad_x, grad_a, grad_initial, Tn, D, reverse, block,
                  streaming_stores<T>(B * Tn * D), u0, u1);
  });
}

#define RETAIN_INSTANTIATE(T)                                                                          \
  template void linear_recurrence_fwd_cpu<kThisCpu, T>(const T*, const T*, const T*, T*, int64_t, int64_t, int64_t, \
                                             bool, int);                                               \
  template void linear_recurrence_bwd_cpu<kThisCpu, T>(const T*, const T*, const T*, const T*, T*, T*, T*, int64_t,  \
                                             int64_t, int64_t, bool, int);
RETAIN_FOR_EACH_FLOATING(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::scan
