// CPU kernel of the rank-1 projections (fisher/rank1_dots.h): per chunk and sample a dot product
// summed in blocks in the accumulation type and the blocks in double; the chunks' partials are
// summed in chunk order.
#include <algorithm>
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "fisher/rank1_dots.h"
#include "fisher/tensor_table_cpu.h"

namespace retain::fisher {
namespace {

constexpr int64_t kBlock = 256;

template <typename T, typename S>
void dots_chunk(const TensorTable& tab, const ChunkRange& r, int64_t samples, double* __restrict part) {
  using A = FisherAcc<T, S>;
  const int64_t numel = tab.numel(r.tensor);
  const S* __restrict mu = tab.ptr<const S>(0, r.tensor);
  const T* __restrict g = tab.ptr<const T>(1, r.tensor);
  for (int64_t s = 0; s < samples; ++s) {
    const T* __restrict gs = g + s * numel;
    double total = 0.0;
    for (int64_t b0 = r.begin; b0 < r.end; b0 += kBlock) {
      const int64_t m = std::min(kBlock, r.end - b0);
      A acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < m; ++j) acc += static_cast<A>(mu[b0 + j]) * load_as<A>(gs[b0 + j]);
      total += static_cast<double>(acc);
    }
    part[s] = total;
  }
}

}  // namespace

template <CpuCapability C, typename T, typename S>
void rank1_dots_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int64_t samples, double* partials,
                    double* dots, int nthreads) {
  const TensorTable tab{table, n};
  for_each_chunk(tab, samples * int64_t{sizeof(T)} + int64_t{sizeof(S)}, nthreads,
                 [&](const ChunkRange& r, int64_t c) { dots_chunk<T, S>(tab, r, samples, partials + c * samples); });
  sum_partials(partials, chunks, samples, dots);
}

#define RETAIN_INSTANTIATE(T, S)                                                                            \
  template void rank1_dots_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, int64_t, double*, \
                                                double*, int);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
