// Sum and min trees over `capacity` priorities for prioritized replay. Layout: a complete binary
// tree in one float64 array of 2P nodes, P the least power of two >= capacity; node 1 is the root,
// node v has children 2v and 2v + 1, leaf i is node P + i; leaves past the capacity hold the
// operation's identity (0 for sums, +inf for minima). float64 throughout: float32 sums drift over
// millions of updates until zero-priority items get sampled. Updates rewrite only the paths of the
// changed leaves (O(k log P)); sampling descends from the root. csrc/replay/README.md derives both.
#pragma once

#include <cstdint>

#include "common/cpu_capability.h"
#include "common/host_device.h"

namespace retain::replay {

enum class TreeOp : int { kSum = 0, kMin = 1 };

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE double tree_combine(TreeOp op, double a, double b) {
  return op == TreeOp::kSum ? a + b : (b < a ? b : a);
}

// The leaf at which the prefix sum first exceeds `target`, never a leaf of priority 0: a child with
// sum 0 is never entered, so rounding that pushes the target past a boundary (or past the total) lands
// on the nearest positive leaf instead.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE int64_t tree_find(const double* tree, int64_t leaves, double target) {
  int64_t node = 1;
  while (node < leaves) {
    const double left = tree[2 * node];
    const double right = tree[2 * node + 1];
    if (left > 0 && (target < left || !(right > 0))) {
      node = 2 * node;
    } else {
      target -= left;
      node = 2 * node + 1;
    }
  }
  return node - leaves;
}

// The sample's target prefix sum: stratum j of n, (j + u) * total / n, or u * total for i.i.d. draws.
RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE double tree_target(double total, double u, int64_t j, int64_t n,
                                                          bool stratified) {
  return stratified ? (static_cast<double>(j) + u) * (total / static_cast<double>(n)) : u * total;
}

// Sets leaves idx[0..k) to values (the last of repeated indices wins) and rewrites their paths.
template <CpuCapability C>
void tree_update_cpu(TreeOp op, double* tree, int64_t leaves, const int64_t* idx, const double* values, int64_t k,
                     int nthreads);

// n samples from the sum tree: index and probability leaf / total, from uniforms u [n].
template <CpuCapability C>
void tree_sample_cpu(const double* tree, int64_t leaves, const double* u, int64_t n, bool stratified, int64_t* idx,
                     double* prob, int nthreads);

#ifdef RETAIN_WITH_CUDA
// owner [capacity] int32 scratch, all -1 before and after the call (it decides the last writer).
void tree_update_cuda(TreeOp op, double* tree, int64_t leaves, const int64_t* idx, const double* values, int64_t k,
                      int32_t* owner, std::uintptr_t stream);
void tree_sample_cuda(const double* tree, int64_t leaves, const double* u, int64_t n, bool stratified, int64_t* idx,
                      double* prob, std::uintptr_t stream);
#endif

}  // namespace retain::replay
