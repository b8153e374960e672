// Zero-filled, 64-byte aligned scratch arrays for the CPU kernels, in place of std::vector.
// A std::vector<float> member function the compiler does not inline is emitted as a weak symbol
// in every kernel build, each compiled for its own capability, and the linker keeps one of them
// for all: an AVX-512 copy could then run on a CPU without AVX-512. Buffer lives in the
// capability's own namespace, so each build keeps its own copy (CMakeLists.txt checks that no
// kernel build defines a shared symbol).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#include "common/cpu_capability.h"

#if !defined(RETAIN_CPU_CAPABILITY)
#error "common/buffer.h is for CPU kernel translation units, compiled once per capability (CMakeLists.txt)"
#endif

namespace retain {
inline namespace RETAIN_CPU_NAMESPACE {

template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { resize(n); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() { std::free(data_); }

  // n zeros (the previous contents are dropped).
  void resize(int64_t n) {
    std::free(data_);
    data_ = nullptr;
    size_ = n;
    if (n <= 0) return;
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;
    data_ = static_cast<T*>(std::aligned_alloc(64, bytes));
    if (!data_) throw std::bad_alloc();
    std::memset(static_cast<void*>(data_), 0, bytes);
  }
  // Sets every element to v.
  void fill(T v) {
    for (int64_t i = 0; i < size_; ++i) data_[i] = v;
  }

  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  T* data_ = nullptr;
  int64_t size_ = 0;
};

}  // inline namespace RETAIN_CPU_NAMESPACE
}  // namespace retain
