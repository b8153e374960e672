// Qualifiers that let one inline function serve both the CPU loops and the CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define RETAIN_HOST_DEVICE __host__ __device__
#define RETAIN_FORCE_INLINE __forceinline__
#else
#define RETAIN_HOST_DEVICE
#define RETAIN_FORCE_INLINE inline __attribute__((always_inline))
#endif
