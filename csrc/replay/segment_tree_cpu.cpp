// CPU kernels of replay/segment_tree.h: updates in order (so the last of repeated indices wins),
// samples in parallel (independent descents).
#include <cstdint>

#include "common/cpu_capability.h"
#include "common/parallel.h"
#include "replay/segment_tree.h"

namespace retain::replay {

template <CpuCapability C>
void tree_update_cpu(TreeOp op, double* tree, int64_t leaves, const int64_t* idx, const double* values, int64_t k,
                     int) {
  for (int64_t j = 0; j < k; ++j) {
    int64_t node = leaves + idx[j];
    tree[node] = values[j];
    for (node >>= 1; node >= 1; node >>= 1) tree[node] = tree_combine(op, tree[2 * node], tree[2 * node + 1]);
  }
}

template <CpuCapability C>
void tree_sample_cpu(const double* tree, int64_t leaves, const double* u, int64_t n, bool stratified, int64_t* idx,
                     double* prob, int nthreads) {
  const double total = tree[1];
  int64_t depth = 1;
  for (int64_t p = leaves; p > 1; p >>= 1) ++depth;
  parallel_for(n, 8 * depth, nthreads, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = tree_find(tree, leaves, tree_target(total, u[j], j, n, stratified));
      idx[j] = i;
      prob[j] = tree[leaves + i] / total;
    }
  });
}

template void tree_update_cpu<kThisCpu>(TreeOp, double*, int64_t, const int64_t*, const double*, int64_t, int);
template void tree_sample_cpu<kThisCpu>(const double*, int64_t, const double*, int64_t, bool, int64_t*, double*, int);

}  // namespace retain::replay
