// CPU kernels of the gradient moments (fisher/grad_moments.h): chunks of one tensor split over
// threads; one fused pass for single gradients, sums over samples kept in L1 per block otherwise.
#include <algorithm>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "fisher/grad_moments.h"
#include "fisher/tensor_table_cpu.h"

namespace retain::fisher {
namespace {

constexpr int64_t kBlock = 512;  // elements whose sample sums stay in L1

// One gradient per element: a single fused pass (read g and the state, write the state).
template <int P, typename T, typename S>
void moments_single(const T* __restrict g, S* __restrict first, S* __restrict second, int64_t b, int64_t e,
                    double decay, double scale) {
  using A = FisherAcc<T, S>;
  const A dk = static_cast<A>(decay), sc = static_cast<A>(scale);
  if (first && second) {
#pragma omp simd
    for (int64_t j = b; j < e; ++j) {
      const A v = load_as<A>(g[j]);
      first[j] = static_cast<S>(dk * static_cast<A>(first[j]) + sc * v);
      second[j] = static_cast<S>(dk * static_cast<A>(second[j]) + sc * moment_term<P>(v));
    }
  } else if (second) {
#pragma omp simd
    for (int64_t j = b; j < e; ++j) {
      second[j] = static_cast<S>(dk * static_cast<A>(second[j]) + sc * moment_term<P>(load_as<A>(g[j])));
    }
  } else if (first) {
#pragma omp simd
    for (int64_t j = b; j < e; ++j) first[j] = static_cast<S>(dk * static_cast<A>(first[j]) + sc * load_as<A>(g[j]));
  }
}

// Several samples per element: per block of elements the samples' sums stay in L1 (one pass over
// each gradient row), then fold into the state in one read-modify-write. Only the sums of the
// lists present are kept.
template <int P, bool First, bool Second, typename T, typename S>
void moments_samples(const T* __restrict g, int64_t numel, int64_t samples, S* __restrict first,
                     S* __restrict second, int64_t b, int64_t e, double decay, double scale) {
  using A = FisherAcc<T, S>;
  const A dk = static_cast<A>(decay), sc = static_cast<A>(scale);
  alignas(64) A s1[kBlock];
  alignas(64) A s2[kBlock];
  for (int64_t b0 = b; b0 < e; b0 += kBlock) {
    const int64_t m = std::min(kBlock, e - b0);
    const T* __restrict g0 = g + b0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const A v = load_as<A>(g0[j]);
      if constexpr (First) s1[j] = v;
      if constexpr (Second) s2[j] = moment_term<P>(v);
    }
    for (int64_t s = 1; s < samples; ++s) {
      const T* __restrict gs = g0 + s * numel;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const A v = load_as<A>(gs[j]);
        if constexpr (First) s1[j] += v;
        if constexpr (Second) s2[j] += moment_term<P>(v);
      }
    }
    if constexpr (First) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) first[b0 + j] = static_cast<S>(dk * static_cast<A>(first[b0 + j]) + sc * s1[j]);
    }
    if constexpr (Second) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) second[b0 + j] = static_cast<S>(dk * static_cast<A>(second[b0 + j]) + sc * s2[j]);
    }
  }
}

template <int P, typename T, typename S>
void moments_chunk(const TensorTable& tab, const ChunkRange& r, int64_t samples, double decay, double scale) {
  const T* g = tab.ptr<const T>(0, r.tensor);
  S* first = tab.has(1) ? tab.ptr<S>(1, r.tensor) : nullptr;
  S* second = tab.has(2) ? tab.ptr<S>(2, r.tensor) : nullptr;
  if (samples == 0) {  // no gradient: the state only decays (sums of nothing are 0)
    for (S* x : {first, second}) {
      if (!x) continue;
#pragma omp simd
      for (int64_t j = r.begin; j < r.end; ++j) x[j] = static_cast<S>(decay * static_cast<double>(x[j]));
    }
  } else if (samples == 1) {
    moments_single<P>(g, first, second, r.begin, r.end, decay, scale);
  } else {
    const int64_t numel = tab.numel(r.tensor);
    if (first && second) moments_samples<P, true, true>(g, numel, samples, first, second, r.begin, r.end, decay, scale);
    else if (second) moments_samples<P, false, true>(g, numel, samples, first, second, r.begin, r.end, decay, scale);
    else moments_samples<P, true, false>(g, numel, samples, first, second, r.begin, r.end, decay, scale);
  }
}

}  // namespace

template <CpuCapability C, typename T, typename S>
void grad_moments_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double decay,
                      double scale, int power, int nthreads) {
  const TensorTable tab{table, n};
  (void)chunks;
  const int64_t bytes = samples * int64_t{sizeof(T)} + 2 * int64_t{sizeof(S)};
  for_each_chunk(tab, bytes, nthreads, [&](const ChunkRange& r, int64_t) {
    if (power == 2) moments_chunk<2, T, S>(tab, r, samples, decay, scale);
    else moments_chunk<1, T, S>(tab, r, samples, decay, scale);
  });
}

#define RETAIN_INSTANTIATE(T, S)                                                                          \
  template void grad_moments_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, int64_t, double, \
                                                  double, int, int);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
