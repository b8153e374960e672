// CUDA kernel of replay/rows.h: a block per (row, field), 16-byte copies when the row and both
// pointers allow them, bytes otherwise.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "replay/rows.h"

namespace retain::replay {
namespace {

constexpr int kRowThreads = 256;

__global__ void rows_copy_kernel(const int64_t* table, const int64_t* idx, bool scatter) {
  const int64_t j = blockIdx.x;
  const int64_t f = blockIdx.y;
  const int64_t slot = idx[j];
  if (slot < 0) return;
  auto* storage = reinterpret_cast<unsigned char*>(table[3 * f]);
  auto* batch = reinterpret_cast<unsigned char*>(table[3 * f + 1]);
  const int64_t bytes = table[3 * f + 2];
  unsigned char* dst = scatter ? storage + slot * bytes : batch + j * bytes;
  const unsigned char* src = scatter ? batch + j * bytes : storage + slot * bytes;
  const bool wide = ((reinterpret_cast<std::uintptr_t>(dst) | reinterpret_cast<std::uintptr_t>(src) | bytes) & 15) == 0;
  if (wide) {
    auto* d = reinterpret_cast<uint4*>(dst);
    const auto* s = reinterpret_cast<const uint4*>(src);
    for (int64_t i = threadIdx.x; i < bytes / 16; i += blockDim.x) d[i] = s[i];
  } else {
    for (int64_t i = threadIdx.x; i < bytes; i += blockDim.x) dst[i] = src[i];
  }
}

}  // namespace

void rows_copy_cuda(const int64_t* table, int64_t fields, const int64_t* idx, int64_t k, bool scatter,
                    std::uintptr_t stream) {
  if (k == 0 || fields == 0) return;
  const dim3 grid(static_cast<unsigned>(k), static_cast<unsigned>(fields));  // k < 2^31, fields < 2^16: bind.cpp
  rows_copy_kernel<<<grid, kRowThreads, 0, as_stream(stream)>>>(table, idx, scatter);
  cuda_check(cudaGetLastError(), "retain::rows_copy (CUDA)");
}

}  // namespace retain::replay
