// CUDA kernels of replay/segment_tree.h. An update is one launch of one block, whatever the
// capacity: the last writer of each repeated leaf is elected with atomicMax on an owner scratch,
// then the changed paths are rewritten level by level with a barrier between levels (two threads
// that meet on a shared ancestor write the same value). O(k log P) work and no whole-tree pass.
#include <algorithm>
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "replay/segment_tree.h"

namespace retain::replay {
namespace {

constexpr int kUpdateThreads = 1024;
constexpr int kSampleThreads = 256;

__global__ void tree_update_kernel(TreeOp op, double* tree, int64_t leaves, const int64_t* idx,
                                   const double* values, int64_t k, int32_t* owner) {
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) atomicMax(&owner[idx[j]], static_cast<int32_t>(j));
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
    if (owner[idx[j]] == static_cast<int32_t>(j)) tree[leaves + idx[j]] = values[j];
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < k; j += blockDim.x) owner[idx[j]] = -1;
  for (int64_t shift = 1; (leaves >> shift) >= 1; ++shift) {
    __syncthreads();
    for (int64_t j = threadIdx.x; j < k; j += blockDim.x) {
      const int64_t node = (leaves + idx[j]) >> shift;
      tree[node] = tree_combine(op, tree[2 * node], tree[2 * node + 1]);
    }
  }
}

__global__ void tree_sample_kernel(const double* tree, int64_t leaves, const double* u, int64_t n, bool stratified,
                                   int64_t* idx, double* prob) {
  const double total = tree[1];
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < n; j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = tree_find(tree, leaves, tree_target(total, u[j], j, n, stratified));
    idx[j] = i;
    prob[j] = tree[leaves + i] / total;
  }
}

}  // namespace

void tree_update_cuda(TreeOp op, double* tree, int64_t leaves, const int64_t* idx, const double* values, int64_t k,
                      int32_t* owner, std::uintptr_t stream) {
  if (k == 0) return;
  tree_update_kernel<<<1, kUpdateThreads, 0, as_stream(stream)>>>(op, tree, leaves, idx, values,
                                                                                      k, owner);
  cuda_check(cudaGetLastError(), "retain::tree_update (CUDA)");
}

void tree_sample_cuda(const double* tree, int64_t leaves, const double* u, int64_t n, bool stratified, int64_t* idx,
                      double* prob, std::uintptr_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kSampleThreads - 1) / kSampleThreads, 65535);
  tree_sample_kernel<<<static_cast<unsigned>(blocks), kSampleThreads, 0, as_stream(stream)>>>(
      tree, leaves, u, n, stratified, idx, prob);
  cuda_check(cudaGetLastError(), "retain::tree_sample (CUDA)");
}

}  // namespace retain::replay
