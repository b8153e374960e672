// A list of tensors as the fisher kernels see it: one table of int64 built in Python
// (python/retain/ops/fisher/_lists.py), on the tensors' device, so the CPU loops and the CUDA
// kernels read the same layout. Work is split into chunks of kChunk elements of one tensor; a
// reduction keeps one partial per chunk and sums the partials in chunk order, so its result does
// not depend on the thread count or the launch geometry.
//
// Layout for n tensors and `slots` lists (the lists of one call: parameters, anchors, Fisher, ...):
//   [0, n)              numel of tensor i (per sample: a per-sample list holds S * numel)
//   [n, 2n]             first chunk of tensor i; entry 2n is the number of chunks
//   2n+1                bit k set: list k is present (an empty tensor's pointer may be 0 either way)
//   [2n+2 + k*n, +n)    data pointer of tensor i in list k
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/host_device.h"

namespace retain::fisher {

constexpr int64_t kChunk = int64_t{1} << 14;  // elements of one tensor per work unit and per partial sum

// The arithmetic type of every fisher kernel, whatever the storage types T (gradients,
// parameters) and S (Fisher, mu, omega): double. The kernels move a few bytes per element and do a
// few operations, so double costs no time (they are bound by memory bandwidth), and each result is
// the float64 value rounded once to its storage type: a gradient a F delta + b mu whose terms cancel
// keeps its relative accuracy, and a sum over 10^8 elements loses nothing to float32 rounding.
template <typename T, typename S>
using FisherAcc = double;

// The storage types of one call, as a tag argument (launchers deduce T and S from it).
template <typename T, typename S>
struct Types {};

// M(T, S) for each data storage type T and state type S the kernels are instantiated for.
#define RETAIN_FISHER_FOR_EACH(M)                                                               \
  M(float, float) M(float, double) M(double, float) M(double, double) M(::retain::bf16_t, float) \
  M(::retain::bf16_t, double) M(::retain::f16_t, float) M(::retain::f16_t, double)

struct TensorTable {
  const int64_t* t;
  int64_t n;  // tensors per list

  RETAIN_HOST_DEVICE int64_t numel(int64_t i) const { return t[i]; }
  RETAIN_HOST_DEVICE int64_t first_chunk(int64_t i) const { return t[n + i]; }
  RETAIN_HOST_DEVICE int64_t chunks() const { return t[2 * n]; }
  template <typename P>
  RETAIN_HOST_DEVICE P* ptr(int slot, int64_t i) const {
    return reinterpret_cast<P*>(static_cast<uintptr_t>(t[2 * n + 2 + slot * n + i]));
  }
  RETAIN_HOST_DEVICE bool has(int slot) const { return (t[2 * n + 1] >> slot) & 1; }
  // The tensor chunk c belongs to (binary search over the first chunks).
  RETAIN_HOST_DEVICE int64_t tensor_of(int64_t c) const {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
      const int64_t mid = (lo + hi + 1) / 2;
      if (first_chunk(mid) <= c) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
};

// The elements [begin, end) of tensor `tensor` that chunk c covers.
struct ChunkRange {
  int64_t tensor, begin, end;
};

RETAIN_HOST_DEVICE RETAIN_FORCE_INLINE ChunkRange chunk_range(const TensorTable& tab, int64_t c, int64_t tensor) {
  const int64_t begin = (c - tab.first_chunk(tensor)) * kChunk;
  const int64_t end = begin + kChunk < tab.numel(tensor) ? begin + kChunk : tab.numel(tensor);
  return {tensor, begin, end};
}

}  // namespace retain::fisher
