// Row stores from an accumulation buffer, optionally non-temporal (x86 SSE2, every x86-64 CPU):
// for outputs far larger than the caches, streaming stores skip the read-for-ownership of lines
// that are overwritten whole. A kernel that streamed ends with stream_fence().
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/host_device.h"

#if defined(__x86_64__)
#include <emmintrin.h>
#define RETAIN_HAVE_STREAM_STORES 1
#endif

namespace retain {

template <typename T, typename A>
RETAIN_FORCE_INLINE void store_row(T* __restrict dst, const A* __restrict src, int64_t n, bool stream) {
#ifdef RETAIN_HAVE_STREAM_STORES
  if (stream) {
    if constexpr (std::is_same_v<T, float> && std::is_same_v<A, float>) {
      int64_t i = 0;
      for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15); ++i) dst[i] = src[i];
      for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
      for (; i < n; ++i) dst[i] = src[i];
      return;
    } else if constexpr (std::is_same_v<T, double> && std::is_same_v<A, double>) {
      int64_t i = 0;
      for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) & 15); ++i) dst[i] = src[i];
      for (; i + 2 <= n; i += 2) _mm_stream_pd(dst + i, _mm_loadu_pd(src + i));
      for (; i < n; ++i) dst[i] = src[i];
      return;
    }
  }
#else
  (void)stream;  // no streaming stores off x86: plain ones
#endif
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) store_as(dst[i], src[i]);
}

inline void stream_fence(bool streamed) {
#ifdef RETAIN_HAVE_STREAM_STORES
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

}  // namespace retain
