// CPU kernels of the gradient moments (fisher/grad_moments.h): chunks of one tensor split over
// threads; per block of elements the samples' sums are kept in the accumulation type, then folded
// into the state lists in one read-modify-write.
#include <algorithm>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "fisher/grad_moments.h"
#include "fisher/tensor_table_cpu.h"

namespace retain::fisher {
namespace {

constexpr int64_t kBlock = 512;  // elements whose sample sums stay in L1

template <int P, typename T, typename S>
void moments_chunk(const TensorTable& tab, const ChunkRange& r, int64_t samples, double decay, double scale) {
  using A = FisherAcc<T, S>;
  const int64_t numel = tab.numel(r.tensor);
  const T* __restrict g = tab.ptr<const T>(0, r.tensor);
  S* __restrict first = tab.has(1) ? tab.ptr<S>(1, r.tensor) : nullptr;
  S* __restrict second = tab.has(2) ? tab.ptr<S>(2, r.tensor) : nullptr;
  const A dk = static_cast<A>(decay), sc = static_cast<A>(scale);
  alignas(64) A s1[kBlock];
  alignas(64) A s2[kBlock];
  for (int64_t b0 = r.begin; b0 < r.end; b0 += kBlock) {
    const int64_t m = std::min(kBlock, r.end - b0);
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) s1[j] = s2[j] = A(0);
    for (int64_t s = 0; s < samples; ++s) {
      const T* __restrict gs = g + s * numel + b0;
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) {
        const A v = load_as<A>(gs[j]);
        s1[j] += v;
        s2[j] += moment_term<P>(v);
      }
    }
    if (first) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) first[b0 + j] = static_cast<S>(dk * static_cast<A>(first[b0 + j]) + sc * s1[j]);
    }
    if (second) {
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) second[b0 + j] = static_cast<S>(dk * static_cast<A>(second[b0 + j]) + sc * s2[j]);
    }
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
