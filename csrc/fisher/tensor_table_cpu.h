// The CPU side of the fisher kernels' chunked lists (fisher/tensor_table.h): chunks split over
// threads in contiguous runs, and the partial sums of a reduction combined in chunk order.
#pragma once

#include <cstdint>

#include "common/parallel.h"
#include "fisher/tensor_table.h"

#if !defined(RETAIN_CPU_CAPABILITY)
#error "fisher/tensor_table_cpu.h is for CPU kernel translation units"
#endif

namespace retain::fisher {

// fn(ChunkRange, c) for every chunk c; `bytes_per_element` is the traffic of one element, which
// sizes the serial cutoff.
template <typename Fn>
void for_each_chunk(const TensorTable& tab, int64_t bytes_per_element, int nthreads, const Fn& fn) {
  parallel_for(tab.chunks(), kChunk * bytes_per_element / 4, nthreads, [&](int64_t c0, int64_t c1) {
    int64_t i = tab.tensor_of(c0);
    for (int64_t c = c0; c < c1; ++c) {
      while (i + 1 < tab.n && tab.first_chunk(i + 1) <= c) ++i;  // skips empty tensors (no chunk)
      fn(chunk_range(tab, c, i), c);
    }
  });
}

// out[r] = sum over chunks c, in order, of partials[c * R + r].
inline void sum_partials(const double* partials, int64_t chunks, int64_t R, double* out) {
  for (int64_t r = 0; r < R; ++r) out[r] = 0.0;
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t r = 0; r < R; ++r) out[r] += partials[c * R + r];
}

}  // namespace retain::fisher
