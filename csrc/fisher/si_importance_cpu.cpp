// CPU kernels of Synaptic Intelligence (fisher/si_importance.h): elementwise passes over chunks.
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/dtype.h"
#include "fisher/si_importance.h"
#include "fisher/tensor_table_cpu.h"

namespace retain::fisher {

template <CpuCapability C, typename T, typename S>
void si_accumulate_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, int nthreads) {
  using A = FisherAcc<T, S>;
  const TensorTable tab{table, n};
  (void)chunks;
  for_each_chunk(tab, 3 * int64_t{sizeof(T)} + 2 * int64_t{sizeof(S)}, nthreads, [&](const ChunkRange& r, int64_t) {
    S* __restrict w = tab.ptr<S>(0, r.tensor);
    const T* __restrict g = tab.ptr<const T>(1, r.tensor);
    const T* __restrict p0 = tab.ptr<const T>(2, r.tensor);
    const T* __restrict p1 = tab.ptr<const T>(3, r.tensor);
#pragma omp simd
    for (int64_t j = r.begin; j < r.end; ++j) {
      w[j] = static_cast<S>(si_step(static_cast<A>(w[j]), load_as<A>(g[j]), load_as<A>(p0[j]), load_as<A>(p1[j])));
    }
  });
}

template <CpuCapability C, typename T, typename S>
void si_consolidate_cpu(Types<T, S>, const int64_t* table, int64_t n, int64_t chunks, double xi, bool reset,
                        int nthreads) {
  using A = FisherAcc<T, S>;
  const TensorTable tab{table, n};
  (void)chunks;
  const A x = static_cast<A>(xi);
  for_each_chunk(tab, 2 * int64_t{sizeof(T)} + 4 * int64_t{sizeof(S)}, nthreads, [&](const ChunkRange& r, int64_t) {
    S* __restrict big = tab.ptr<S>(0, r.tensor);
    S* __restrict w = tab.ptr<S>(1, r.tensor);
    const T* __restrict p = tab.ptr<const T>(2, r.tensor);
    const T* __restrict q = tab.ptr<const T>(3, r.tensor);
#pragma omp simd
    for (int64_t j = r.begin; j < r.end; ++j) {
      const A d = load_as<A>(p[j]) - load_as<A>(q[j]);
      big[j] = static_cast<S>(si_importance(static_cast<A>(big[j]), static_cast<A>(w[j]), d, x));
      if (reset) w[j] = S(0);
    }
  });
}

#define RETAIN_INSTANTIATE(T, S)                                                                                 \
  template void si_accumulate_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, int);            \
  template void si_consolidate_cpu<kThisCpu, T, S>(Types<T, S>, const int64_t*, int64_t, int64_t, double, bool, int);
RETAIN_FISHER_FOR_EACH(RETAIN_INSTANTIATE)
#undef RETAIN_INSTANTIATE

}  // namespace retain::fisher
