// CPU kernels of the EWC penalty (fisher/ewc_penalty.h): the forward's two sums per chunk, summed
// in blocks in the accumulation type and the blocks in double, the chunks in chunk order; the
// backward one streaming pass that writes (or adds into) the gradient, optionally also summing the
// diagonal term so that ewc_penalty_grad_ without mu reads every tensor once.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "fisher/ewc_penalty.h"
#include "fisher/tensor_table_cpu.h"

namespace retain::fisher {
namespace {

constexpr int64_t kBlock = 256;

template <typename T, typename S>
void fwd_chunk(const TensorTable& tab, const ChunkRange& r, double* __restrict part) {
  using A = FisherAcc<T, S>;
  const EwcTensors<T, S> e(tab, r.tensor);
  const T* __restrict p = e.p;
  const T* __restrict q = e.q;
  const S* __restrict f = e.f;
  const S* __restrict mu = e.mu;
  double sf = 0.0, sm = 0.0;
  for (int64_t b0 = r.begin; b0 < r.end; b0 += kBlock) {
    const int64_t m = std::min(kBlock, r.end - b0);
    A af = 0, am = 0;
    if (f && mu) {
#pragma omp simd reduction(+ : af, am)
      for (int64_t j = b0; j < b0 + m; ++j) {
        const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
        af += static_cast<A>(f[j]) * d * d;
        am += static_cast<A>(mu[j]) * d;
      }
    } else if (f) {
#pragma omp simd reduction(+ : af)
      for (int64_t j = b0; j < b0 + m; ++j) {
        const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
        af += static_cast<A>(f[j]) * d * d;
      }
    } else if (mu) {
#pragma omp simd reduction(+ : am)
      for (int64_t j = b0; j < b0 + m; ++j) am += static_cast<A>(mu[j]) * (load_as<A>(p[j]) - load_as<A>(q[j]));
    }
    sf += static_cast<double>(af);
    sm += static_cast<double>(am);
  }
  part[0] = sf;
  part[1] = sm;
}

template <bool Accumulate, bool HasF, bool HasMu, typename T, typename S>
void bwd_chunk(const TensorTable& tab, const ChunkRange& r, double a_, double b_, double* __restrict part) {
  using A = FisherAcc<T, S>;
  const EwcTensors<T, S> e(tab, r.tensor);
  const T* __restrict p = e.p;
  const T* __restrict q = e.q;
  const S* __restrict f = e.f;
  const S* __restrict mu = e.mu;
  T* __restrict g = tab.ptr<T>(kGrad, r.tensor);
  const A a = static_cast<A>(a_), b = static_cast<A>(b_);
  double sf = 0.0;
  for (int64_t b0 = r.begin; b0 < r.end; b0 += kBlock) {
    const int64_t m = std::min(kBlock, r.end - b0);
    A af = 0;
#pragma omp simd reduction(+ : af)
    for (int64_t j = b0; j < b0 + m; ++j) {
      const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
      const A fj = HasF ? static_cast<A>(f[j]) : A(0);
      const A mj = HasMu ? static_cast<A>(mu[j]) : A(0);
      A v = ewc_grad_element(d, fj, mj, a, b, HasF, HasMu);
      if constexpr (Accumulate) v += load_as<A>(g[j]);
      store_as(g[j], v);
      if constexpr (HasF) af += fj * d * d;
    }
    sf += static_cast<double>(af);
  }
  if (part) {
    part[0] = sf;
    part[1] = 0.0;
  }
}

template <typename T, typename S>
void bwd_dispatch(const TensorTable& tab, const ChunkRange& r, double a, double b, bool accumulate, double* part) {
  const bool f = tab.has(kDiag), mu = tab.has(kMu);
  auto run = [&](auto acc, auto hf, auto hm) {
    bwd_chunk<decltype(acc)::value, decltype(hf)::value, decltype(hm)::value, T, S>(tab, r, a, b, part);
  };
  using Y = std::true_type;
  using N = std::false_type;
  if (accumulate) {
    if (f && mu) run(Y{}, Y{}, Y{});
    else if (f) run(Y{}, Y{}, N{});
    else run(Y{}, N{}, Y{});
  } else {
    if (f && mu) run(N{}, Y{}, Y{});
    else if (f) run(N{}, Y{}, N{});
    else run(N{}, N{}, Y{});
  }
}

}  // namespace

template <CpuCapability C, typename T, typename S>
void ewc_penalty_fwd_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double* partials, double* sums,
                         int nthreads) {
  const TensorTable tab{table, n};
  const int64_t bytes = 2 * int64_t{sizeof(T)} + 2 * int64_t{sizeof(S)};
  for_each_chunk(tab, bytes, nthreads, [&](const ChunkRange& r, int64_t c) { fwd_chunk<T, S>(tab, r, partials + 2 * c); });
  sum_partials(partials, chunks, 2, sums);
}

template <CpuCapability C, typename T, typename S>
void ewc_penalty_bwd_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, const double* coef,
                         bool accumulate, double* partials, double* sums, int nthreads) {
  const TensorTable tab{table, n};
  const double a = coef[0], b = coef[1];
  const int64_t bytes = 4 * int64_t{sizeof(T)} + 2 * int64_t{sizeof(S)};
  for_each_chunk(tab, bytes, nthreads, [&](const ChunkRange& r, int64_t c) {
    bwd_dispatch<T, S>(tab, r, a, b, accumulate, partials ? partials + 2 * c : nullptr);
  });
  if (partials) sum_partials(partials, chunks, 2, sums);
}

#define RETAIN_INSTANTIATE(T, S)                                                                                   \
  template void ewc_penalty_fwd_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, double*, double*, \
                                                     int);                                                          \
  template void ewc_penalty_bwd_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, const double*,    \
                                                     bool, double*, double*, int);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
