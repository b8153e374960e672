// parallel_for over OpenMP with the thread count chosen in Python (torch.get_num_threads()).
#pragma once

#include <algorithm>
#include <cstdint>

#include <omp.h>

namespace retain {

// Calls fn(begin, end) on contiguous ranges of [0, n). Runs serially when the work is tiny
// (n * cost_per_item below ~32k operations) or one thread is asked for, so small calls pay no
// fork/join.
template <typename Fn>
void parallel_for(int64_t n, int64_t cost_per_item, int nthreads, const Fn& fn) {
  if (n <= 0) return;
  constexpr int64_t kSerialWork = 1 << 15;
  const int64_t max_useful = std::max<int64_t>(1, (n * std::max<int64_t>(cost_per_item, 1)) / kSerialWork);
  const int threads = static_cast<int>(std::min<int64_t>({static_cast<int64_t>(std::max(nthreads, 1)), n, max_useful}));
  if (threads <= 1) {
    fn(int64_t{0}, n);
    return;
  }
#pragma omp parallel num_threads(threads)
  {
    const int64_t tid = omp_get_thread_num();
    const int64_t nt = omp_get_num_threads();
    const int64_t chunk = (n + nt - 1) / nt;
    const int64_t begin = tid * chunk;
    const int64_t end = std::min(n, begin + chunk);
    if (begin < end) fn(begin, end);
  }
}

inline bool openmp_enabled() { return true; }
inline int openmp_max_threads() { return omp_get_max_threads(); }

}  // namespace retain
